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


def snapshot(payload: Any) -> tuple[Any, Callable[[], None]]:
    """Copy every tensor in ``payload`` to host memory; return the copy and a ``ready()``.

    Storages are copied whole and once each, so views and tied tensors keep sharing and
    ``torch.save`` writes the same bytes as for the original. CUDA tensors are copied
    into pinned host memory without blocking: ``ready()`` (called by the writer thread)
    waits for those copies only.
    """
    copies: dict[tuple[str, int], torch.UntypedStorage] = {}
    events: list[Any] = []

    def copy_storage(storage: torch.UntypedStorage) -> torch.UntypedStorage:
        key = (str(storage.device), storage.data_ptr())
        if key not in copies:
            if storage.device.type == "cuda":
                host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True)
                host.copy_(torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
                    storage), non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
                events.append(event)
                copies[key] = host.untyped_storage()
            else:
                copies[key] = storage.clone()  # type: ignore[no-untyped-call]
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

    return copied, ready


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
