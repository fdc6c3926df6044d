"""Fine-tune with the training recipes: parameter groups, warm-up cosine, EMA, unfreezing.

A small MLP "backbone" is pretrained on digits 0-4, then fine-tuned on digits 5-9 with a
new head (``tk.replace_head(init=)``): ``tk.param_groups`` gives the head a larger LR
than the backbone and no weight decay to biases and norms, ``tk.warmup_cosine`` warms
up and decays the LR per optimizer step, ``tk.UnfreezeSchedule`` thaws the backbone a
block at a time, ``tk.ModelEMA(evaluate=True)`` validates with the averaged weights, and
``tk.TimeLimit`` bounds the run (saving a checkpoint to resume from).

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/finetune_recipes.py            # seconds on a CPU
    python examples/finetune_recipes.py --smoke    # for CI
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def digits(classes: range) -> tuple[TensorDataset, TensorDataset]:
    """Digits of ``classes`` as (train, valid) tensors, labels counted from 0."""
    x, y = load_digits(return_X_y=True)
    keep = torch.isin(torch.tensor(y), torch.tensor(list(classes)))
    xs = torch.tensor(x, dtype=torch.float32)[keep] / 16
    ys = torch.tensor(y)[keep] - classes.start
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))
    xs, ys = xs[perm], ys[perm]
    cut = int(0.8 * len(xs))
    return TensorDataset(xs[:cut], ys[:cut]), TensorDataset(xs[cut:], ys[cut:])


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU()),   # block 0
        nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU()),  # block 1
        nn.Linear(128, 5),                                                 # head
    )


def loaders(data: tuple[TensorDataset, TensorDataset]) -> tuple[DataLoader, DataLoader]:
    train, valid = data
    return (DataLoader(train, batch_size=32, shuffle=True, generator=tk.loader_generator(0),
                       worker_init_fn=tk.seed_worker),
            DataLoader(valid, batch_size=256))


def pretrain(model: nn.Module, epochs: int) -> None:
    train, valid = loaders(digits(range(0, 5)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = tk.Trainer(model, opt, F.cross_entropy, progress=False,
                         metrics={"acc": tk.accuracy}).fit(train, valid, epochs=epochs)
    print(f"pretrained on digits 0-4: val acc {history['val_acc'][-1]:.3f}")


def finetune(model: nn.Module, epochs: int, out: Path) -> tk.Trainer:
    tk.replace_head(model, 5, init="xavier_uniform")  # digits 5-9 as classes 0-4
    tk.freeze(model, ["0", "1"])
    groups = tk.param_groups(model, {"2.*": 3e-3}, lr=1e-3, weight_decay=0.01,
                             no_decay=("*.bias", "*.1.*"))  # "*.1.*": the LayerNorms
    print(groups)
    opt = torch.optim.AdamW(groups)
    train, valid = loaders(digits(range(5, 10)))
    total = epochs * len(train)
    sched = tk.warmup_cosine(opt, total, warmup_steps=max(total // 10, 1), min_lr=1e-5)
    callbacks = [
        tk.UnfreezeSchedule({1: "1", 2: "0"}, lr=5e-4),  # the block under the head first
        tk.ModelEMA(model, decay=0.95, warmup_steps=10, evaluate=True),
        tk.TimeLimit("00:10:00"),
    ]
    trainer = tk.Trainer(model, opt, F.cross_entropy, progress=False, callbacks=callbacks,
                         scheduler=sched, scheduler_interval="step",
                         metrics={"acc": tk.accuracy},
                         checkpoint=tk.CheckpointManager(out / "checkpoints", keep_last=2))
    history = trainer.fit(train, valid, epochs=epochs)
    for record in history.records:
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f}, "
              f"EMA val acc {record['val_acc']:.3f}, lr {record['lr']:.2e}")
    print(f"{len(opt.param_groups)} parameter groups: "
          f"{[group['name'] for group in opt.param_groups]}")
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few epochs, for CI")
    parser.add_argument("--out", type=Path, default=None, help="where checkpoints go")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="finetune_recipes_"))
    tk.seed_everything(0)
    model = make_model()
    pretrain(model, epochs=2 if args.smoke else 10)
    trainer = finetune(model, epochs=3 if args.smoke else 12, out=out)
    ema = next(cb for cb in trainer.callbacks if isinstance(cb, tk.ModelEMA))
    print(f"{ema.num_updates} EMA updates over {trainer.global_step} optimizer steps; "
          f"checkpoints in {out / 'checkpoints'}")


if __name__ == "__main__":
    main()
