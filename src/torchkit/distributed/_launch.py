"""Run a function on several processes with a process group, and rank-aware helpers."""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import pickle
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = [
    "LaunchError",
    "all_reduce_mean",
    "barrier",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "launch",
]

_log = logging.getLogger(__name__)

_BACKENDS = ("auto", "gloo", "nccl")
_GRACE_S = 5.0  # between SIGTERM and SIGKILL, and for a finished rank to exit
_PORT_ATTEMPTS = 3  # another process may take the free port before rank 0 listens on it
# torch.distributed errors a rank raises because *another* rank failed first.
_COLLATERAL = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
# ...and what such errors say when they come as a plain RuntimeError.
_PEER_TROUBLE = re.compile(r"[Cc]onnection (reset|closed|refused)|[Bb]roken pipe|by peer|"
                           r"[Tt]imed out|[Tt]imeout|Socket|ECONNRESET|EPIPE")


class LaunchError(RuntimeError):
    """A rank of :func:`launch` raised an exception or died; the other ranks were stopped.

    The message holds the rank's exception type, message and formatted traceback.

    Attributes:
        rank: The rank that failed first.
        exception_type: The name of its exception's type, or ``None`` if it died
            without reporting one (killed, crashed, or ``os._exit``).
        exitcode: Its exit code when it died without reporting (negative: the signal
            number that killed it), else ``None``.
        traceback: Its formatted traceback (empty if it died without reporting).

    Example:
        >>> error = tk.LaunchError("rank 1 of 2 failed", rank=1, exception_type="ValueError")
        >>> isinstance(error, RuntimeError), error.rank, error.exception_type
        (True, 1, 'ValueError')
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int,
        exception_type: str | None = None,
        exitcode: int | None = None,
        traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.exception_type = exception_type
        self.exitcode = exitcode
        self.traceback = traceback


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
    _env_from_slurm()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return [_run_under_launcher(fn, args, kwargs, backend=backend, timeout_s=timeout_s)]
    _check_not_reimported()
    if nprocs is None:
        nprocs = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    chosen = _choose_backend(backend, nprocs)
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        port = _free_port()
        _log.info("launching %d processes (backend %s, port %d)", nprocs, chosen, port)
        try:
            return _spawn(fn, args, kwargs, nprocs=nprocs, backend=chosen, port=port,
                          timeout_s=timeout_s)
        except _PortTaken:
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


_GUARD_HINT = (
    'put the code that calls launch under `if __name__ == "__main__":` in your script: '
    "each worker process is started with the 'spawn' method and imports your script "
    "again, and without the guard that import calls launch once more"
)


def _check_not_reimported() -> None:
    """Refuse a launch from a worker's re-import of a script without a ``__main__`` guard."""
    main = sys.modules.get("__main__")
    if multiprocessing.parent_process() is not None and \
            getattr(main, "__name__", None) == "__mp_main__":
        raise RuntimeError(f"launch was called while a worker process imported the main "
                           f"script: {_GUARD_HINT}")


def _main_lacks_guard() -> bool:
    """Whether the main script has no ``if __name__ == "__main__":`` guard (best effort)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError):
        return False
    return "__main__" not in source


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


def _init_from_env(backend: str, timeout_s: float) -> None:
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)  # before init, so NCCL binds each rank to its GPU
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _elastic_store(timeout)
    if store is None:
        dist.init_process_group(backend, init_method="env://", device_id=device_id,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]),
                                device_id=device_id, timeout=timeout)


_SLURM = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID",
          "LOCAL_WORLD_SIZE": "SLURM_NTASKS_PER_NODE"}


def _env_from_slurm() -> None:
    """``srun python train.py``: take the ranks from SLURM when MASTER_ADDR/PORT are set."""
    if "RANK" in os.environ or not all(
            v in os.environ for v in ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR",
                                      "MASTER_PORT")):
        return
    for name, slurm in _SLURM.items():
        value = os.environ.get(slurm, "").split("(")[0]  # "2(x3)" per-node counts
        if value.isdigit():
            os.environ.setdefault(name, value)


def _elastic_store(timeout: datetime.timedelta) -> Any:
    """Under torchrun: the rendezvous store, with keys private to this restart attempt.

    torch's elastic agent hands every attempt the same store; a restarted attempt that
    reads the previous attempt's keys connects gloo to dead addresses ("Connection
    refused") or hangs (compare pytorch/pytorch#167288). Prefixing every key with the
    run id and ``TORCHELASTIC_RESTART_COUNT`` gives each attempt a clean namespace.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timeout,
                          multi_tenant=not agent)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return PrefixStore(f"torchkit/{run}/attempt-{restart}/", store)


def _run_under_launcher(fn: Callable[..., Any], args: tuple[Any, ...],
                        kwargs: Mapping[str, Any], *, backend: str, timeout_s: float) -> Any:
    if backend == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if local_rank < gpus else "gloo"
    _log.debug("RANK and WORLD_SIZE are set: running fn in this process (backend %s)", backend)
    _init_from_env(backend, timeout_s)
    try:
        result = fn(*args, **kwargs)
        dist.barrier()  # see _worker: no rank tears the group down under another's feet
        return result
    finally:
        dist.destroy_process_group()


class _PortTaken(Exception):
    """Rank 0 could not listen on the chosen port: launch again with another one."""


@dataclass
class _Failure:
    rank: int
    exception_type: str | None  # None: the process died without reporting
    message: str = ""
    traceback: str = ""
    exitcode: int | None = None
    port_taken: bool = False
    time: float = 0.0

    def collateral(self) -> bool:
        """Whether this looks like a consequence of another rank's failure."""
        return self.exception_type in _COLLATERAL or (
            self.exception_type is not None and _PEER_TROUBLE.search(self.message) is not None)

    def sort_key(self) -> tuple[bool, float]:
        # Root causes first, then by time of death (a silent death is dated when its
        # process object's sentinel fired; a reported error when the rank raised it).
        return self.collateral(), self.time


def _worker(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
            rank: int, nprocs: int, backend: str, port: int, timeout_s: float,
            conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    """Run in each spawned process: init the group, run ``fn``, report through ``conn``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if "OMP_NUM_THREADS" not in os.environ:  # nprocs processes share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    initialised = False
    try:
        try:
            _init_from_env(backend, timeout_s)
            initialised = True
            result = fn(*args, **kwargs)
            try:
                payload = pickle.dumps(result)
            except Exception as error:
                raise TypeError(
                    f"fn's return value must be picklable to reach the parent process, got "
                    f"{type(result).__name__} on rank {rank}, which cannot be pickled "
                    f"({error}); return plain data (numbers, tensors, dicts, state_dicts)"
                ) from error
        except BaseException as error:
            text = str(error)
            conn.send(("error", type(error).__name__, text, traceback.format_exc(), time.time(),
                       not initialised and "EADDRINUSE" in text))
            raise SystemExit(1) from None
        if initialised:  # destroy before reporting: a reported rank is done
            # Wait for every rank first: gloo aborts a process ("terminate called without
            # an active exception") that tears its group down while a peer still uses it.
            dist.barrier()
            dist.destroy_process_group()
            initialised = False
        conn.send(("ok", payload))
    finally:
        if initialised:
            dist.destroy_process_group()
        conn.close()


def _exit_with_parent(parent_pid: int) -> None:
    """SIGTERM this rank once its parent is gone (killed): nobody would collect it."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _spawn(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], *,
           nprocs: int, backend: str, port: int, timeout_s: float) -> list[Any]:
    context = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: list[multiprocessing.connection.Connection] = []
    ok = False
    try:
        for rank in range(nprocs):
            receiver, sender = context.Pipe(duplex=False)
            proc = context.Process(
                target=_worker, name=f"torchkit-rank{rank}", daemon=False,
                args=(fn, args, kwargs, rank, nprocs, backend, port, timeout_s, sender,
                      os.getpid()))
            try:
                proc.start()
            except Exception as error:
                if "bootstrapping phase" in str(error):  # spawn's re-import of the script
                    raise RuntimeError(f"launch cannot start its workers: {_GUARD_HINT}") \
                        from None
                raise TypeError(
                    f"the arguments of launch (after fn) must be picklable to reach the worker "
                    f"processes, got one that cannot be pickled ({error}); pass plain data "
                    f"and build anything else inside fn"
                ) from None
            finally:
                sender.close()  # the child holds its own copy: EOF when it dies
            procs.append(proc)
            conns.append(receiver)
        results = _collect(procs, conns)
        ok = True
        return results
    finally:
        _stop(procs, polite=ok)
        for conn in conns:
            conn.close()


def _collect(procs: list[multiprocessing.process.BaseProcess],
             conns: list[multiprocessing.connection.Connection]) -> list[Any]:
    results: dict[int, Any] = {}
    failures: list[_Failure] = []
    waiting = set(range(len(procs)))
    while waiting and not failures:
        # A rank is done when it reports (its pipe) or exits (its sentinel), whichever first.
        owner: dict[Any, int] = {conns[r]: r for r in waiting}
        owner.update({procs[r].sentinel: r for r in waiting})
        ready = multiprocessing.connection.wait(list(owner))
        seen = time.time()  # a rank that died silently died no later than this
        for rank in sorted({owner[obj] for obj in ready}):
            waiting.discard(rank)
            outcome = _receive(rank, procs[rank], conns[rank], seen=seen)
            if isinstance(outcome, _Failure):
                failures.append(outcome)
            else:
                results[rank] = outcome
        if failures:  # a peer may have failed because of this one: take reports in flight
            for rank in sorted(waiting):
                if conns[rank].poll(0):
                    outcome = _receive(rank, procs[rank], conns[rank])
                    if isinstance(outcome, _Failure):
                        failures.append(outcome)
    if failures and all(f.collateral() for f in failures):
        # Every failure is a peer waiting in vain: a rank still running is the cause (it
        # hung, e.g. outside collectives), not the first to time out waiting for it.
        for rank in sorted(waiting):
            if procs[rank].is_alive():
                failures.append(_Failure(rank, None, message="hung", time=0.0))
    if failures:
        failures.sort(key=_Failure.sort_key)
        if failures[0].port_taken:
            raise _PortTaken
        raise _launch_error(failures, len(procs))
    return [pickle.loads(results[rank]) for rank in range(len(procs))]


def _receive(rank: int, proc: multiprocessing.process.BaseProcess,
             conn: multiprocessing.connection.Connection, *, seen: float | None = None) -> Any:
    """Return rank's pickled result, or a _Failure for an error or a silent death.

    A silent death is dated when its sentinel fired (``seen``), not after the grace
    period, so it sorts before the errors it caused in its peers ("connection reset").
    """
    message = None
    if conn.poll(0.5 if proc.exitcode is not None else 0):  # a dead rank's last words
        with contextlib.suppress(EOFError):
            message = conn.recv()
    if message is not None and message[0] == "ok":
        return message[1]
    if message is not None:
        _, type_name, text, formatted, when, port_taken = message
        return _Failure(rank, type_name, text, formatted, time=when, port_taken=port_taken)
    proc.join(_GRACE_S)
    when = seen if seen is not None and proc.exitcode is not None else time.time()
    return _Failure(rank, None, exitcode=proc.exitcode, time=when)


def _launch_error(failures: list[_Failure], nprocs: int) -> LaunchError:
    first = failures[0]
    if first.exception_type is None and first.message == "hung":
        peers = ", ".join(f"rank {f.rank} ({f.exception_type}: {f.message[:200]})"
                          for f in failures[1:])
        message = (
            f"rank {first.rank} of {nprocs} hung: it neither finished nor failed while "
            f"its peers gave up waiting for it ({peers}); it was terminated. Look for an "
            "endless loop, a deadlock or a collective only some ranks call"
        )
        return LaunchError(message, rank=first.rank)
    if first.exception_type is None:
        code = first.exitcode
        how = f"exited with code {code}"
        if code is not None and code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        message = (
            f"rank {first.rank} of {nprocs} {how} without reporting a result or an error "
            f"(killed, e.g. by the out-of-memory killer, crashed, or called os._exit); "
            f"the other ranks were terminated"
        )
        if code == 1 and _main_lacks_guard():
            message += f". If the script has no __main__ guard: {_GUARD_HINT}"
    else:
        message = (
            f"rank {first.rank} of {nprocs} raised {first.exception_type}: {first.message}; "
            f"the other ranks were terminated. Traceback from rank {first.rank}:\n\n"
            f"{first.traceback.rstrip()}"
        )
    others = [f"rank {f.rank} ({f.exception_type or f'exit code {f.exitcode}'})"
              for f in failures[1:]]
    if others:
        message += f"\n\nAlso failed, probably as a consequence: {', '.join(others)}"
    return LaunchError(message, rank=first.rank, exception_type=first.exception_type,
                       exitcode=first.exitcode, traceback=first.traceback)


def _stop(procs: list[multiprocessing.process.BaseProcess], *, polite: bool) -> None:
    """Reap every process: let finished ones exit, SIGTERM the rest, SIGKILL stragglers."""
    if polite:
        _join_all(procs, _GRACE_S)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    _join_all(procs, _GRACE_S)
    for proc in procs:
        if proc.is_alive():
            _log.warning("rank process %s ignored SIGTERM for %.0f s: killing it",
                         proc.name, _GRACE_S)
            proc.kill()
    _join_all(procs, _GRACE_S)


def _join_all(procs: list[multiprocessing.process.BaseProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
