"""Peak memory of one training step with and without tk.checkpoint_activations, on CPU.

Each configuration runs in a fresh subprocess (so one cannot inherit another's heap),
with glibc's mmap threshold fixed so that freed tensors go back to the OS and the
resident set follows the tensors alive. A worker builds the model, runs one warm-up
forward/backward (gradients now exist), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs one more forward/backward and reports the peak RSS
above the RSS just before it: the memory the step needs on top of weights and
gradients, i.e. mostly saved activations. Then it times a few more steps (median).
Repeats are interleaved; medians over repeats are shown.

    python benchmarks/bench_checkpoint_activations.py [--repeats 3]    # Linux: reads /proc
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import torchkit as tk

TIMED_STEPS = 3

MODELS = {
    # name: (description, checkpoint pattern)
    "mlp": ("residual MLP, 48 blocks of Linear(1024)+LayerNorm+GELU, batch 256", "blocks.*"),
    "resnet50": ("torchvision resnet50 (weights=None), batch 8 x 3 x 160 x 160", "layer*.*"),
}


class ResidualMLP(nn.Module):
    def __init__(self, depth: int = 48, width: int = 1024) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return ResidualMLP(), torch.randn(256, 1024), torch.randint(0, 10, (256,))
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    return model, torch.randn(8, 3, 160, 160), torch.randint(0, 1000, (8,))


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(name: str, checkpointed: bool) -> None:
    torch.set_num_threads(1)
    model, x, y = build(name)
    model.train()
    if checkpointed:
        tk.checkpoint_activations(model, MODELS[name][1])

    def step() -> None:
        F.cross_entropy(model(x), y).backward()

    step()  # warm-up: allocates the gradients
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM, the peak resident set, to the current RSS
    step()
    peak = rss_kib("VmHWM")
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"peak_mib": (peak - before) / 1024, "seconds": statistics.median(times)}))


def run_worker(name: str, checkpointed: bool) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    args = [sys.executable, __file__, "--worker", name, "1" if checkpointed else "0"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CHECKPOINTED"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1] == "1")
        return
    print(f"torch {torch.__version__}, CPU, 1 thread, {args.repeats} interleaved repeats "
          "(a fresh process each)")
    print()
    print("| model | plain peak (MiB) | checkpointed peak (MiB) | memory ratio | "
          "time ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for i in range(args.repeats):
            for checkpointed in (False, True) if i % 2 == 0 else (True, False):
                runs[checkpointed].append(run_worker(name, checkpointed))
        peak = {k: statistics.median(r["peak_mib"] for r in v) for k, v in runs.items()}
        secs = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
        print(f"| {MODELS[name][0]} | {peak[False]:.0f} | {peak[True]:.0f} | "
              f"{peak[True] / peak[False]:.2f} | {secs[True] / secs[False]:.2f} |")


if __name__ == "__main__":
    main()
