"""The GPU check: what only a CUDA machine can show, in one script (< 8 minutes on one GPU).

Checks (each prints ok / FAILED with its numbers):

1. ``amp16``: ``precision="16"`` pieces with a GradScaler: an overflow skips the step
   (weights untouched, scale backed off, counted), gradients are unscaled exactly once
   per optimizer step, and clipping sees the unscaled gradients.
2. ``bf16``: ``Trainer(precision="bf16")`` trains under bf16 autocast and learns.
3. ``nccl``: ``tk.launch(fn, nprocs=1, backend="nccl")``: an all-reduce and a ``fit``.
4. ``gpu_ckpt_to_cpu``: a checkpoint saved from CUDA tensors loads into a CPU model.
5. ``async_snapshot``: ``CheckpointManager(async_save=True)`` snapshots CUDA state into
   pinned host memory; changing the weights right after ``save`` does not change the file.
6. ``pinned_non_blocking``: batches from a ``pin_memory=True`` DataLoader move with
   ``non_blocking=True`` and arrive intact.
7. ``no_sync``: a whole ``fit`` (progress bar on, fused-optimizer skip check too) under
   ``torch.cuda.set_sync_debug_mode("error")``; only the documented reads at log time
   (the progress bar's loss, the bulk loss check, the epoch's loss, evaluation) are let
   through, and they are counted.
8. ``resnet18``: images/s of a hand-written loop vs ``Trainer`` on ResNet-18, synthetic
   224 px data, channels_last, bf16 autocast, paired interleaved runs: Trainer >= 0.99x.

    python benchmarks/gpu_check.py              # everything (needs CUDA; torchvision for 8)
    python benchmarks/gpu_check.py --only amp16,no_sync
    python benchmarks/gpu_check.py --list       # no GPU needed: names the checks
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import torchkit as tk

CUDA = torch.device("cuda")


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def data(n: int = 16, device: torch.device | str = "cuda", seed: int = 0) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 32, generator=g).to(device),
             torch.randint(0, 10, (64,), generator=g).to(device)) for _ in range(n)]


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


# -- 1. float16 with a GradScaler --------------------------------------------------------


def check_amp16() -> str:
    model = small_model().to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    unscales = 0
    real_unscale = scaler.unscale_

    def counting_unscale(optimizer: torch.optim.Optimizer) -> None:
        nonlocal unscales
        unscales += 1
        real_unscale(optimizer)

    scaler.unscale_ = counting_unscale  # type: ignore[method-assign]
    accum = tk.GradAccumulator(opt, 2, scaler=scaler, max_norm=1.0)
    batches = data(8)
    # An overflow: the second window's loss is inf.
    before = [p.detach().clone() for p in model.parameters()]
    for i, (x, y) in enumerate(batches[:4]):
        with accum.accumulate(), torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        if i == 1:
            loss = loss * math.inf
        accum.backward(loss, batch_size=len(x))
        if i == 1:
            check(all(torch.equal(p, b) for p, b in zip(model.parameters(), before)),
                  "an overflowing window changed the weights")
    check(accum.skipped_steps == 1, f"skipped_steps={accum.skipped_steps}, expected 1")
    check(scaler.get_scale() == 2.0**11, f"scale {scaler.get_scale()} did not back off once")
    check(unscales == accum.num_steps == 2, f"unscale_ ran {unscales}x in 2 optimizer steps")
    # Clipping after unscaling: the reported norm is the unscaled one (fp32 reference).
    ref = small_model().to(CUDA)
    ref.load_state_dict(model.state_dict())
    x, y = batches[4]
    with accum.accumulate(), torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    accum.backward(loss, batch_size=len(x))
    with accum.accumulate(), torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(batches[5][0]), batches[5][1])
    accum.backward(loss, batch_size=len(x))
    with torch.autocast("cuda", dtype=torch.float16):
        ref_loss = (F.cross_entropy(ref(x), y) + F.cross_entropy(ref(batches[5][0]),
                                                                batches[5][1])) / 2
    ref_loss.float().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), math.inf)
    got = accum.last_grad_norm
    check(got is not None, "no last_grad_norm")
    assert got is not None
    rel = abs(float(got) - float(ref_norm)) / float(ref_norm)
    check(rel < 2e-2, f"clip saw norm {float(got):.4g}, unscaled is {float(ref_norm):.4g}")
    return (f"overflow skipped (scale 4096->2048), unscale_ once per step, clip norm "
            f"{float(got):.4g} vs unscaled {float(ref_norm):.4g}")


# -- 2. bf16 ------------------------------------------------------------------------------


def check_bf16() -> str:
    model = small_model()
    dtypes: set[torch.dtype] = set()
    model[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                         device="cuda", precision="bf16", progress=False)
    batches = data(16)
    history = trainer.fit(batches, batches, epochs=3)
    losses = history["train_loss"]
    check(dtypes == {torch.bfloat16}, f"forward ran in {dtypes}, not bf16")
    check(all(math.isfinite(v) for v in losses) and losses[-1] < losses[0],
          f"train_loss {losses} does not fall")
    return f"bf16 forward, train_loss {losses[0]:.3f} -> {losses[-1]:.3f}"


# -- 3. nccl with one process ----------------------------------------------------------------


def _nccl_worker() -> dict[str, Any]:
    import torch.distributed as dist

    t = torch.ones(3, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(t)
    model = small_model()
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                         device="cuda", progress=False)
    history = trainer.fit(data(4), epochs=1)
    return {"backend": dist.get_backend(), "world": dist.get_world_size(),
            "sum": t.tolist(), "loss": history["train_loss"][-1]}


def check_nccl() -> str:
    [result] = tk.launch(_nccl_worker, nprocs=1, backend="nccl")
    check(result["backend"] == "nccl" and result["world"] == 1, f"got {result}")
    check(result["sum"] == [1.0, 1.0, 1.0] and math.isfinite(result["loss"]), f"got {result}")
    return f"backend nccl, world 1, fit loss {result['loss']:.3f}"


# -- 4. and 5. checkpoints ---------------------------------------------------------------------


def trained_on_gpu() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = small_model().to(CUDA)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in data(3):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def check_gpu_ckpt_to_cpu() -> str:
    model, opt = trained_on_gpu()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu.pt"
        tk.save_checkpoint(path, {"model": model, "optimizer": opt}, step=3)
        cpu_model = small_model()
        cpu_opt = torch.optim.Adam(cpu_model.parameters(), lr=1e-2)
        tk.load_checkpoint(path, {"model": cpu_model, "optimizer": cpu_opt})
    for p, q in zip(cpu_model.parameters(), model.parameters()):
        check(p.device.type == "cpu" and torch.equal(p, q.cpu()), "weights differ on the CPU")
    state = next(iter(cpu_opt.state.values()))
    check(state["exp_avg"].device.type == "cpu", "optimizer state not on the CPU")
    return "model and Adam state saved on cuda, loaded on cpu, equal"


def check_async_snapshot() -> str:
    model, opt = trained_on_gpu()
    pinned: list[bool] = []
    real_empty = torch.empty

    def recording_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("pin_memory"):
            pinned.append(True)
        return real_empty(*args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp:
        manager = tk.CheckpointManager(tmp, async_save=True)
        expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.empty = recording_empty  # type: ignore[assignment]
        try:
            manager.save({"model": model, "optimizer": opt}, step=1)
        finally:
            torch.empty = real_empty  # type: ignore[assignment]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # right after save: the snapshot must not see this
        manager.wait()
        fresh = small_model()
        latest = manager.latest()
        check(latest is not None, "no checkpoint written")
        tk.load_checkpoint(latest, {"model": fresh})  # type: ignore[arg-type]
    for k, v in fresh.state_dict().items():
        check(torch.equal(v, expected[k]), f"{k} changed after save: not a snapshot")
    check(len(pinned) > 0, "the snapshot did not use pinned host memory")
    return f"snapshot in {len(pinned)} pinned buffers; later in-place changes not in the file"


# -- 6. pinned, non-blocking transfers ----------------------------------------------------------


def check_pinned_non_blocking() -> str:
    from torch.utils.data import DataLoader, TensorDataset

    from torchkit._batches import to_device

    x, y = torch.randn(256, 32), torch.randint(0, 10, (256,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, pin_memory=True)
    seen: list[bool] = []
    real_to = torch.Tensor.to

    def recording_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen.append(bool(kwargs.get("non_blocking")) and self.is_pinned())
        return real_to(self, *args, **kwargs)

    moved = []
    torch.Tensor.to = recording_to  # type: ignore[method-assign]
    try:
        for batch in loader:
            moved.append(to_device(batch, CUDA))
    finally:
        torch.Tensor.to = real_to  # type: ignore[method-assign]
    torch.cuda.synchronize()
    check(seen and all(seen), f"non_blocking pinned copies: {seen}")
    check(torch.equal(torch.cat([b[0] for b in moved]).cpu(), x), "data changed in transit")
    return f"{len(seen)} pinned copies, all non_blocking, data intact"


# -- 7. no per-step synchronisation --------------------------------------------------------------


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


def allow_reads(obj: Any, names: list[str], counter: dict[str, int]) -> None:
    """Let the documented read points of ``obj`` synchronise (and count them)."""
    for name in names:
        real = getattr(obj, name)

        def allowed(*args: Any, _real: Callable[..., Any] = real, _name: str = name,
                    **kwargs: Any) -> Any:
            counter[_name] = counter.get(_name, 0) + 1
            with sync_debug("default"):
                return _real(*args, **kwargs)

        setattr(obj, name, allowed)


def check_no_sync() -> str:
    reads: dict[str, int] = {}
    steps = 0
    for fused in (False, True):
        model = small_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
        trainer = tk.Trainer(model, opt, F.cross_entropy, device="cuda", progress=True,
                             accumulate=2, max_grad_norm=1.0 if fused else None)
        if fused:  # the pieces' default non-finite check, on the device with a fused optimizer
            trainer.accumulator.skip_nonfinite = True
            trainer.accumulator._skip_on_device = True
        allow_reads(trainer._ledger, ["running", "nonfinite", "close_epoch"], reads)
        allow_reads(trainer, ["evaluate"], reads)
        if fused:  # its first window is read (fused SGD's first step; see the docstring)
            allow_reads(trainer.accumulator, ["_can_skip_on_device"], reads)
        batches = data(256)  # already on the GPU: no host-to-device copy per step
        with sync_debug("error"):
            trainer.fit(batches, batches[:8], epochs=2)
        steps += 2 * len(batches)
    return f"{steps} batches under sync debug 'error'; documented reads let through: {reads}"


# -- 8. ResNet-18 throughput ---------------------------------------------------------------------


def check_resnet18(reps: int = 5, steps: int = 60, warm: int = 10) -> str:
    from torchvision.models import resnet18

    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randn(128, 3, 224, 224, generator=g).to(CUDA).contiguous(
        memory_format=torch.channels_last), torch.randint(0, 1000, (128,), generator=g).to(CUDA))
        for _ in range(4)]
    batches = [pool[i % len(pool)] for i in range(steps)]

    def make() -> nn.Module:
        torch.manual_seed(0)
        return resnet18(weights=None).to(CUDA, memory_format=torch.channels_last)

    def raw() -> float:
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        t0 = 0.0
        for i, (x, y) in enumerate(batches):
            if i == warm:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        return (steps - warm) * 128 / (time.perf_counter() - t0)

    def trainer() -> float:
        model = make()
        marks: dict[str, float] = {}

        class Mark(tk.Callback):
            def on_train_batch_start(self, t: Any, batch: Any, batch_idx: int) -> None:
                if batch_idx == warm:
                    torch.cuda.synchronize()
                    marks["t0"] = time.perf_counter()

        t = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                       F.cross_entropy, device="cuda", precision="bf16", progress=False,
                       callbacks=[Mark()])
        t.fit(batches, epochs=1)
        torch.cuda.synchronize()  # fit's epoch end has read the loss: the queue is drained
        return (steps - warm) * 128 / (time.perf_counter() - marks["t0"])

    raw(), trainer()  # warm-up: cudnn autotuning, allocator
    ratios, raw_ips, tk_ips = [], [], []
    for _ in range(reps):
        a, b, c = raw(), trainer(), raw()
        raw_ips += [a, c]
        tk_ips.append(b)
        ratios.append(b / math.sqrt(a * c))
    ratio = statistics.median(ratios)
    table = (f"\n| variant | images/s (median) |\n|---|---|\n"
             f"| raw loop | {statistics.median(raw_ips):.0f} |\n"
             f"| Trainer(precision='bf16') | {statistics.median(tk_ips):.0f} |\n"
             f"ratio {ratio:.3f} (min-max {min(ratios):.3f}-{max(ratios):.3f})")
    check(ratio >= 0.99, f"Trainer at {ratio:.3f}x the raw loop{table}")
    return table


CHECKS: dict[str, Callable[[], str]] = {
    "amp16": check_amp16,
    "bf16": check_bf16,
    "nccl": check_nccl,
    "gpu_ckpt_to_cpu": check_gpu_ckpt_to_cpu,
    "async_snapshot": check_async_snapshot,
    "pinned_non_blocking": check_pinned_non_blocking,
    "no_sync": check_no_sync,
    "resnet18": check_resnet18,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated check names (default: all)")
    parser.add_argument("--list", action="store_true", help="name the checks and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(CHECKS))
        return 0
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"torchkit {tk.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    failed = 0
    for name in names:
        start = time.perf_counter()
        try:
            detail = CHECKS[name]()
            status = "ok"
        except Exception as error:  # report every check, then fail at the end
            failed += 1
            status, detail = "FAILED", f"{type(error).__name__}: {error}"
            traceback.print_exc()
        print(f"[{status}] {name} ({time.perf_counter() - start:.1f} s): {detail}", flush=True)
    print(f"{len(names) - failed}/{len(names)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
