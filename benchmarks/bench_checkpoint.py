"""Checkpoint save/load throughput: torchkit vs plain torch.save/torch.load vs raw bytes.

A ~100 MB state_dict (25 float32 tensors of 1 M elements) is written and read back
``--repeats`` times; the methods take turns in a rotating order and the medians are
compared. "raw" writes the tensors' bytes with one ``write`` each (the physical limit);
"+ fsync" variants also wait for the disk, as torchkit's durable save does.

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
        loads = {
            "torch.load (weights_only)": lambda: torch.load(d / "torch.pt", weights_only=True),
            "tk.load_checkpoint": lambda: tk.load_checkpoint(d / "tk.pt"),
            "raw bytes": lambda: raw_read(state, d / "raw.bin"),
        }
        table("load", rotate(loads, args.repeats), "torch.load (weights_only)", megabytes)


if __name__ == "__main__":
    main()
