"""Per-step overhead on pre-built batches: torchkit vs the hand-written loop (and the peers).

Every variant trains a fresh copy of the same model (same seed, SGD lr=0.01, cross-entropy)
over the same pre-built batches served by ``DataLoader(list_of_batches, batch_size=None)``
(no collation), one CPU thread. Steady state: the clock runs from step ``warmup`` to the
last step, marked inside the loop (callbacks / hooks for the frameworks). Repetitions are
paired and interleaved: ``raw, A, raw, B, raw, ...`` with the order rotated each repetition;
each variant is compared with the geometric mean of the raw runs beside it, and the table
shows the median ratio and its min-max over repetitions.

Suites (``--suite``):

* ``tiny``: MLP 32-64-10, batch 64, 2000 steps: ``Trainer`` with its defaults (progress
  bar on, drawn to /dev/null), ``Trainer(progress=False)``, ``GradAccumulator(opt, 1)`` in
  a raw loop (its default non-finite check on).
* ``clip``: ``accumulate=4, max_grad_norm=1``: the Trainer and the pieces against the
  hand-written ``loss / 4`` + ``clip_grad_norm_`` loop (the baseline of this suite).
* ``cnn``: the compute-bound check, a small CNN on 3x32x32, batch 128.
* ``peers``: the tiny workload with Lightning (lean: no bar, logger, checkpoint or
  summary), Ignite ``create_supervised_trainer`` and Accelerate (``prepare`` +
  ``backward``), each only when installed; missing ones are named in the output.
* ``compile``: small-CNN steps/s, ``Trainer`` eager vs ``Trainer(compile=True)`` (the
  compile time is outside the timed window).

    python benchmarks/bench_overhead.py --suite tiny --reps 15
    python benchmarks/bench_overhead.py --suite all --reps 9
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import torchkit as tk

Batches = list[tuple[torch.Tensor, torch.Tensor]]


CLOCK = perf_counter  # --clock cpu: time.thread_time, steadier on a shared machine


class Marks:
    """Where the timed window starts and ends (set from inside each loop)."""

    def __init__(self, warm: int, last: int) -> None:
        self.warm, self.last = warm, last
        self.t0 = self.t1 = 0.0
        self.blocks: list[float] = []  # clock at every BLOCK-th step of the window

    def at(self, i: int) -> None:
        if i >= self.warm and (i - self.warm) % BLOCK == 0:
            self.blocks.append(CLOCK())
        if i == self.warm:
            self.t0 = self.blocks[-1]
        elif i == self.last:
            self.t1 = CLOCK()

    def best(self) -> float:
        """Steps/s of the fastest block: what a run does when nothing preempts it."""
        return BLOCK / min(b - a for a, b in zip(self.blocks, self.blocks[1:]))


BLOCK = 50  # steps per block for --stat best
STAT = "median"


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


WORKLOADS = {  # name: (model factory, input shape, batch size, steps, warm-up steps)
    "tiny": (make_mlp, (32,), 64, 2000, 200),
    "cnn": (make_cnn, (3, 32, 32), 128, 150, 15),
}


def make_batches(workload: str) -> Batches:
    _, shape, size, steps, _ = WORKLOADS[workload]
    g = torch.Generator().manual_seed(1)
    pool = [(torch.randn((size, *shape), generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(min(steps, 64))]
    return [pool[i % len(pool)] for i in range(steps)]


def loader(batches: Batches) -> DataLoader[Any]:
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=0)  # type: ignore[arg-type]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01)


# -- hand-written loops ----------------------------------------------------------------


def raw(model: nn.Module, batches: Batches, marks: Marks) -> None:
    opt = sgd(model)
    model.train()
    for i, (x, y) in enumerate(loader(batches)):
        marks.at(i)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def raw_accum4_clip(model: nn.Module, batches: Batches, marks: Marks) -> None:
    opt = sgd(model)
    params = list(model.parameters())
    model.train()
    for i, (x, y) in enumerate(loader(batches)):
        marks.at(i)
        loss = F.cross_entropy(model(x), y) / 4
        loss.backward()
        if (i + 1) % 4 == 0:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


def pieces(model: nn.Module, batches: Batches, marks: Marks, *, steps: int = 1,
           max_norm: float | None = None) -> None:
    accum = tk.GradAccumulator(sgd(model), steps, max_norm=max_norm)
    model.train()
    for i, (x, y) in enumerate(loader(batches)):
        marks.at(i)
        with accum.accumulate():
            loss = F.cross_entropy(model(x), y)
        accum.backward(loss, batch_size=len(x))


def trainer(model: nn.Module, batches: Batches, marks: Marks, **options: Any) -> None:
    class Mark(tk.Callback):  # the hooks cost what users' hooks cost: counted in
        def on_train_batch_start(self, trainer: Any, batch: Any, batch_idx: int) -> None:
            marks.at(batch_idx)

    t = tk.Trainer(model, sgd(model), F.cross_entropy, device="cpu", callbacks=[Mark()],
                   **options)
    t.fit(loader(batches), epochs=1)


def compiled_trainer(model: nn.Module, batches: Batches, marks: Marks) -> None:
    torch._dynamo.reset()  # a fresh model each run: no recompile limit, compiled in warm-up
    trainer(model, batches, marks, compile=True)


# -- the peers (imported only when installed) --------------------------------------------


def lightning_lean(model: nn.Module, batches: Batches, marks: Marks) -> None:
    import tempfile

    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            marks.at(batch_idx)
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return sgd(self.net)

    with tempfile.TemporaryDirectory() as root:
        L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0,
                  default_root_dir=root).fit(Lit(), loader(batches))


def ignite(model: nn.Module, batches: Batches, marks: Marks) -> None:
    from ignite.engine import Events, create_supervised_trainer

    engine = create_supervised_trainer(model, sgd(model), F.cross_entropy)
    engine.add_event_handler(Events.ITERATION_STARTED,
                             lambda e: marks.at(e.state.iteration - 1))
    engine.run(loader(batches), max_epochs=1)


def accelerate(model: nn.Module, batches: Batches, marks: Marks) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, opt, data = acc.prepare(model, sgd(model), loader(batches))
    model.train()
    for i, (x, y) in enumerate(data):
        marks.at(i)
        opt.zero_grad(set_to_none=True)
        acc.backward(F.cross_entropy(model(x), y))
        opt.step()
    acc.free_memory()


PEERS = {"lightning (lean)": ("lightning", lightning_lean),
         "ignite create_supervised_trainer": ("ignite", ignite),
         "accelerate (prepare + backward)": ("accelerate", accelerate)}

Variant = Callable[[nn.Module, Batches, Marks], None]


def suite(name: str) -> tuple[str, str, dict[str, Variant], list[str]]:
    """(workload, baseline name, {variant: fn} with the baseline first, notes)."""
    notes: list[str] = []
    if name == "tiny":
        return "tiny", "raw loop", {
            "raw loop": raw,
            "Trainer (defaults, progress bar on)": trainer,
            "Trainer(progress=False)": lambda m, b, k: trainer(m, b, k, progress=False),
            "GradAccumulator(opt, 1) in a raw loop": pieces,
        }, notes
    if name == "clip":
        return "tiny", "raw loop (loss/4, clip_grad_norm_)", {
            "raw loop (loss/4, clip_grad_norm_)": raw_accum4_clip,
            "Trainer(accumulate=4, max_grad_norm=1)":
                lambda m, b, k: trainer(m, b, k, accumulate=4, max_grad_norm=1.0),
            "GradAccumulator(opt, 4, max_norm=1)":
                lambda m, b, k: pieces(m, b, k, steps=4, max_norm=1.0),
        }, notes
    if name == "cnn":
        return "cnn", "raw loop", {"raw loop": raw, "Trainer (defaults)": trainer,
                                   "GradAccumulator(opt, 1) in a raw loop": pieces}, notes
    if name == "compile":
        return "cnn", "Trainer (eager)", {
            "Trainer (eager)": trainer,
            "Trainer(compile=True)": compiled_trainer,
        }, notes
    if name == "peers":
        variants: dict[str, Variant] = {"raw loop": raw, "Trainer (defaults)": trainer,
                                        "Trainer(progress=False)":
                                            lambda m, b, k: trainer(m, b, k, progress=False)}
        for label, (module, fn) in PEERS.items():
            if importlib.util.find_spec(module) is None:
                notes.append(f"skipped {label}: `{module}` is not installed "
                             "(pip install lightning pytorch-ignite accelerate)")
            else:
                variants[label] = fn
        return "tiny", "raw loop", variants, notes
    raise SystemExit(f"unknown suite {name!r}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Progress bars and framework chatter go to /dev/null, for every variant alike."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
            contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_once(fn: Variant, workload: str, batches: Batches, steps: int) -> float:
    factory, _, _, _, warm = WORKLOADS[workload]
    marks = Marks(warm, steps - 1)
    model = factory()
    gc.collect()
    torch.set_num_threads(1)
    with quiet():
        fn(model, batches[:steps], marks)
    if not marks.t1 > marks.t0 > 0:
        raise RuntimeError("the timing marks were not hit")
    if STAT == "best" and len(marks.blocks) > 2:
        return marks.best()
    return (steps - 1 - warm) / (marks.t1 - marks.t0)


def measure(name: str, reps: int) -> str:
    workload, base, variants, notes = suite(name)
    batches = make_batches(workload)
    steps = len(batches)
    others = [v for v in variants if v != base]
    for v in variants:  # untimed first round: lazy imports, compile caches, allocator
        run_once(variants[v], workload, batches, max(WORKLOADS[workload][4] + 5, steps // 5))
    ratios: dict[str, list[float]] = {v: [] for v in others}
    base_sps: list[float] = []
    for r in range(reps):
        order = others[r % len(others):] + others[:r % len(others)]
        prev = run_once(variants[base], workload, batches, steps)
        base_sps.append(prev)
        for v in order:
            cur = run_once(variants[v], workload, batches, steps)
            nxt = run_once(variants[base], workload, batches, steps)
            base_sps.append(nxt)
            ratios[v].append(cur / (prev * nxt) ** 0.5)
            prev = nxt
        print(f"{name}: rep {r + 1}/{reps}", file=sys.stderr, flush=True)
    us = 1e6 / statistics.median(base_sps)
    lines = [f"### suite `{name}` ({workload}, {steps} steps, {reps} paired repetitions; "
             f"baseline {us:.0f} us/step here)", "",
             f"| variant | steps/s vs {base} (median) | min-max | extra us/step |",
             "|---|---|---|---|", f"| {base} | 1.00 | - | 0 |"]
    for v in others:
        med = statistics.median(ratios[v])
        lines.append(f"| {v} | {med:.3f} | {min(ratios[v]):.2f}-{max(ratios[v]):.2f} | "
                     f"{us / med - us:+.1f} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="tiny",
                        choices=["tiny", "clip", "cnn", "peers", "compile", "all"])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this thread's CPU time, which other programs on a busy "
                        "machine disturb less than the wall clock")
    parser.add_argument("--stat", choices=["median", "best"], default="median",
                        help="per run: steps/s over the whole timed window, or of its "
                        f"fastest {BLOCK}-step block (robust to preemption by other programs)")
    args = parser.parse_args()
    global CLOCK, STAT
    CLOCK = time.thread_time if args.clock == "cpu" else perf_counter
    STAT = args.stat
    torch.set_num_threads(1)
    names = ["tiny", "clip", "cnn", "peers", "compile"] if args.suite == "all" else [args.suite]
    print(f"torch {torch.__version__}, torchkit {tk.__version__}, 1 thread, "
          f"{args.clock} clock, per-run statistic {args.stat}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    for name in names:
        print(measure(name, args.reps), flush=True)
        print()


if __name__ == "__main__":
    main()
