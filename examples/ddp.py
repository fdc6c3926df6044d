"""Data-parallel training with tk.launch: one script for a laptop and for many machines.

Trains a small MLP on scikit-learn's digits (shipped with scikit-learn, no download)
with ``tk.Trainer`` on two CPU processes. Under a process group the Trainer wraps the
model in DistributedDataParallel, gives each rank its shard of the training data, and
averages the metrics over the ranks; rank 0 prints them.

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/ddp.py              # 2 processes on this machine (gloo, CPU)
    python examples/ddp.py --smoke      # two epochs, for CI

On many machines, start it with torchrun on each one; ``tk.launch`` then spawns nothing
and runs ``worker`` once in each process that torchrun started:

    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d \\
        --rdzv_endpoint=node0.example.com:29500 --rdzv_id=digits examples/ddp.py
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def digits() -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def worker(epochs: int) -> dict[str, float]:
    """Run on every rank, with the process group already initialised by tk.launch."""
    torch.set_num_threads(1)  # the ranks share this machine's cores
    tk.seed_everything(0)  # the same initial weights on every rank, and on every run
    train_set, val_set = digits()
    # Plain loaders: under a process group the Trainer shards them with a
    # DistributedSampler (and calls set_epoch), so each rank sees its part of an epoch.
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    trainer = tk.Trainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=3e-3),
        nn.functional.cross_entropy,
        metrics={"acc": tk.accuracy},
        progress=False,
    )
    history = trainer.fit(train_loader, val_loader, epochs=epochs)
    return {key: history[key][-1] for key in ("train_loss", "val_loss", "val_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="run two epochs only")
    args = parser.parse_args()
    epochs = 2 if args.smoke else args.epochs

    # Plain `python ddp.py`: every rank's metrics, in rank order. Under torchrun: a list
    # with this process's only, so print on global rank 0 (the group is gone by now).
    results = tk.launch(worker, epochs, nprocs=args.nprocs, backend="gloo")
    if os.environ.get("RANK", "0") == "0":
        metrics = ", ".join(f"{key} {value:.4f}" for key, value in results[0].items())
        print(f"rank 0 after {epochs} epochs: {metrics}")

if __name__ == "__main__":  # required: spawned processes import this file again
    main()
