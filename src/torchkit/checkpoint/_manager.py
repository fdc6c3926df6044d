"""CheckpointManager: numbered checkpoints in a directory, with retention and fallback.

Over the ~450-line budget because one class owns one directory's invariants (the save
sequence, retention, the names-stay-inside checks, the index) for both formats, and a
third of the lines are its public docstrings; the file format, the async snapshot, the
DCP format and strict loading already live in their own modules beside it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torchkit._utils import TMP_MARK, atomic_write, check_keys
from torchkit.checkpoint import _dcp
from torchkit.checkpoint._errors import CheckpointError
from torchkit.checkpoint._files import (
    PathLike,
    _metrics,
    apply_state,
    build_payload,
    metadata,
    write_payload,
)
from torchkit.checkpoint._integrity import read_checkpoint
from torchkit.checkpoint._snapshot import BackgroundWriter, Pool, snapshot

__all__ = ["CheckpointManager"]

_log = logging.getLogger(__name__)

INDEX = "index.json"
INDEX_FORMAT = "torchkit.checkpoint-index"


@dataclass
class _Entry:
    step: int
    seq: int
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointManager:
    """Keep numbered checkpoints in ``directory``: save, find, load, and delete old ones.

    Each :meth:`save` writes ``<prefix>-<step>.pt`` atomically and verified (see
    :func:`save_checkpoint`) and numbers it with a per-directory save sequence that only
    grows. Retention follows that order, not step numbers: the ``keep_last`` most
    recently written checkpoints and the ``keep_best`` best ones by ``monitor`` are
    kept, the rest deleted; the file just written and the best one are never deleted.
    :meth:`latest` is the most recently written checkpoint, so after a resume from an
    older file (``resume="best"``, a path, or a fallback past a corrupt newest file)
    the saves that follow form a new branch that ``latest`` follows, and the abandoned
    branch's files age out like any others. A small ``index.json`` (written
    atomically) remembers the sequence, steps and metrics, so a new manager on the same
    directory sees the same latest and best; the files themselves record their sequence
    too, so a lost or corrupt index loses nothing. Names read from the index or a saved
    manager state are plain file names of this manager inside ``directory``, else
    :class:`CheckpointError`: nothing outside it is ever read or deleted. Temporary
    files left by a crashed writer are removed on start.

    With ``async_save=True``, :meth:`save` copies the state to host memory (a snapshot:
    the only time the training loop waits) and returns; a background thread writes,
    fsyncs and renames it, then applies retention. At most one save is in flight: the
    next :meth:`save`, :meth:`wait`, :meth:`load` or the end of the process waits for
    it, and an error in the background is raised by that next call. The bytes written
    are the same as a synchronous save's. The host buffers of a snapshot are kept for
    the next one (memory already touched copies about 3x faster), so an asynchronous
    manager holds one host copy of the state between saves (pinned for CUDA tensors).

    Args:
        directory: Where checkpoints live; created if missing.
        keep_last: How many of the most recent checkpoints to keep; ``None`` keeps all.
        keep_best: How many of the best checkpoints by ``monitor`` to keep besides.
        monitor: The metric that ranks checkpoints (e.g. ``"val_loss"``); checkpoints
            saved without it are never "best".
        mode: ``"min"`` if a lower ``monitor`` is better, ``"max"`` if higher.
        prefix: The file name prefix.
        durable: fsync every write (see :func:`save_checkpoint`).
        checksum: Write zip CRC-32s (see :func:`save_checkpoint`).
        async_save: Write in a background thread after a snapshot (see above); for
            file checkpoints only (a DCP save is synchronous).
        format: ``"file"`` (one file per checkpoint, written by the caller: rank 0),
            ``"dcp"`` (one directory ``<prefix>-<step>`` per checkpoint, written with
            ``torch.distributed.checkpoint`` by every rank: call :meth:`save` on every
            rank; see the sharded-training guide), or ``"auto"``: ``"dcp"`` when a model
            in the saved state has DTensor parameters (FSDP2, tensor parallel), else
            ``"file"``. It governs saving only: :meth:`load` reads whichever kind it
            finds, a DCP checkpoint also under another world size or in one plain
            process into a plain model. DCP directories need a file system every rank
            sees.

    Raises:
        ValueError: If an option is out of range, or ``keep_best`` is set without a
            ``monitor``.
        TypeError: If ``directory`` is not a path.
        CheckpointError: If the directory's index names a file outside the directory.

    Example:
        >>> import tempfile
        >>> manager = tk.CheckpointManager(tempfile.mkdtemp(), keep_last=2, keep_best=1,
        ...                                monitor="val_loss")
        >>> model = nn.Linear(2, 1)
        >>> for step, loss in [(10, 0.5), (20, 0.2), (30, 0.4), (40, 0.3)]:
        ...     _ = manager.save({"model": model}, step=step, metrics={"val_loss": loss})
        >>> [p.name for p in manager.checkpoints()]  # 2 most recent + the best
        ['checkpoint-000000020.pt', 'checkpoint-000000030.pt', 'checkpoint-000000040.pt']
        >>> manager.best().name
        'checkpoint-000000020.pt'
        >>> manager.load("latest", {"model": model})["step"]
        40
        >>> _ = manager.load("best", {"model": model})  # go back: a new branch starts
        >>> manager.save({"model": model}, step=25).name  # the newest, though step 25
        'checkpoint-000000025.pt'
        >>> manager.latest().name
        'checkpoint-000000025.pt'
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
        async_save: bool = False,
        format: Literal["auto", "file", "dcp"] = "auto",
    ) -> None:
        if not isinstance(directory, str | os.PathLike):
            raise TypeError(f"directory must be a path (str or os.PathLike), got "
                            f"{type(directory).__name__}")
        errors = []
        if keep_last is not None and (not _is_int(keep_last) or keep_last < 1):
            errors.append(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
        if not _is_int(keep_best) or keep_best < 0:
            errors.append(f"keep_best must be an int >= 0, got {keep_best!r}")
        elif keep_best > 0 and monitor is None:
            errors.append(f"keep_best={keep_best} needs monitor= (the metric to rank by)")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            errors.append(f"monitor must be a metric name (a non-empty str) or None, got "
                          f"{monitor!r}")
        if mode not in ("min", "max"):
            errors.append(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[\w.-]+", prefix):
            errors.append(f"prefix must be a non-empty file-name-safe string, got {prefix!r}")
        for name, flag in (("durable", durable), ("checksum", checksum),
                           ("async_save", async_save)):
            if not isinstance(flag, bool):
                errors.append(f"{name} must be True or False, got {flag!r}")
        if format not in ("auto", "file", "dcp"):
            errors.append(f"format must be 'auto', 'file' or 'dcp', got {format!r}")
        elif format == "dcp" and async_save is True:
            errors.append("async_save=True is for format='file'; a DCP save is synchronous")
        if errors:
            raise ValueError("; ".join(errors))
        self.directory = Path(directory)
        self.format = format
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode
        self.prefix = prefix
        self.durable = durable
        self.checksum = checksum
        self.async_save = async_save
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)(\.pt)?")
        self._lock = threading.RLock()  # the background writer updates the entries too
        self._writer = BackgroundWriter()
        self._pool: Pool = {}  # host buffers of the previous async snapshot, reused
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        self._next_seq = 0
        self._entries: dict[str, _Entry] = self._scan()

    def _path(self, step: int) -> Path:
        return self.directory / f"{self.prefix}-{step:09d}.pt"

    def uses_dcp(self, state: Mapping[str, Any]) -> bool:
        """Whether :meth:`save` writes ``state`` as a DCP directory (every rank saves)."""
        return self.format == "dcp" or (self.format == "auto" and _dcp.state_is_sharded(state))

    def _save_dcp(self, state: Mapping[str, Any], step: int, epoch: int | None,
                  values: dict[str, float]) -> Path:
        path = self.directory / f"{self.prefix}-{step:09d}"
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        _dcp.save_dcp(path, state, step=step, epoch=epoch, metrics=values, seq=seq,
                      durable=self.durable)
        rank, world = _dcp._world()
        if rank == 0:
            with self._lock:
                self._entries[path.name] = _Entry(step, seq, epoch, values)
                self._apply_retention(protect=path.name)
                self._write_index()
            _log.info("saved DCP checkpoint %s", path)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 renamed it and applied retention
            if rank != 0:
                self.refresh()
        return path

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
            The path written (with ``async_save``: the path being written; it is
            complete after :meth:`wait`).

        Raises:
            ValueError: If ``step`` is not an int >= 0.
            OSError: If the disk is full or the directory read-only (errno and path);
                nothing already saved is touched. With ``async_save``, the error of
                the previous background save.
        """
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self._writer.wait()  # at most one save in flight; its error surfaces here
        values = _metrics(metrics)
        if self.uses_dcp(state):
            return self._save_dcp(state, step, epoch, values)
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
        payload = build_payload(state, step=step, epoch=epoch, metrics=values, seq=seq)
        path = self._path(step)
        entry = _Entry(step, seq, epoch, values)
        if not self.async_save:
            self._write(payload, path, entry)
            return path
        copied, ready, buffers = snapshot(payload, self._pool)
        self._pool = {}  # the spare buffers go with this save; they come back after it

        def job() -> None:
            ready()
            try:
                self._write(copied, path, entry)
            finally:
                pool: Pool = {}
                for buffer, pinned in buffers:  # (is_pinned() warns on torch 2.8)
                    pool.setdefault((buffer.nbytes(), pinned), []).append(buffer)
                self._pool = pool

        self._writer.submit(job)
        return path

    def wait(self) -> None:
        """Wait for an asynchronous save in flight; raise its error, if it failed."""
        self._writer.wait()

    def _write(self, payload: Any, path: Path, entry: _Entry) -> None:
        write_payload(payload, path, durable=self.durable, checksum=self.checksum)
        with self._lock:
            self._entries[path.name] = entry
            self._apply_retention(protect=path.name)
            self._write_index()
        _log.info("saved checkpoint %s", path)

    def refresh(self) -> None:
        """Look at the directory again: pick up checkpoints another process wrote.

        Under DDP only rank 0 writes; the other ranks' managers call this (``Trainer``
        does, before resuming) to see the same checkpoints.
        """
        self._writer.wait()
        with self._lock:
            self._entries = self._scan()

    def checkpoints(self) -> list[Path]:
        """Return the paths of the checkpoints on disk, in the order they were written."""
        return [self.directory / name for name in self._by_seq()]

    def latest(self) -> Path | None:
        """Return the most recently written checkpoint, or ``None`` if there is none."""
        names = self._by_seq()
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
        verify: bool = True,
    ) -> dict[str, Any]:
        """Load the ``"latest"`` or ``"best"`` checkpoint (or a path) into ``state``.

        For ``"latest"`` and ``"best"``, a file that cannot be read (truncated by a full
        disk, corrupted: its digest, or for a DCP directory one of its files' digests,
        does not match) is skipped with a warning naming it, and the next candidate
        (the one written before it, or the next best) is loaded instead. Arguments
        after ``state`` are as for :func:`load_checkpoint`.

        Returns:
            The checkpoint's metadata, as :func:`load_checkpoint` returns it.

        Raises:
            CheckpointError: If there is no checkpoint, or none that can be read.
        """
        self._writer.wait()
        if which == "latest":
            candidates = list(reversed(self._by_seq()))
        elif which == "best":
            candidates = self._ranked()
        elif isinstance(which, str | os.PathLike):
            return self._load_one(Path(which), state, map_location=map_location,
                                  strict=strict, restore_rng=restore_rng, verify=verify)
        else:
            raise TypeError(f"which must be 'latest', 'best' or a path, got {which!r}")
        if not candidates:
            raise CheckpointError(self.directory, f"holds no {which} checkpoint to load")
        for name in candidates:
            path = self.directory / name
            try:
                payload = self._read(path, map_location=map_location, verify=verify)
            except CheckpointError as error:
                warnings.warn(f"skipping unreadable {which} checkpoint: {error}",
                              RuntimeWarning, stacklevel=2)
                continue
            return self._apply(path, payload, state, strict=strict, restore_rng=restore_rng)
        raise CheckpointError(
            self.directory, f"none of its {len(candidates)} checkpoints can be read: "
            f"{', '.join(candidates)}"
        )

    def _read(self, path: Path, *, map_location: Any, verify: bool) -> Any:
        if path.is_dir():
            payload = _dcp.read_dcp_payload(path, verify=verify)
            if verify:
                _dcp.verify_dcp_files(path, payload.get(_dcp.DIGESTS))  # every rank
            return payload
        return read_checkpoint(path, map_location=map_location, verify=verify)

    def _apply(self, path: Path, payload: Any, state: Mapping[str, Any] | None, *,
               strict: bool, restore_rng: bool) -> dict[str, Any]:
        if isinstance(payload.get("dcp"), list):  # a DCP directory: load its shards first
            saved = _dcp.load_dcp(path, payload, state or {}, strict=strict)
            rest = {k: v for k, v in (state or {}).items() if saved.get(k, 0) is not None}
            rank, world = _dcp._world()
            rngs = payload["rank_rngs"]
            payload = {**payload, "state": saved,
                       "rng": rngs[rank] if len(rngs) == world else rngs[0]}
            apply_state(payload, path, rest, strict=strict, restore_rng=restore_rng)
            return metadata(payload, path)
        apply_state(payload, path, state, strict=strict, restore_rng=restore_rng)
        return metadata(payload, path)

    def _load_one(self, path: Path, state: Mapping[str, Any] | None,
                  **options: Any) -> dict[str, Any]:
        payload = self._read(path, map_location=options.pop("map_location"),
                             verify=options.pop("verify"))
        return self._apply(path, payload, state, **options)

    def state_dict(self) -> dict[str, Any]:
        """Return the index: the next sequence number and each checkpoint's entry."""
        with self._lock:
            return {"next_seq": self._next_seq, "entries": [
                {"file": name, "step": e.step, "seq": e.seq, "epoch": e.epoch,
                 "metrics": dict(e.metrics)}
                for name, e in sorted(self._entries.items(), key=lambda kv: kv[1].seq)
            ]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore index entries for checkpoints that are still on disk.

        Raises:
            CheckpointError: If an entry names anything but a checkpoint file of this
                manager inside its directory (``../x``, an absolute path, ...).
        """
        check_keys(state_dict, expected={"entries", "next_seq"}, owner=type(self).__name__)
        entries = self._parse_entries(state_dict["entries"], where="the loaded state")
        with self._lock:
            for name, entry in entries.items():
                if (self.directory / name).exists():
                    self._entries[name] = entry
            self._next_seq = max([self._next_seq, _as_int(state_dict["next_seq"]),
                                  *(e.seq + 1 for e in self._entries.values())])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({os.fspath(self.directory)!r}, keep_last="
                f"{self.keep_last}, keep_best={self.keep_best}, monitor={self.monitor!r}, "
                f"checkpoints={len(self._entries)})")

    # -- internals -------------------------------------------------------------------

    def _by_seq(self) -> list[str]:
        with self._lock:
            return sorted(self._entries, key=lambda name: self._entries[name].seq)

    def _ranked(self) -> list[str]:
        if self.monitor is None:
            raise ValueError("best checkpoints need CheckpointManager(monitor=...)")
        monitor, sign = self.monitor, (1.0 if self.mode == "min" else -1.0)
        with self._lock:
            scored = [(sign * e.metrics[monitor], e.seq, name)
                      for name, e in self._entries.items()
                      if monitor in e.metrics and math.isfinite(e.metrics[monitor])]
        return [name for _, _, name in sorted(scored)]  # ties: the earlier save wins

    def _apply_retention(self, *, protect: str) -> None:
        by_seq = self._by_seq()
        keep = set(by_seq if self.keep_last is None else by_seq[-self.keep_last:])
        keep.add(protect)
        if self.monitor is not None:
            keep |= set(self._ranked()[:max(self.keep_best, 1)])
        for name in set(self._entries) - keep:
            self._check_name(name, where="retention")
            target = self.directory / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
            del self._entries[name]
            _log.debug("retention deleted checkpoint %s", name)

    def _check_name(self, name: Any, *, where: str) -> str:
        if not isinstance(name, str) or self._pattern.fullmatch(name) is None \
                or Path(name).name != name:
            raise CheckpointError(
                self.directory, f"{where} names {name!r}, which is not a checkpoint file "
                f"name of this manager ('{self.prefix}-<step>.pt' or a DCP directory "
                f"'{self.prefix}-<step>' inside the directory); "
                "refusing to touch it. Delete or fix index.json if it was tampered with"
            )
        return name

    def _parse_entries(self, items: Any, *, where: str) -> dict[str, _Entry]:
        if not isinstance(items, list):
            raise CheckpointError(self.directory, f"{where} has entries of type "
                                  f"{type(items).__name__}, not a list")
        entries = {}
        for item in items:
            if not isinstance(item, Mapping):
                raise CheckpointError(self.directory, f"{where} has an entry {item!r}")
            name = self._check_name(item.get("file"), where=where)
            try:
                metrics = {str(k): float(v) for k, v in dict(item["metrics"]).items()}
                epoch = item["epoch"]
                entries[name] = _Entry(_as_int(item["step"]), _as_int(item["seq"]),
                                       None if epoch is None else _as_int(epoch), metrics)
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(self.directory, f"{where} has a malformed entry "
                                      f"for {name!r}: {error!r}") from None
        return entries

    def _scan(self) -> dict[str, _Entry]:
        indexed, next_seq = self._read_index()
        entries: dict[str, _Entry] = {}
        unnumbered: list[tuple[int, str, _Entry]] = []
        for path in self.directory.iterdir():
            match = self._pattern.fullmatch(path.name)
            if match is None or path.is_symlink() or not (
                    path.is_file() if match.group(2) else _dcp.is_dcp_dir(path)):
                continue
            entry = indexed.get(path.name)
            if entry is not None:
                entries[path.name] = entry
                continue
            # Written after the index (a crash in between), or the index is lost: read it.
            step, seq, epoch, metrics = int(match.group(1)), None, None, {}
            try:
                payload = _dcp.read_dcp_payload(path) if path.is_dir() else \
                    read_checkpoint(path, mmap_tensors=True)
                meta = metadata(payload, path)
                seq, epoch, metrics = meta["seq"], meta["epoch"], meta["metrics"]
            except CheckpointError as error:
                _log.warning("found unreadable checkpoint %s", error)
            if isinstance(seq, int):
                entries[path.name] = _Entry(step, seq, epoch, metrics)
            else:  # a torchkit 0.1 or foreign file, or unreadable
                unnumbered.append((step, path.name, _Entry(step, 0, epoch, metrics)))
        # Not in the index, so written after its last update: newer than what it lists.
        after = max([next_seq - 1, *(e.seq for e in entries.values())], default=-1)
        for i, (_, name, entry) in enumerate(sorted(unnumbered)):
            entry.seq = after + 1 + i
            entries[name] = entry
        self._next_seq = max([self._next_seq, next_seq, *(e.seq + 1 for e in entries.values())])
        return entries

    def _read_index(self) -> tuple[dict[str, _Entry], int]:
        path = self.directory / INDEX
        if not path.exists():
            return {}, 0
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
                raise ValueError("not a torchkit checkpoint index")
            if data.get("version") == 1:  # torchkit 0.1: no sequence; the files decide
                return {}, 0
            items, next_seq = data["entries"], _as_int(data["next_seq"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            # The checkpoints themselves are the truth: rebuild from them.
            _log.warning("ignoring unreadable checkpoint index %s (%s)", path, error)
            return {}, 0
        return self._parse_entries(items, where=f"index {path}"), next_seq

    def _write_index(self) -> None:
        data = {"format": INDEX_FORMAT, "version": 2, **self.state_dict()}
        atomic_write(self.directory / INDEX, lambda f: json.dump(data, f, indent=1),
                     durable=self.durable, mode="w")

    def _remove_stale_temporaries(self) -> None:
        for path in self.directory.iterdir():
            if not path.name.startswith(".") or TMP_MARK not in path.name:
                continue
            pid = path.name.split(TMP_MARK, 1)[1].split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue  # a live process (this one: an asynchronous save) is writing it
            if path.is_dir() and not path.is_symlink():  # an interrupted DCP save
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            _log.info("removed temporary file %s left by an interrupted save", path)


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int, got {value!r}")
    return value


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
