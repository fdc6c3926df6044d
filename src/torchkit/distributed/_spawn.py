"""Start one process per rank, collect each one's result or failure, reap every process."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from torchkit.distributed._env import init_from_env
from torchkit.distributed._failures import GUARD_HINT, Failure, launch_error

__all__ = ["PortTaken", "check_not_reimported", "spawn"]

_log = logging.getLogger(__name__)

_GRACE_S = 5.0  # between SIGTERM and SIGKILL, and for a finished rank to exit


class PortTaken(Exception):
    """Rank 0 could not listen on the chosen port: launch again with another one."""


def check_not_reimported() -> None:
    """Refuse a launch from a worker's re-import of a script without a ``__main__`` guard."""
    main = sys.modules.get("__main__")
    if multiprocessing.parent_process() is not None and \
            getattr(main, "__name__", None) == "__mp_main__":
        raise RuntimeError(f"launch was called while a worker process imported the main "
                           f"script: {GUARD_HINT}")


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
            init_from_env(backend, timeout_s)
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


def spawn(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], *,
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
                    raise RuntimeError(f"launch cannot start its workers: {GUARD_HINT}") \
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
    failures: list[Failure] = []
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
            if isinstance(outcome, Failure):
                failures.append(outcome)
            else:
                results[rank] = outcome
        if failures:  # a peer may have failed because of this one: take reports in flight
            for rank in sorted(waiting):
                if conns[rank].poll(0):
                    outcome = _receive(rank, procs[rank], conns[rank])
                    if isinstance(outcome, Failure):
                        failures.append(outcome)
    if failures and all(f.collateral() for f in failures):
        # Every failure is a peer waiting in vain: a rank still running is the cause (it
        # hung, e.g. outside collectives), not the first to time out waiting for it.
        for rank in sorted(waiting):
            if procs[rank].is_alive():
                failures.append(Failure(rank, None, message="hung", time=0.0))
    if failures:
        failures.sort(key=Failure.sort_key)
        if failures[0].port_taken:
            raise PortTaken
        raise launch_error(failures, len(procs))
    return [pickle.loads(results[rank]) for rank in range(len(procs))]


def _receive(rank: int, proc: multiprocessing.process.BaseProcess,
             conn: multiprocessing.connection.Connection, *, seen: float | None = None) -> Any:
    """Return rank's pickled result, or a Failure for an error or a silent death.

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
        return Failure(rank, type_name, text, formatted, time=when, port_taken=port_taken)
    proc.join(_GRACE_S)
    when = seen if seen is not None and proc.exitcode is not None else time.time()
    return Failure(rank, None, exitcode=proc.exitcode, time=when)


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
