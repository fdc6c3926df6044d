"""Exact gradient accumulation with clipping, in a hand-written loop (and in bf16).

Part 1 checks the claim: one optimizer step from ``tk.GradAccumulator`` over three
micro-batches of *different* sizes (48 + 32 + 20 samples), clipped with ``max_norm``,
changes the weights as one step on the 100-sample batch, clipped the same way, does
(up to float32 rounding: the printed max difference is around 1e-8).
A plain ``loss / steps`` would weigh the 20 samples of the last micro-batch like 48.

Part 2 trains an MLP on scikit-learn's digits with the same accumulator, the forward
pass under CPU bf16 autocast. bf16 has float32's exponent range, so unlike float16 it
needs no ``GradScaler``; on CUDA with float16, pass ``scaler=torch.amp.GradScaler()``.

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/accumulate_and_clip.py           # a few seconds
    python examples/accumulate_and_clip.py --smoke   # for CI
"""

from __future__ import annotations

import argparse
import copy

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


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def check_exactness(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> None:
    """One accumulated, clipped step vs. one big-batch, clipped step: same weights?"""
    big = make_model()
    small = copy.deepcopy(big)
    x, y = x[: sum(sizes)], y[: sum(sizes)]
    max_norm = 0.2  # small enough that clipping really happens

    # The big batch, by hand.
    big_opt = torch.optim.SGD(big.parameters(), lr=0.5, momentum=0.9)
    F.cross_entropy(big(x), y).backward()
    norm = tk.clip_grad_norm(big.parameters(), max_norm)
    big_opt.step()

    # The same samples as uneven micro-batches, through the accumulator.
    small_opt = torch.optim.SGD(small.parameters(), lr=0.5, momentum=0.9)
    accum = tk.GradAccumulator(small_opt, steps=len(sizes), max_norm=max_norm)
    for xb, yb in zip(x.split(sizes), y.split(sizes)):
        with accum.accumulate():
            loss = F.cross_entropy(small(xb), yb)  # the micro-batch's *mean* loss
        stepped = accum.backward(loss, batch_size=len(xb))

    diff = max((a - b).abs().max().item() for a, b in zip(big.parameters(), small.parameters()))
    print(f"micro-batches {sizes}: stepped={stepped}, grad norm {norm.item():.3f} "
          f"(clipped to {max_norm}) vs accumulator's {accum.last_grad_norm.item():.3f}")
    print(f"max |accumulated - big batch| over all weights after one step: {diff:.2e}")
    # Summing in a different order rounds differently: float32 noise, nothing more.
    assert diff < 1e-6, "accumulation should equal the big batch"


def uneven_batches(dataset: TensorDataset, sizes: list[int]) -> list[list[int]]:
    """Batch indices cycling through ``sizes``: micro-batches of different lengths."""
    order = torch.randperm(len(dataset)).tolist()
    batches, start, k = [], 0, 0
    while start < len(order):
        batches.append(order[start:start + sizes[k % len(sizes)]])
        start, k = start + sizes[k % len(sizes)], k + 1
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="two epochs only")
    args = parser.parse_args()
    epochs = 2 if args.smoke else args.epochs

    tk.seed_everything(0)
    train_set, val_set = digits()
    sizes = [48, 32, 20]
    check_exactness(*train_set.tensors, sizes)

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    accum = tk.GradAccumulator(optimizer, steps=len(sizes), max_norm=1.0)
    x_val, y_val = val_set.tensors
    for epoch in range(epochs):
        model.train()
        # A fresh shuffle each epoch; the epoch's last window may be short.
        loader = DataLoader(train_set, batch_sampler=uneven_batches(train_set, sizes))
        for x, y in loader:
            with accum.accumulate(), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)  # bf16 forward, float32 weights
            accum.backward(loss, batch_size=len(x))
        accum.flush()  # step on the partial last window instead of carrying it over
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            val_acc = tk.accuracy(model(x_val), y_val).item()
        print(f"epoch {epoch + 1:2d}  val_acc {val_acc:.3f}  "
              f"grad norm before clipping {accum.last_grad_norm.item():.3f}  "
              f"optimizer steps {accum.num_steps}  skipped {accum.skipped_steps}")


if __name__ == "__main__":
    main()
