"""Instructions per training step, counted by Valgrind: overhead ratios without the noise.

On a shared machine a wall-clock ratio moves by several per cent from one run to the
next (see RESULTS.md: the same raw loop runs anywhere from 430 to 760 us per step here),
which is as large as the overhead being measured. This benchmark counts instead: it runs
each variant of ``bench_overhead.py`` (the same code, the same pre-built batches) under
Valgrind's callgrind, with counting switched on only for the timed window, and reports the
instructions executed per step and their ratio to the raw loop's. ``--cache-sim`` also
simulates the caches and adds an estimate of cycles (instructions + 10 per first-level miss
+ 100 per last-level miss, callgrind's own weights) and ``--branch-sim`` counts mispredicted
branches. The counts repeat to within ~1 %.

What it cannot see: time spent waiting (memory stalls beyond the simulated caches, the
GIL, other processes), so it complements the wall-clock benchmark rather than replacing it.
Under Valgrind a step takes ~50x longer, so the clocks torchkit reads to pace its work (the
progress bar's redraws, the bulk loss check) are slowed by the same factor, measured on the
first raw run: each variant then does that time-paced work as often per step as natively.

Needs ``valgrind`` and a C compiler with ``valgrind/callgrind.h`` (Debian: ``apt install
valgrind``); it says so and exits when they are missing. About 3 minutes a suite.

    python benchmarks/bench_instructions.py --suite tiny
    python benchmarks/bench_instructions.py --suite clip --cache-sim --branch-sim
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_overhead as overhead  # noqa: E402
import torch  # noqa: E402

HELPER = r"""
#include <valgrind/callgrind.h>
void window_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void window_end(const char *name) { CALLGRIND_DUMP_STATS_AT(name); CALLGRIND_STOP_INSTRUMENTATION; }
"""

STEPS, WARM = 277, 20  # 256 counted steps: four of the loss ledger's 64-step folds


class CountedWindow:
    """The ``marks`` of ``bench_overhead``'s variants: counting on at ``warm``, off at ``last``."""

    def __init__(self, lib: Any, name: str, warm: int, last: int) -> None:
        self.lib, self.name, self.warm, self.last = lib, name, warm, last
        self.t0 = self.t1 = 0.0

    def at(self, i: int) -> None:
        if i == self.warm:
            self.t0 = time.perf_counter()
            self.lib.window_start()
        elif i == self.last:
            self.lib.window_end(self.name.encode())
            self.t1 = time.perf_counter()


def slow_clocks(factor: float) -> None:
    """Make ``time.monotonic`` (and the progress bar's clock) run ``factor`` times slower."""
    import torchkit.progress

    real, origin = time.monotonic, time.monotonic()

    def monotonic() -> float:
        return origin + (real() - origin) / factor

    time.monotonic = monotonic
    torchkit.progress._clock = monotonic  # bound at import: replace it too


def child(args: argparse.Namespace) -> None:
    """Under Valgrind: run every variant once with its window counted."""
    lib = ctypes.CDLL(args.lib)
    lib.window_end.argtypes = [ctypes.c_char_p]
    workload, base, variants, _ = overhead.suite(args.suite)
    batches = overhead.make_batches(workload)[:args.steps]
    factory = overhead.WORKLOADS[workload][0]
    torch.set_num_threads(1)
    order = [base, *[v for v in variants if v != base], base]  # raw first and last
    for n, name in enumerate(order):
        window = CountedWindow(lib, f"{n}:{name}", args.warm, args.steps - 1)
        model = factory()
        gc.collect()
        with overhead.quiet():
            variants[name](model, batches, window)  # type: ignore[arg-type]
        if n == 0:  # the raw loop: how much slower a step is here than natively
            per_step = (window.t1 - window.t0) / (args.steps - 1 - args.warm)
            slow_clocks(max(1.0, per_step / (args.native_us * 1e-6)))


def native_us(suite: str, steps: int = 400) -> float:
    """The raw loop's native microseconds per step (median of three short runs)."""
    workload, base, variants, _ = overhead.suite(suite)
    batches = overhead.make_batches(workload)[:steps]
    torch.set_num_threads(1)
    times = [1e6 / overhead.run_once(variants[base], workload, batches, steps) for _ in range(3)]
    return statistics.median(times)


def read_dumps(out_dir: str) -> list[tuple[str, dict[str, int]]]:
    rows = []
    for path in glob.glob(os.path.join(out_dir, "cg.*.*")):
        text = Path(path).read_text()
        label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        events = re.search(r"^events: (.*)$", text, re.M)
        totals = re.search(r"^(?:summary|totals): (.*)$", text, re.M)
        if label and events and totals:
            counts = dict(zip(events.group(1).split(), map(int, totals.group(1).split())))
            rows.append((label.group(1), counts))
    rows.sort(key=lambda row: int(row[0].split(":", 1)[0]))
    return rows


def cycles(c: dict[str, int]) -> int:
    first = c.get("I1mr", 0) + c.get("D1mr", 0) + c.get("D1mw", 0)
    last = c.get("ILmr", 0) + c.get("DLmr", 0) + c.get("DLmw", 0)
    return c["Ir"] + 10 * first + 100 * last


def parent(args: argparse.Namespace) -> None:
    valgrind, cc = shutil.which("valgrind"), shutil.which("cc") or shutil.which("gcc")
    if valgrind is None or cc is None:
        raise SystemExit("bench_instructions needs valgrind and a C compiler "
                         f"(found valgrind={valgrind}, cc={cc}); nothing measured")
    with tempfile.TemporaryDirectory(prefix="tk_instr_") as tmp:
        source, lib = os.path.join(tmp, "window.c"), os.path.join(tmp, "libwindow.so")
        Path(source).write_text(HELPER)
        built = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, source],
                               capture_output=True, text=True)
        if built.returncode:
            raise SystemExit("could not build the counting helper (is valgrind/callgrind.h "
                             f"installed?):\n{built.stderr}")
        us = native_us(args.suite)
        command = [valgrind, "--tool=callgrind", "--instr-atstart=no",
                   f"--cache-sim={'yes' if args.cache_sim else 'no'}",
                   f"--branch-sim={'yes' if args.branch_sim else 'no'}",
                   f"--callgrind-out-file={tmp}/cg.%p", sys.executable, __file__, "--child",
                   "--lib", lib, "--suite", args.suite, "--steps", str(args.steps),
                   "--warm", str(args.warm), "--native-us", f"{us:.3f}"]
        started = time.time()
        ran = subprocess.run(command, capture_output=True, text=True)
        if ran.returncode:
            raise SystemExit(f"the counted run failed:\n{ran.stderr[-4000:]}")
        rows = read_dumps(tmp)
    steps = args.steps - 1 - args.warm
    names = [label.split(":", 1)[1] for label, _ in rows]
    if len(rows) < 3:
        raise SystemExit(f"expected a dump per variant, found {names}")
    base = [rows[0][1], rows[-1][1]]  # the raw loop, counted first and last
    base_ir = statistics.fmean(c["Ir"] for c in base)
    print(f"torch {torch.__version__}, suite {args.suite}, {steps} counted steps per variant, "
          f"native raw loop {us:.0f} us/step, {time.time() - started:.0f} s under valgrind, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    header = "| variant | instructions/step | vs raw loop |"
    rule = "|---|---|---|"
    if args.cache_sim:
        base_cycles = statistics.fmean(cycles(c) for c in base)
        header += " D1 misses/step | estimated cycles vs raw loop |"
        rule += "---|---|"
    if args.branch_sim:
        header += " mispredicted branches/step |"
        rule += "---|"
    print(header)
    print(rule)
    for n, (label, counts) in enumerate(rows):
        name = label.split(":", 1)[1] + (" (again, last)" if n == len(rows) - 1 else "")
        line = f"| {name} | {counts['Ir'] / steps:,.0f} | {counts['Ir'] / base_ir:.3f} |"
        if args.cache_sim:
            misses = (counts.get("D1mr", 0) + counts.get("D1mw", 0)) / steps
            line += f" {misses:,.0f} | {cycles(counts) / base_cycles:.3f} |"
        if args.branch_sim:
            line += f" {(counts.get('Bcm', 0) + counts.get('Bim', 0)) / steps:,.0f} |"
        print(line)
    print(f"\nThe raw loop counted twice differs by {abs(base[0]['Ir'] / base[1]['Ir'] - 1):.2%}: "
          "the counts' own spread.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # (not cnn: its convolutions make a counted step ~50x its ~70 ms; time it instead)
    parser.add_argument("--suite", default="tiny", choices=["tiny", "clip"])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--warm", type=int, default=WARM)
    parser.add_argument("--cache-sim", action="store_true",
                        help="also simulate the caches (about twice as slow)")
    parser.add_argument("--branch-sim", action="store_true",
                        help="also simulate branch prediction (mispredictions per step)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lib", help=argparse.SUPPRESS)
    parser.add_argument("--native-us", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warm + 2:
        parser.error(f"--steps ({args.steps}) must exceed --warm ({args.warm}) by 3 or more")
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
