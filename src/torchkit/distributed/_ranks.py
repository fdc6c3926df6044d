"""Rank-aware helpers that also work without a process group (one process is rank 0)."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_mean", "barrier", "get_rank", "get_world_size", "is_main_process"]


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Return this process's rank in the default process group, or ``0`` without one.

    Example:
        >>> tk.get_rank()  # no process group: a single process is rank 0
        0
    """
    return dist.get_rank() if _group_ready() else 0


def get_world_size() -> int:
    """Return the number of processes in the default process group, or ``1`` without one.

    Example:
        >>> tk.get_world_size()
        1
    """
    return dist.get_world_size() if _group_ready() else 1


def is_main_process() -> bool:
    """Return ``True`` on rank 0 (and without a process group), the rank that logs and saves.

    Example:
        >>> if tk.is_main_process():
        ...     print("only rank 0 prints this")
        only rank 0 prints this
    """
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank of the default process group gets here; no-op without one.

    Example:
        >>> tk.barrier()  # returns at once without a process group
    """
    if _group_ready():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Return the element-wise mean of ``tensor`` over all ranks of the default group.

    ``tensor`` itself is never changed: under a process group the result is a new tensor,
    detached from autograd; without one (or with one rank's worth of work) ``tensor``
    itself is returned. Every rank must call it with a tensor of the same shape and dtype.

    Args:
        tensor: A floating-point (or complex) tensor on the device the backend works on
            (CPU for gloo, this rank's GPU for nccl).

    Returns:
        The mean over ranks.

    Raises:
        TypeError: If ``tensor`` is not a floating-point or complex tensor.

    Example:
        >>> tk.all_reduce_mean(torch.tensor([1.0, 3.0]))  # one process: unchanged
        tensor([1., 3.])
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_mean(tensor) needs a torch.Tensor, got "
                        f"{type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(
            f"all_reduce_mean needs a floating-point tensor (a mean of integers is not an "
            f"integer), got dtype {tensor.dtype}; convert it first, e.g. tensor.float()"
        )
    if not _group_ready():
        return tensor
    result = tensor.detach().clone()
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result.div_(dist.get_world_size())
