"""Run a function on several processes with a process group, and rank-aware helpers."""

from __future__ import annotations

from torchkit.distributed._launch import (
    LaunchError,
    all_reduce_mean,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
    launch,
)

__all__ = [
    "LaunchError",
    "all_reduce_mean",
    "barrier",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "launch",
]
