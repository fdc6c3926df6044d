"""torchkit's clipping helpers against torch.nn.utils, per call.

Gradients are made once; each side then clips them in a loop of ``--calls`` calls, with
a ``max_norm`` above the norm so the values stay the same from call to call (the scaling
multiply still runs, as it does in training). Repetitions are interleaved and the
median per-call times compared, on one CPU thread.

    python benchmarks/bench_clipping.py [--repeats 30] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import torchkit as tk


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def deep() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(50):
        layers += [nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def with_grads(model: nn.Module) -> list[torch.Tensor]:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(a: Callable[[], object], b: Callable[[], object], *, repeats: int, calls: int):
    per_call(a, calls), per_call(b, calls)  # warm-up
    times_a, times_b = [], []
    for i in range(repeats):
        order = ((a, times_a), (b, times_b)) if i % 2 == 0 else ((b, times_b), (a, times_a))
        for fn, times in order:
            times.append(per_call(fn, calls))
    return statistics.median(times_a), statistics.median(times_b)


def cases(params: list[torch.Tensor]) -> dict[str, tuple[Callable[[], object], ...]]:
    return {
        "clip_grad_norm (p=2)": (
            lambda: torch.nn.utils.clip_grad_norm_(params, 1e9),
            lambda: tk.clip_grad_norm(params, 1e9),
        ),
        "clip_grad_norm (p=inf)": (
            lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, norm_type=float("inf")),
            lambda: tk.clip_grad_norm(params, 1e9, norm_type=float("inf")),
        ),
        "clip_grad_value": (
            lambda: torch.nn.utils.clip_grad_value_(params, 1e9),
            lambda: tk.clip_grad_value(params, 1e9),
        ),
        "grad_norm vs get_total_norm": (
            lambda: torch.nn.utils.get_total_norm([p.grad for p in params]),
            lambda: tk.grad_norm(params),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, {args.calls} calls x {args.repeats} "
          "interleaved repeats; times are per call")
    print()
    print("| model | helper | torch.nn.utils (us) | torchkit (us) | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for model_name, build in (("tiny MLP (4 tensors)", tiny), ("deep MLP (203 tensors)", deep)):
        params = with_grads(build())
        for name, (theirs, ours) in cases(params).items():
            t_theirs, t_ours = measure(theirs, ours, repeats=args.repeats, calls=args.calls)
            print(f"| {model_name} | {name} | {t_theirs * 1e6:.1f} | {t_ours * 1e6:.1f} | "
                  f"{t_ours / t_theirs:.2f} |")


if __name__ == "__main__":
    main()
