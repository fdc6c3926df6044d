"""Trainer.fit against the hand-written loop it replaces, over the same DataLoader.

Tiny MLP 32 -> 64 -> 10, batches of 64, SGD, one CPU thread. One repetition is one epoch
(300 steps by default); the variants take turns in a rotating order and the medians of
steps/s are compared with the raw loop's. The progress bar is on for the Trainer (drawn
to /dev/null, so the terminal's speed does not count). For reference, a raw loop that
calls tqdm's ``set_postfix(loss=loss.item())`` every step is measured too.

    python benchmarks/bench_trainer.py [--repeats 30] [--steps 300]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import torchkit as tk


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def raw(loader: DataLoader) -> Callable[[], None]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def run() -> None:
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def raw_tqdm_postfix(loader: DataLoader) -> Callable[[], None]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def run() -> None:
        model.train()
        with tqdm(loader) as bar:
            for x, y in bar:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.set_postfix(loss=loss.item())

    return run


def trainer(loader: DataLoader, **kwargs: object) -> Callable[[], None]:
    model = make_model()
    fitter = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), F.cross_entropy,
                        device="cpu", **kwargs)  # type: ignore[arg-type]

    def run() -> None:
        fitter.epoch = 0  # one more epoch each time
        fitter.fit(loader, epochs=1)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = 64 * args.steps
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    loader = DataLoader(data, batch_size=64, shuffle=True)
    variants = {
        "raw loop": raw(loader),
        "tk.Trainer, progress bar on": trainer(loader, progress=True),
        "tk.Trainer, progress=False": trainer(loader, progress=False),
        "raw loop + tqdm set_postfix(loss.item()) per step": raw_tqdm_postfix(loader),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        for name in names:
            variants[name]()  # warm-up
        for i in range(args.repeats):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["raw loop"])
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, 1 thread, "
          f"{args.steps} steps of batch 64 per repeat, {args.repeats} rotating repeats")
    print()
    print("| variant | median epoch (ms) | steps/s | vs raw loop |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name} | {median * 1e3:.1f} | {args.steps / median:.0f} | "
              f"{base / median:.3f}x |")


if __name__ == "__main__":
    main()
