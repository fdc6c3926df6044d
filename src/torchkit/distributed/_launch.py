"""launch: check the call, then run ``fn`` here (under a launcher or a group) or spawn ranks."""

from __future__ import annotations

import logging
import math
import numbers
import os
import pickle
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

from torchkit.distributed._env import env_from_slurm, init_from_env
from torchkit.distributed._spawn import PortTaken, check_not_reimported, spawn

__all__ = ["launch"]

_log = logging.getLogger(__name__)

_BACKENDS = ("auto", "gloo", "nccl")
_PORT_ATTEMPTS = 3  # another process may take the free port before rank 0 listens on it


def launch(
    fn: Callable[..., Any],
    *args: Any,
    nprocs: int | None = None,
    backend: Literal["auto", "gloo", "nccl"] = "auto",
    timeout_s: float = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``nprocs`` processes of this machine, one per rank.

    Each process is started with the ``"spawn"`` method (safe with CUDA), gets the
    environment variables ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` (a free port), and runs ``fn`` with the default
    process group initialised (with nccl, on GPU ``LOCAL_RANK``) and destroyed after.
    Unless ``OMP_NUM_THREADS`` is set, each process uses ``cpu_count // nprocs`` threads.

    When a rank raises, or dies without reporting (killed, crashed, ``os._exit``), the
    other ranks are sent SIGTERM, then SIGKILL after a few seconds, every process is
    reaped, and :class:`LaunchError` is raised with that rank's traceback.

    **Under a launcher** (``torchrun``, torch elastic, ``srun torchrun``: ``RANK`` and
    ``WORLD_SIZE`` are set) nothing is spawned: the group is initialised from the
    environment, ``fn`` runs once in this process and ``[this rank's result]`` is
    returned; ``nprocs`` is ignored. If a process group is already initialised, ``fn``
    just runs in this process and ``[its result]`` is returned. So one script runs on a
    laptop with ``python train.py`` and on many machines with ``torchrun``.

    Under torchrun (``TORCHELASTIC_RESTART_COUNT`` set) the group is built on the
    rendezvous store with every key prefixed by the run id and the restart count, so a
    restarted attempt (``--max-restarts``) never reads the previous attempt's addresses
    (see pytorch/pytorch#167288). Under SLURM without torchrun (``srun python
    train.py``), when ``MASTER_ADDR`` and ``MASTER_PORT`` are exported, ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` default to ``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NTASKS_PER_NODE``; variables already
    set (by torchrun) win.

    Args:
        fn: A module-level function (picklable by reference; not a lambda, a nested
            function or one defined in an interactive session).
        *args: Positional arguments for ``fn``; they must be picklable.
        nprocs: The number of processes; ``None`` means one per GPU when CUDA is
            available, else one per CPU core.
        backend: ``"nccl"`` (GPUs), ``"gloo"`` (CPU) or ``"auto"``: nccl when CUDA is
            available and there is a GPU for every process, else gloo.
        timeout_s: How long a rendezvous or collective may wait for the other ranks
            before it raises (so a rank stuck waiting on a dead peer fails).
        **kwargs: Keyword arguments for ``fn``; they must be picklable.

    Returns:
        Each rank's return value, in rank order (return values must be picklable).

    Raises:
        TypeError: If ``fn``, its arguments or ``nprocs`` have the wrong type.
        ValueError: If ``nprocs``, ``backend`` or ``timeout_s`` is out of range.
        RuntimeError: If torch.distributed is not available in this build of torch.
        LaunchError: If a rank raised or died.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> tk.launch(tk.get_world_size)  # a group exists: fn runs here, once
        [1]
        >>> dist.destroy_process_group()
    """
    _check_fn(fn)
    _check_options(nprocs, backend, timeout_s)
    if not dist.is_available():
        raise RuntimeError(
            "launch needs torch.distributed, which this build of torch does not include; "
            "install a torch build with distributed support"
        )
    if dist.is_initialized():
        return [fn(*args, **kwargs)]
    env_from_slurm()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return [_run_under_launcher(fn, args, kwargs, backend=backend, timeout_s=timeout_s)]
    check_not_reimported()
    if nprocs is None:
        nprocs = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    chosen = _choose_backend(backend, nprocs)
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        _log.info("launching %d processes (backend %s, port %d)", nprocs, chosen, port)
        try:
            return spawn(fn, args, kwargs, nprocs=nprocs, backend=chosen, port=port,
                          timeout_s=timeout_s)
        except PortTaken:
            _log.info("port %d was taken before rank 0 listened on it (try %d of %d)",
                      port, attempt, _PORT_ATTEMPTS)
    raise RuntimeError(  # pragma: no cover - needs _PORT_ATTEMPTS races in a row
        f"could not find a free port for the process group after {_PORT_ATTEMPTS} tries"
    )


def _check_fn(fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise TypeError(f"fn must be a callable, got {type(fn).__name__}")
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not hasattr(main, "__file__"):
        raise TypeError(
            f"fn must be a module-level function that the worker processes can import, got "
            f"{fn!r} defined in an interactive session; move it into a .py file and import it"
        )
    try:
        pickle.dumps(fn)
    except Exception as error:
        raise TypeError(
            f"fn must be a module-level function (picklable by reference), got {fn!r}, which "
            f"cannot be pickled ({error}); lambdas and nested functions cannot: define it "
            f"at the top level of a module"
        ) from None


def _check_options(nprocs: int | None, backend: str, timeout_s: float) -> None:
    if nprocs is not None and (isinstance(nprocs, bool) or not isinstance(nprocs, int)):
        raise TypeError(f"nprocs must be an int or None, got {type(nprocs).__name__}")
    errors = []
    if nprocs is not None and nprocs < 1:
        errors.append(f"nprocs must be >= 1 or None, got {nprocs}")
    if backend not in _BACKENDS:
        errors.append(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if isinstance(timeout_s, bool) or not (
        isinstance(timeout_s, numbers.Real) and 0 < timeout_s < math.inf
    ):
        errors.append(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _choose_backend(backend: str, nprocs: int) -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if 0 < nprocs <= gpus else "gloo"
    if backend == "nccl" and nprocs > gpus:
        raise ValueError(
            f"backend='nccl' needs one CUDA device per process: nprocs={nprocs}, got {gpus} "
            f"CUDA devices; use backend='gloo' (CPU) or fewer processes"
        )
    return backend


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_under_launcher(fn: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: Mapping[str, Any], *, backend: str, timeout_s: float) -> Any:
    if backend == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if local_rank < gpus else "gloo"
    _log.debug("RANK and WORLD_SIZE are set: running fn in this process (backend %s)", backend)
    init_from_env(backend, timeout_s)
    try:
        result = fn(*args, **kwargs)
        dist.barrier()  # see _spawn._worker: no rank tears the group down under another's feet
        return result
    finally:
        dist.destroy_process_group()
