"""ProgressBar.update against tqdm used directly, per call and inside a training loop.

Part 1 times one progress update per call in a tight loop (bars draw to os.devnull):
bare ``tqdm.update(1)``, the common ``set_postfix(loss=loss.item())`` + ``update(1)`` per
step, and ``tk.ProgressBar.update(1, metrics=...)``. Part 2 runs a tiny MLP training
loop (32 -> 64 -> 10, batch 64, SGD, one CPU thread) with each kind of bar and compares
its steps/s with the same loop without a bar. Repetitions are interleaved and the
medians compared.

    python benchmarks/bench_progress.py [--repeats 15] [--calls 20000] [--steps 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import torchkit as tk

# Each factory makes a bar and returns its per-step update; ``box[0]`` holds the live loss.
Box = list[torch.Tensor]
Factory = Callable[[Any, Box], Callable[[], None]]


def no_bar(out: Any, box: Box) -> Callable[[], None]:
    return lambda: None


def tqdm_update(out: Any, box: Box) -> Callable[[], None]:
    bar = tqdm(file=out)
    return lambda: bar.update(1)


def tqdm_postfix_item(out: Any, box: Box) -> Callable[[], None]:
    bar = tqdm(file=out)

    def step() -> None:
        bar.set_postfix(loss=box[0].item())
        bar.update(1)

    return step


def progress_bar(out: Any, box: Box) -> Callable[[], None]:
    bar = tk.ProgressBar(file=out)
    return lambda: bar.update(1, metrics=lambda: {"loss": box[0]})


def progress_bar_plain(out: Any, box: Box) -> Callable[[], None]:
    bar = tk.ProgressBar(file=out)
    return lambda: bar.update(1)


def progress_bar_disabled(out: Any, box: Box) -> Callable[[], None]:
    bar = tk.ProgressBar(file=out, enabled=False)
    return lambda: bar.update(1, metrics=lambda: {"loss": box[0]})


CASES: dict[str, Factory] = {
    "no bar (loop and call overhead)": no_bar,
    "tqdm.update(1)": tqdm_update,
    "tqdm.set_postfix(loss=loss.item()) + update(1)": tqdm_postfix_item,
    "tk.ProgressBar.update(1, metrics=lambda: {'loss': loss})": progress_bar,
    "tk.ProgressBar.update(1)": progress_bar_plain,
    "tk.ProgressBar(enabled=False).update(...)": progress_bar_disabled,
}


def interleaved(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each function's results, one per repeat; the order rotates from repeat to repeat."""
    for fn in fns.values():
        fn()  # warm-up
    results: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            results[name].append(fns[name]())
    return results


def median_ratio(values: list[float], base: list[float]) -> float:
    """The median of per-repeat ratios: a slow moment of the machine hits both sides."""
    return statistics.median(v / b for v, b in zip(values, base))


def per_update(factory: Factory, out: Any, calls: int) -> Callable[[], float]:
    box = [torch.tensor(0.5)]

    def run() -> float:
        update = factory(out, box)
        start = time.perf_counter()
        for _ in range(calls):
            update()
        return (time.perf_counter() - start) / calls

    return run


def training(factory: Factory, out: Any, steps: int) -> Callable[[], float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))

    def run() -> float:
        box = [torch.zeros(())]
        update = factory(out, box)
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            box[0] = loss.detach()
            update()
        return steps / (time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.devnull, "w") as out:
        updates = interleaved(
            {name: per_update(f, out, args.calls) for name, f in CASES.items()}, args.repeats
        )
        steps = interleaved(
            {name: training(f, out, args.steps) for name, f in list(CASES.items())[:4]},
            args.repeats,
        )
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} interleaved repeats, medians")
    print()
    base = updates["tqdm.update(1)"]
    print(f"Per update ({args.calls} calls per repeat):")
    print()
    print("| update | ns per call | ratio to tqdm.update(1) |")
    print("| --- | ---: | ---: |")
    for name, seconds in updates.items():
        print(f"| `{name}` | {statistics.median(seconds) * 1e9:.0f} | "
              f"{median_ratio(seconds, base):.2f} |")
    print()
    loop = steps["no bar (loop and call overhead)"]
    print(f"Tiny MLP training loop ({args.steps} steps per repeat):")
    print()
    print("| bar | steps/s | ratio to no bar |")
    print("| --- | ---: | ---: |")
    for name, rate in steps.items():
        print(f"| `{name}` | {statistics.median(rate):.0f} | {median_ratio(rate, loop):.3f} |")


if __name__ == "__main__":
    main()
