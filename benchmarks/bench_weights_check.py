"""Cost of Trainer's finite-weights check (issue 13): per check, and per epoch of training.

``nonfinite="raise"`` checks the weights with the bulk loss check: about once a second,
at each epoch end and before every checkpoint; never per step. This measures one check
on models of several sizes, and a whole ``fit`` with and without it.

    python benchmarks/bench_weights_check.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import torchkit as tk
from torchkit.trainer import _guards


def median_ms(fn, repeat: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def mlp(width: int, depth: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def main() -> None:
    torch.set_num_threads(1)
    guard = _guards.WeightsGuard()
    for width, depth in [(256, 8), (1024, 16), (2048, 24)]:
        model = mlp(width, depth)
        n = sum(p.numel() for p in model.parameters())
        ms = median_ms(lambda m=model: guard.bad(m, epoch=0, batch_idx=0, step=0))
        print(f"one check, {n / 1e6:6.2f} M params in {2 * depth} tensors: {ms:7.3f} ms")

    x = torch.randn(4096, 64)
    data = [(x[i:i + 32], x[i:i + 32, :8]) for i in range(0, len(x), 32)]  # 128 steps

    def fit(check: bool) -> float:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
        trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01),
                             nn.functional.mse_loss, progress=False)
        if not check:
            trainer._weights_guard.bad = lambda *a, **k: False
        start = time.perf_counter()
        trainer.fit(data, epochs=5)
        return time.perf_counter() - start

    with_check = statistics.median(fit(True) for _ in range(5))
    without = statistics.median(fit(False) for _ in range(5))
    print(f"fit, 5 epochs x 128 steps: {without * 1e3:.1f} ms without the check, "
          f"{with_check * 1e3:.1f} ms with it ({(with_check / without - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
