"""CheckpointManager: numbered checkpoints in a directory, with retention and fallback."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchkit._utils import check_keys
from torchkit.checkpoint._files import (
    TMP_MARK,
    CheckpointError,
    PathLike,
    _fsync_directory,
    _metrics,
    apply_state,
    metadata,
    read_checkpoint,
    save_checkpoint,
)

__all__ = ["CheckpointManager"]

_log = logging.getLogger(__name__)

INDEX = "index.json"
INDEX_FORMAT = "torchkit.checkpoint-index"


@dataclass
class _Entry:
    step: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointManager:
    """Keep numbered checkpoints in ``directory``: save, find, load, and delete old ones.

    Each :meth:`save` writes ``<prefix>-<step>.pt`` atomically (see
    :func:`save_checkpoint`) and then applies one retention policy: the ``keep_last``
    newest checkpoints and the ``keep_best`` best ones by ``monitor`` are kept, the rest
    deleted. The newest checkpoint and, with a ``monitor``, the best one are never
    deleted. A small ``index.json`` (written atomically) remembers steps and metrics so
    a new manager on the same directory — after a restart — sees the same latest and
    best; the directory listing stays the source of truth, so a lost or corrupt index
    loses nothing. Temporary files left by a crashed writer are removed on start.

    Args:
        directory: Where checkpoints live; created if missing.
        keep_last: How many of the newest checkpoints to keep; ``None`` keeps all.
        keep_best: How many of the best checkpoints by ``monitor`` to keep besides.
        monitor: The metric that ranks checkpoints (e.g. ``"val_loss"``); checkpoints
            saved without it are never "best".
        mode: ``"min"`` if a lower ``monitor`` is better, ``"max"`` if higher.
        prefix: The file name prefix.
        durable: fsync every write (see :func:`save_checkpoint`).
        checksum: Write zip CRC-32s (see :func:`save_checkpoint`).

    Raises:
        ValueError: If an option is out of range, or ``keep_best`` is set without a
            ``monitor``.

    Example:
        >>> import tempfile
        >>> manager = tk.CheckpointManager(tempfile.mkdtemp(), keep_last=2, keep_best=1,
        ...                                monitor="val_loss")
        >>> model = nn.Linear(2, 1)
        >>> for step, loss in [(10, 0.5), (20, 0.2), (30, 0.4), (40, 0.3)]:
        ...     _ = manager.save({"model": model}, step=step, metrics={"val_loss": loss})
        >>> [p.name for p in manager.checkpoints()]  # 2 newest + the best
        ['checkpoint-000000020.pt', 'checkpoint-000000030.pt', 'checkpoint-000000040.pt']
        >>> manager.best().name
        'checkpoint-000000020.pt'
        >>> manager.load("latest", {"model": model})["step"]
        40
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        keep_last: int | None = 3,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        prefix: str = "checkpoint",
        durable: bool = True,
        checksum: bool = False,
    ) -> None:
        errors = []
        if keep_last is not None and (not _is_int(keep_last) or keep_last < 1):
            errors.append(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        if not _is_int(keep_best) or keep_best < 0:
            errors.append(f"keep_best must be an int >= 0, got {keep_best!r}")
        elif keep_best > 0 and monitor is None:
            errors.append(f"keep_best={keep_best} needs monitor= (the metric to rank by)")
        if mode not in ("min", "max"):
            errors.append(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[\w.-]+", prefix):
            errors.append(f"prefix must be a non-empty file-name-safe string, got {prefix!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.prefix = prefix
        self.durable = durable
        self.checksum = checksum
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.pt")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        self._entries: dict[str, _Entry] = self._scan()

    def _path(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step:09d}.pt"

    def save(self, state: Mapping[str, Any], *, step: int, epoch: int | None = None,
             metrics: Mapping[str, Any] | None = None) -> Path:
        """Write a checkpoint for ``step``, then delete what retention no longer keeps.

        Args:
            state: Names mapped to stateful objects or plain data, as for
                :func:`save_checkpoint`.
            step: The step number; it names the file, so a second save at the same
                step replaces the first.
            epoch: The epoch, recorded in the file and the index.
            metrics: Numbers to record; ``monitor`` among them ranks the checkpoint.

        Returns:
            The path written.

        Raises:
            ValueError: If ``step`` is not an int >= 0.
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        values = _metrics(metrics)
        path = save_checkpoint(self._path(step), state, step=step, epoch=epoch,
                               metrics=values, durable=self.durable, checksum=self.checksum)
        self._entries[path.name] = _Entry(step, epoch, values)
        self._apply_retention()
        self._write_index()
        _log.info("saved checkpoint %s", path)
        return path

    def refresh(self) -> None:
        """Look at the directory again: pick up checkpoints another process wrote.

        Under DDP only rank 0 writes; the other ranks' managers call this (``Trainer``
        does, before resuming) to see the same checkpoints.
        """
        self._entries = self._scan()

    def checkpoints(self) -> list[Path]:
        """Return the paths of the checkpoints on disk, oldest step first."""
        return [self.directory / name for name in self._by_step()]

    def latest(self) -> Path | None:
        """Return the checkpoint with the highest step, or ``None`` if there is none."""
        names = self._by_step()
        return self.directory / names[-1] if names else None

    def best(self) -> Path | None:
        """Return the checkpoint with the best ``monitor`` value, or ``None`` if none has it.

        Raises:
            ValueError: If the manager has no ``monitor``.
        """
        ranked = self._ranked()
        return self.directory / ranked[0] if ranked else None

    def load(
        self,
        which: Literal["latest", "best"] | PathLike = "latest",
        state: Mapping[str, Any] | None = None,
        *,
        map_location: Any = "cpu",
        strict: bool = True,
        restore_rng: bool = False,
    ) -> dict[str, Any]:
        """Load the ``"latest"`` or ``"best"`` checkpoint (or a path) into ``state``.

        For ``"latest"`` and ``"best"``, a file that cannot be read (truncated by a full
        disk, corrupted) is skipped with a warning naming it, and the next candidate (the
        previous step, or the next best) is loaded instead. Arguments after ``state`` are
        as for :func:`load_checkpoint`.

        Returns:
            The checkpoint's metadata, as :func:`load_checkpoint` returns it.

        Raises:
            CheckpointError: If there is no checkpoint, or none that can be read.
        """
        if which == "latest":
            candidates = list(reversed(self._by_step()))
        elif which == "best":
            candidates = self._ranked()
        else:
            path = Path(which)
            payload = read_checkpoint(path, map_location=map_location)
            apply_state(payload, path, state, strict=strict, restore_rng=restore_rng)
            return metadata(payload, path)
        if not candidates:
            raise CheckpointError(self.directory, f"holds no {which} checkpoint to load")
        for name in candidates:
            path = self.directory / name
            try:
                payload = read_checkpoint(path, map_location=map_location)
            except CheckpointError as error:
                warnings.warn(f"skipping unreadable {which} checkpoint: {error}",
                              RuntimeWarning, stacklevel=2)
                continue
            apply_state(payload, path, state, strict=strict, restore_rng=restore_rng)
            return metadata(payload, path)
        raise CheckpointError(
            self.directory, f"none of its {len(candidates)} checkpoints can be read: "
            f"{', '.join(candidates)}"
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the index: each checkpoint's file name, step, epoch and metrics."""
        return {"entries": [
            {"file": name, "step": e.step, "epoch": e.epoch, "metrics": dict(e.metrics)}
            for name, e in sorted(self._entries.items())
        ]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore index entries for checkpoints that are still on disk."""
        check_keys(state_dict, expected={"entries"}, owner=type(self).__name__)
        for item in state_dict["entries"]:
            if (self.directory / item["file"]).is_file():
                self._entries[item["file"]] = _Entry(item["step"], item["epoch"],
                                                     dict(item["metrics"]))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({os.fspath(self.directory)!r}, keep_last="
                f"{self.keep_last}, keep_best={self.keep_best}, monitor={self.monitor!r}, "
                f"checkpoints={len(self._entries)})")

    # -- internals -------------------------------------------------------------------

    def _by_step(self) -> list[str]:
        return sorted(self._entries, key=lambda name: self._entries[name].step)

    def _ranked(self) -> list[str]:
        if self.monitor is None:
            raise ValueError("best checkpoints need CheckpointManager(monitor=...)")
        monitor, sign = self.monitor, (1.0 if self.mode == "min" else -1.0)
        scored = [(sign * e.metrics[monitor], e.step, name) for name, e in self._entries.items()
                  if monitor in e.metrics and math.isfinite(e.metrics[monitor])]
        return [name for _, _, name in sorted(scored)]  # ties: the earlier step wins

    def _apply_retention(self) -> None:
        by_step = self._by_step()
        keep = set(by_step if self.keep_last is None else by_step[-self.keep_last:])
        if self.monitor is not None:
            keep |= set(self._ranked()[:max(self.keep_best, 1)])
        for name in set(self._entries) - keep:
            (self.directory / name).unlink(missing_ok=True)
            del self._entries[name]
            _log.debug("retention deleted checkpoint %s", name)

    def _scan(self) -> dict[str, _Entry]:
        entries = {}
        indexed = self._read_index()
        for path in self.directory.iterdir():
            match = self._pattern.fullmatch(path.name)
            if match is None or not path.is_file():
                continue
            entry = indexed.get(path.name)
            if entry is None:  # written after the index (a crash in between): read it
                entry = _Entry(int(match.group(1)))
                try:
                    meta = metadata(read_checkpoint(path, mmap=True), path)
                    entry = _Entry(entry.step, meta["epoch"], meta["metrics"])
                except CheckpointError as error:
                    _log.warning("found unreadable checkpoint %s", error)
            entries[path.name] = entry
        return entries

    def _read_index(self) -> dict[str, _Entry]:
        path = self.directory / INDEX
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            if data.get("format") != INDEX_FORMAT:
                raise ValueError("not a torchkit checkpoint index")
            return {item["file"]: _Entry(int(item["step"]), item["epoch"],
                                         {k: float(v) for k, v in item["metrics"].items()})
                    for item in data["entries"]}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            # The checkpoints themselves are the truth: rebuild from them.
            _log.warning("ignoring unreadable checkpoint index %s (%s)", path, error)
            return {}

    def _write_index(self) -> None:
        data = {"format": INDEX_FORMAT, "version": 1, **self.state_dict()}
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}{TMP_MARK}{os.getpid()}-",
                                   dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self.directory / INDEX)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.durable:
            _fsync_directory(self.directory)

    def _remove_stale_temporaries(self) -> None:
        for path in self.directory.iterdir():
            if not path.name.startswith(".") or TMP_MARK not in path.name:
                continue
            pid = path.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live process is writing it right now
            path.unlink(missing_ok=True)
            _log.info("removed temporary file %s left by an interrupted save", path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # pragma: no cover - os.kill would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - exists, owned by someone else
        return True
    except OSError:  # pragma: no cover - e.g. Windows without such a process
        return False
    return True
