"""Run a function on several processes with a process group, and rank-aware helpers.

:func:`launch` checks its call and runs ``fn`` here (under a launcher, or in an existing
group) or spawns one process per rank (``_spawn``), each building the default process
group from its environment (``_env``); the rank that failed first becomes a
:class:`LaunchError` (``_failures``). The rank helpers (``_ranks``) also work without a
process group.
"""

from __future__ import annotations

from torchkit.distributed._failures import LaunchError
from torchkit.distributed._launch import launch
from torchkit.distributed._ranks import (
    all_reduce_mean,
    barrier,
    get_rank,
    get_world_size,
    is_main_process,
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
