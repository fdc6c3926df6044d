"""ModelEMA's per-step cost on the tiny-MLP benchmark (the model of bench_trainer.py).

A hand-written loop (MLP 32 -> 64 -> 10, batches of 64, SGD, one CPU thread) with and
without ``ema.update(model)`` after each ``opt.step()``, plus torch's
``AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(...))`` for reference. Variants take
turns; medians of per-step time over the repetitions are compared.

    python benchmarks/bench_ema.py [--repeats 21] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import torchkit as tk


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def variant(kind: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ema = tk.ModelEMA(model, decay=0.999) if kind == "torchkit" else None
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999)) \
        if kind == "torch" else None

    def run() -> None:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model)
            if ref is not None:
                ref.update_parameters(model)

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
               for _ in range(args.steps)]
    kinds = ["none", "torchkit", "torch"]
    runs = {k: variant(k, batches) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        for k in kinds[r % 3:] + kinds[:r % 3]:
            start = time.perf_counter()
            runs[k]()
            times[k].append((time.perf_counter() - start) / args.steps * 1e6)
    base = statistics.median(times["none"])
    print(f"torch {torch.__version__}, {args.steps} steps x {args.repeats} repeats, 1 thread")
    for k in kinds:
        med = statistics.median(times[k])
        print(f"{k:9s} {med:7.1f} us/step  (+{med - base:5.1f} us, {med / base - 1:+.1%})")


if __name__ == "__main__":
    main()
