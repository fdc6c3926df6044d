"""Checkpoint save/load throughput: torchkit vs plain torch.save/torch.load vs raw bytes.

A ~100 MB state_dict (25 float32 tensors of 1 M elements) is written and read back
``--repeats`` times; the methods take turns in a rotating order and the medians are
compared. "raw" writes the tensors' bytes with one ``write`` each (the physical limit);
"+ fsync" variants also wait for the disk, as torchkit's durable save does. "0.1.0"
is torchkit 0.1.0's procedure (torch.save to a temporary path, fsync, rename, directory
fsync; load = torch.load + format checks), the reference for the digest's cost.

A third table times a DCP checkpoint (``format="dcp"``) in one process: its save, the
hashing of its files that the save includes, and its load with and without verifying
those digests. A fourth times how long ``CheckpointManager.save`` blocks the training loop for a
~100 MB model + Adam state, synchronous vs ``async_save=True`` (the background write
is waited for outside the timing).

    python benchmarks/bench_checkpoint.py [--repeats 9] [--mb 100] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import torchkit as tk


def raw_write(state: dict[str, torch.Tensor], path: Path, *, fsync: bool) -> None:
    with open(path, "wb") as f:
        for tensor in state.values():
            f.write(tensor.numpy().data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def raw_read(state: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "rb") as f:
        for tensor in state.values():
            f.readinto(memoryview(torch.empty_like(tensor).numpy()).cast("B"))


def torch_save_fsync(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(state, path)
    fd = os.open(path, os.O_RDWR)
    os.fsync(fd)
    os.close(fd)


def v01_save(payload: dict[str, object], path: Path) -> None:
    """torchkit 0.1.0's save_checkpoint, minus the argument checks."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    fd = os.open(tmp, os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def v01_load(path: Path) -> object:
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "torchkit.checkpoint"
    return payload


def blocking(directory: Path, repeats: int, megabytes: int) -> None:
    torch.manual_seed(0)
    width = int((megabytes * 1e6 / 4 / 3) ** 0.5)  # params + Adam's two moments
    model = torch.nn.Linear(width, width, bias=False)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt}
    managers = {
        "sync (durable)": tk.CheckpointManager(directory / "sync", keep_last=1),
        "async_save=True": tk.CheckpointManager(directory / "async", keep_last=1,
                                                async_save=True),
    }
    times: dict[str, list[float]] = {name: [] for name in managers}
    for i in range(repeats + 1):
        for name, manager in managers.items():
            start = time.perf_counter()
            manager.save(state, step=i)
            if i:
                times[name].append(time.perf_counter() - start)
            manager.wait()
    medians = {name: statistics.median(t) for name, t in times.items()}
    total = sum(p.numel() for p in model.parameters()) * 3 * 4 / 1e6
    print(f"| CheckpointManager.save, {total:.0f} MB model + Adam | blocks (s) | "
          "vs sync |")
    print("| --- | ---: | ---: |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / medians['sync (durable)']:.2f}x |")
    print()


def dcp(directory: Path, repeats: int, model: torch.nn.Module, megabytes: float) -> None:
    """One process: a DCP save and load, and what the files' digests add to each."""
    from torchkit.checkpoint import _dcp, _shards

    manager = tk.CheckpointManager(directory / "dcp", format="dcp", keep_last=1)
    steps = iter(range(1, 10**6))

    def latest() -> Path:
        path = manager.latest()
        assert path is not None
        return Path(path)

    manager.save({"model": model}, step=0)
    methods: dict[str, Callable[[], object]] = {
        "CheckpointManager(format='dcp').save (durable)":
            lambda: manager.save({"model": model}, step=next(steps)),
        "hashing its files (part of the save)":
            lambda: _shards.rank_digests(latest(), 0, skip=_dcp.META),
        "load('latest') (verify)": lambda: manager.load("latest", {"model": model}),
        "load('latest', verify=False)":
            lambda: manager.load("latest", {"model": model}, verify=False),
    }
    table("DCP checkpoint, one process", rotate(methods, repeats),
          "CheckpointManager(format='dcp').save (durable)", megabytes)


def rotate(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for name in order:  # warm-up
        methods[name]()
    for i in range(repeats):
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title: str, medians: dict[str, float], reference: str, megabytes: float) -> None:
    print(f"| {title} | median (s) | MB/s | vs {reference} |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {megabytes / seconds:.0f} | "
              f"{medians[reference] / seconds:.2f}x |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    count = args.mb // 4
    state = {f"layer{i}.weight": torch.randn(1024 * 1024) for i in range(count)}
    megabytes = count * 4 * 1024 * 1024 / 1e6
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        saves = {
            "torch.save": lambda: torch.save(state, d / "torch.pt"),
            "torch.save + fsync": lambda: torch_save_fsync(state, d / "torch_fsync.pt"),
            "0.1.0 save_checkpoint (durable)": lambda: v01_save(
                {"format": "torchkit.checkpoint", "state": state}, d / "v01.pt"),
            "tk.save_checkpoint (durable)": lambda: tk.save_checkpoint(d / "tk.pt", state),
            "tk.save_checkpoint (durable=False)": lambda: tk.save_checkpoint(
                d / "tk_fast.pt", state, durable=False),
            "raw bytes": lambda: raw_write(state, d / "raw.bin", fsync=False),
            "raw bytes + fsync": lambda: raw_write(state, d / "raw_fsync.bin", fsync=True),
        }
        print(f"torch {torch.__version__}, {megabytes:.0f} MB state_dict, "
              f"{args.repeats} rotating repeats, directory on {d}")
        print()
        table("save", rotate(saves, args.repeats), "torch.save", megabytes)
        # Loading into a model, as a resume does: the bytes end up in its parameters.
        model = torch.nn.Module()
        for i, tensor in enumerate(state.values()):
            model.register_buffer(f"layer{i}", tensor.clone())
        tk.save_checkpoint(d / "tk_model.pt", {"model": model})
        v01_save({"format": "torchkit.checkpoint", "state": {"model": model.state_dict()}},
                 d / "v01_model.pt")
        torch.save(model.state_dict(), d / "torch_model.pt")
        loads = {
            "torch.load + load_state_dict": lambda: model.load_state_dict(
                torch.load(d / "torch_model.pt", weights_only=True)),
            "0.1.0 load_checkpoint": lambda: model.load_state_dict(
                v01_load(d / "v01_model.pt")["state"]["model"]),  # type: ignore[index]
            "tk.load_checkpoint (verify)": lambda: tk.load_checkpoint(
                d / "tk_model.pt", {"model": model}),
            "tk.load_checkpoint (verify=False)": lambda: tk.load_checkpoint(
                d / "tk_model.pt", {"model": model}, verify=False),
            "raw bytes": lambda: raw_read(state, d / "raw.bin"),
        }
        table("load into a model", rotate(loads, args.repeats),
              "torch.load + load_state_dict", megabytes)
        dcp(d, args.repeats, model, megabytes)
        blocking(d, args.repeats, args.mb)


if __name__ == "__main__":
    main()
