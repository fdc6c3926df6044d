"""Asynchronous checkpoint saves: a snapshot of the state, then a background writer thread."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BackgroundWriter", "snapshot"]

_log = logging.getLogger(__name__)


Pool = dict[tuple[int, bool], list[torch.UntypedStorage]]


def snapshot(payload: Any, pool: Pool | None = None
             ) -> tuple[Any, Callable[[], None], list[tuple[torch.UntypedStorage, bool]]]:
    """Copy every tensor in ``payload`` to host memory; return the copy and a ``ready()``.

    Storages are copied whole and once each, so views and tied tensors keep sharing and
    ``torch.save`` writes the same bytes as for the original. CUDA tensors are copied
    into pinned host memory without blocking: ``ready()`` (called by the writer thread)
    waits for those copies only. Host buffers are taken from ``pool`` (by size) when it
    has one: memory already touched copies about 3x faster than fresh pages. The third
    value lists the buffers used, to give back to the pool once the write is done.
    """
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}
    events: list[Any] = []
    used: list[tuple[torch.UntypedStorage, bool]] = []  # (buffer, pinned)

    def host_buffer(nbytes: int, pinned: bool) -> torch.UntypedStorage:
        spare = (pool or {}).get((nbytes, pinned))
        if spare:
            return spare.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()

    def copy_storage(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        key = (str(storage.device), storage.data_ptr())
        if key not in copies:
            cuda = storage.device.type == "cuda"
            host = host_buffer(storage.nbytes(), cuda)
            host.copy_(storage, non_blocking=cuda)
            if cuda:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
                events.append(event)
            copies[key] = host
            used.append((host, cuda))
        return copies[key]

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storage = copy_storage(value.untyped_storage())
            out = torch.empty((0,), dtype=value.dtype).set_(
                storage, value.storage_offset(), value.size(), value.stride())
            if value.requires_grad and value.is_leaf:
                out.requires_grad_(True)
            return torch.nn.Parameter(out, value.requires_grad) \
                if isinstance(value, torch.nn.Parameter) else out
        if type(value) in (dict, OrderedDict):
            out = type(value)((k, copy(v)) for k, v in value.items())
            if getattr(value, "__dict__", None):  # a state_dict's _metadata (versions)
                out.__dict__.update(value.__dict__)
            return out
        if type(value) is list:
            return [copy(v) for v in value]
        if type(value) is tuple:
            return tuple(copy(v) for v in value)
        return value

    copied = copy(payload)

    def ready() -> None:
        for event in events:
            event.synchronize()

    return copied, ready, used


class BackgroundWriter:
    """Run one job at a time in a background thread; its error is raised by the next call.

    The thread is not a daemon, so a process that exits normally (or by ``SystemExit``)
    waits for the write in flight before it ends.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as error:  # raised in the caller's thread by wait()
                _log.error("asynchronous checkpoint save failed: %s", error)
                self._error = error

        self._thread = threading.Thread(target=run, name="torchkit-checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
