"""A hand-written training loop that uses torchkit's step pieces and nothing else.

Trains a small MLP on scikit-learn's digits (shipped with scikit-learn, no download)
with exact gradient accumulation over uneven micro-batches, gradient clipping and early
stopping that restores the best weights.

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/raw_loop.py            # about ten seconds on a laptop CPU
    python examples/raw_loop.py --smoke    # two epochs, for CI
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, count = torch.zeros(()), torch.zeros(()), 0
    for x, y in loader:
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += len(y)
    return loss_sum.item() / count, correct.item() / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--smoke", action="store_true", help="run two epochs only")
    args = parser.parse_args()
    epochs = 2 if args.smoke else args.epochs

    torch.manual_seed(0)
    train_set, val_set = digits()
    # 1400 samples in micro-batches of 48: the last micro-batch and window are short.
    train_loader = DataLoader(train_set, batch_size=48, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accum = tk.GradAccumulator(optimizer, steps=4, max_norm=1.0)
    stopper = tk.EarlyStopping("val_loss", patience=5, restore_best=True)

    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            with accum.accumulate():
                loss = F.cross_entropy(model(x), y)
            accum.backward(loss, batch_size=len(x))
        accum.flush()  # the epoch's last, partial window
        val_loss, val_acc = evaluate(model, val_loader)
        norm = accum.last_grad_norm
        print(f"epoch {epoch + 1:3d}  val_loss {val_loss:.4f}  val_acc {val_acc:.3f}  "
              f"grad_norm {norm.item() if norm is not None else float('nan'):.3f}")
        if stopper.step(val_loss, model):
            print(f"stopped early: {stopper.reason}")
            break

    val_loss, val_acc = evaluate(model, val_loader)
    print(f"final (best weights): val_loss {val_loss:.4f}  val_acc {val_acc:.3f}  "
          f"optimizer steps {accum.num_steps}")


if __name__ == "__main__":
    main()
