"""GradAccumulator against the hand-written accumulation loop it replaces.

Both loops train the same tiny MLP (32 -> 64 -> 10) on the same pre-made micro-batches
on one CPU thread. Repetitions are interleaved (the order alternates each time) and
the medians are compared; the figure of merit is the time ratio torchkit / raw.

    python benchmarks/bench_accumulation.py [--repeats 30] [--micro-batches 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import torchkit as tk

STEPS = 4


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def raw_loop(batches, *, max_norm: float | None) -> Callable[[], None]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def run() -> None:
        for i, (x, y) in enumerate(batches):
            loss = F.cross_entropy(model(x), y) / STEPS
            loss.backward()
            if (i + 1) % STEPS == 0:
                if max_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)

    return run


def torchkit_loop(batches, *, max_norm: float | None, weighted: bool, **kwargs) -> Callable:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    accum = tk.GradAccumulator(opt, STEPS, max_norm=max_norm, **kwargs)

    def run() -> None:
        for x, y in batches:
            with accum.accumulate():
                loss = F.cross_entropy(model(x), y)
            accum.backward(loss, batch_size=len(x) if weighted else None)
        accum.flush()

    return run


def measure(a: Callable[[], None], b: Callable[[], None], repeats: int) -> tuple[float, float]:
    a(), b()  # warm-up
    times_a, times_b = [], []
    for i in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)) if i % 2 == 0 else (
            (b, times_b), (a, times_a)
        ):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = args.micro_batch_size
    batches = [
        (torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
        for _ in range(args.micro_batches)
    ]
    cases = {
        "batch_size given (default checks)": ({"weighted": True}, None),
        "no batch_size": ({"weighted": False}, None),
        "no batch_size, skip_nonfinite=False": (
            {"weighted": False, "skip_nonfinite": False}, None),
        "batch_size given, max_norm=1.0": ({"weighted": True}, 1.0),
    }
    print(f"torch {torch.__version__}, 1 thread, {args.micro_batches} micro-batches of {n}, "
          f"steps={STEPS}, {args.repeats} interleaved repeats")
    print()
    print("| case | raw loop (ms) | GradAccumulator (ms) | ratio | overhead |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (kwargs, max_norm) in cases.items():
        raw, ours = measure(raw_loop(batches, max_norm=max_norm),
                            torchkit_loop(batches, max_norm=max_norm, **kwargs), args.repeats)
        print(f"| {name} | {raw * 1e3:.2f} | {ours * 1e3:.2f} | {ours / raw:.3f} | "
              f"{(ours / raw - 1) * 100:+.1f} % |")


if __name__ == "__main__":
    main()
