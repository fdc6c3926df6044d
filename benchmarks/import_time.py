"""Measure how much ``import torchkit`` adds to ``import torch``.

Runs ``--repeats`` rounds of fresh interpreters, alternating between a child that imports
``torch`` alone and one that imports ``torch`` and then ``torchkit``; each child times
its own imports with ``time.perf_counter`` and prints the seconds. Reports the medians,
their difference, and the median time of ``import torchkit`` measured right after
``import torch`` inside the same child (the less noisy estimate of the overhead).

Usage::

    python benchmarks/import_time.py [--repeats 15] [--budget-ms 50] [--check]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_TORCH_ONLY = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
print(json.dumps({"torch": t1 - t0}))
"""

_TORCH_THEN_TORCHKIT = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import torchkit
t2 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "torchkit": t2 - t1, "both": t2 - t0}))
"""


def run_child(code: str, python: str) -> dict[str, float]:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="child pairs to run")
    parser.add_argument("--budget-ms", type=float, default=50.0, help="allowed overhead")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure")
    parser.add_argument("--check", action="store_true", help="exit 1 if over the budget")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    run_child(_TORCH_THEN_TORCHKIT, args.python)  # warm the OS file cache; not counted
    torch_alone, both, torchkit_after_torch = [], [], []
    for _ in range(args.repeats):
        torch_alone.append(run_child(_TORCH_ONLY, args.python)["torch"])
        child = run_child(_TORCH_THEN_TORCHKIT, args.python)
        both.append(child["both"])
        torchkit_after_torch.append(child["torchkit"])

    def ms(values: list[float]) -> float:
        return 1000 * statistics.median(values)

    difference = ms(both) - ms(torch_alone)
    in_process = ms(torchkit_after_torch)
    overhead = max(difference, in_process)
    within = overhead <= args.budget_ms

    print(
        f"import time, median of {args.repeats} interleaved fresh processes "
        f"(python {sys.version.split()[0]})\n"
    )
    print("| measurement | median (ms) |")
    print("| --- | ---: |")
    print(f"| `import torch` | {ms(torch_alone):.1f} |")
    print(f"| `import torch, torchkit` | {ms(both):.1f} |")
    print(f"| difference of the medians | {difference:+.1f} |")
    print(f"| `import torchkit` right after `import torch` (same process) | {in_process:.1f} |")
    print(
        f"\noverhead {overhead:.1f} ms (the larger of the two estimates) is "
        f"{'within' if within else 'OVER'} the {args.budget_ms:g} ms budget"
    )
    return 0 if within or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
