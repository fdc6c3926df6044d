"""Quickstart: a small CNN on scikit-learn's digits with tk.Trainer.

Shows the usual pieces together: ``tk.Trainer`` with ``tk.accuracy``, the tqdm progress
bar, a ``tk.TensorBoardLogger``, ``tk.EarlyStopping`` that restores the best weights, and
a best-checkpoint kept by ``tk.CheckpointManager(keep_best=1, monitor="val_loss")``. The
8x8 digits ship with scikit-learn: nothing is downloaded.

    pip install -e ".[tensorboard]" scikit-learn   # in a clone (README: Install)
    python examples/quickstart.py              # ~99 % val accuracy in about 40 s on 2 CPU cores
    python examples/quickstart.py --smoke      # one epoch on a tiny subset, for CI
    tensorboard --logdir runs/quickstart       # the curves
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def digits(limit: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """The 1797 digits as (N, 1, 8, 8) images in [0, 1], split 1400 / 397."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]
    if limit is not None:
        train, val = train[:limit], val[:limit]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),                                   # 8x8 -> 4x4
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 4 * 4, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--smoke", action="store_true", help="one epoch, tiny subset")
    args = parser.parse_args()
    epochs = 1 if args.smoke else args.epochs

    tk.seed_everything(0)  # before building the model: reproducible initial weights
    train_set, val_set = digits(limit=128 if args.smoke else None)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)

    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    checkpoints = tk.CheckpointManager(
        args.out / "checkpoints", keep_last=1, keep_best=1, monitor="val_loss"
    )
    logger = tk.TensorBoardLogger(args.out / "tensorboard")  # tensorboard --logdir <out>
    trainer = tk.Trainer(
        model,
        optimizer,
        nn.functional.cross_entropy,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs),
        metrics={"acc": tk.accuracy},
        callbacks=[tk.EarlyStopping("val_loss", patience=5, restore_best=True)],
        logger=logger,
        checkpoint=checkpoints,
        progress=True,  # the default: a tqdm bar per epoch
    )

    start = time.perf_counter()
    history = trainer.fit(train_loader, val_loader, epochs=epochs)
    seconds = time.perf_counter() - start
    logger.close()  # the Trainer uses the logger; closing it is up to you
    if trainer.stop_reason:
        print(f"stopped early: {trainer.stop_reason}")

    # Evaluate the best epoch's weights (EarlyStopping restores them only when it stops).
    meta = checkpoints.load("best", {"model": model})
    final = trainer.evaluate(val_loader)
    print(f"best checkpoint: {checkpoints.best()} (after epoch {meta['epoch']})")
    print(f"{len(history['epoch'])} epochs in {seconds:.1f} s; "
          f"final val_loss {final['val_loss']:.4f}  val_acc {final['val_acc']:.2%}")


if __name__ == "__main__":
    main()
