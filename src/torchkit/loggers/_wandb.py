"""WandbLogger: metrics, config and final metrics in one Weights & Biases run that resumes."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from torchkit._utils import check_keys, require
from torchkit.distributed import is_main_process
from torchkit.loggers._base import Logger, check_hparams, check_metrics, check_run_state

__all__ = ["WandbLogger"]

_log = logging.getLogger(__name__)

_MODES = ("online", "offline", "disabled")
_ID_CHARS = string.ascii_lowercase + string.digits  # what W&B's own run ids are made of


class WandbLogger(Logger):
    """Log metrics into one Weights & Biases run that a resumed ``fit`` continues.

    Needs the ``wandb`` extra. The run (``wandb.init(id=run_id, resume="allow",
    reinit="create_new")``) starts at the first write; each metric is logged with
    ``run.log(metrics, step=step)``, so W&B's step is yours (e.g. the epoch).
    :meth:`state_dict` holds the run id and the last logged step: after
    ``load_state_dict`` the same run goes on. W&B refuses steps lower than those it
    already has, so steps that the crashed run already logged past the checkpoint are
    not logged again (with torchkit's exact resume they hold the same values): online,
    W&B says where the run stands; offline, the earlier offline runs of the same id
    under the same ``wandb/`` folder are read. No step of the run appears twice.
    :meth:`log_hparams` updates the run's config with the hyper-parameters and its
    summary with each final metric as ``hparam/<name>``. Only the main process (rank 0)
    writes.

    Args:
        project: The W&B project.
        run_id: The run's id; ``None`` makes a new one (:attr:`run_id` tells it).
        mode: ``"online"``, ``"offline"`` (no network: ``wandb sync`` uploads it later)
            or ``"disabled"``; ``None`` leaves it to W&B (``WANDB_MODE``, ``wandb login``).
        dir: The folder that holds W&B's ``wandb/`` folder; ``None`` leaves it to W&B
            (``WANDB_DIR``, else the working directory).

    Raises:
        ImportError: If wandb is not installed.
        TypeError: If ``project`` is not a non-empty string or ``run_id`` not a string.
        ValueError: If ``mode`` is unknown.

    Example:
        >>> import tempfile
        >>> with tk.WandbLogger("demo", mode="offline", dir=tempfile.mkdtemp()) as logger:
        ...     logger.log_metrics({"train_loss": 0.5}, step=0)
        ...     logger.log_metrics({"train_loss": 0.25}, step=1)
        >>> logger.state_dict()["step"]
        1
        >>> len(logger.run_id)
        8
    """

    def __init__(
        self,
        project: str,
        *,
        run_id: str | None = None,
        mode: Literal["online", "offline", "disabled"] | None = None,
        dir: str | os.PathLike[str] | None = None,
    ) -> None:
        require("wandb", extra="wandb")
        errors = []
        if not isinstance(project, str) or not project:
            errors.append(f"project must be a non-empty string, got {project!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            errors.append(f"run_id must be a non-empty string or None, got {run_id!r}")
        if errors:
            raise TypeError("WandbLogger: " + "; ".join(errors))
        if mode is not None and mode not in _MODES:
            raise ValueError(f"mode must be 'online', 'offline', 'disabled' or None, "
                             f"got {mode!r}")
        self.project = project
        self.mode = mode
        self.dir = None if dir is None else Path(dir)
        self._run_id: str = run_id or "".join(secrets.choice(_ID_CHARS) for _ in range(8))
        self._run: Any = None
        self._step: int | None = None
        self._next_step = 0  # lower steps are already in the run
        self._resume_after: int | None = None
        self._closed = False

    @property
    def run_id(self) -> str:
        """The W&B run's id."""
        return self._run_id

    @property
    def run(self) -> Any:
        """The ``wandb`` run (``wandb.Run``), started on first use, for anything else."""
        return self._open() if self._run is None else self._run

    def _open(self) -> Any:
        if self._closed:
            raise RuntimeError(f"this WandbLogger (run {self._run_id}) is closed")
        wandb = require("wandb", extra="wandb")
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.project, id=self._run_id, resume="allow",
                         mode=self.mode, dir=None if self.dir is None else os.fspath(self.dir),
                         reinit="create_new")
        self._run = run
        if self._resume_after is not None:
            earlier = _offline_last_step(Path(run.dir).parent.parent, self._run_id) \
                if run.settings.mode == "offline" else None
            self._next_step = max(self._resume_after + 1, int(run.starting_step),
                                  -1 if earlier is None else earlier + 1)
            _log.info("resuming W&B run %s at step %d", self._run_id, self._next_step)
        self._resume_after = None
        return run

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Log ``metrics`` at ``step`` (on rank 0; other ranks only validate).

        Raises:
            TypeError: If a name, value or ``step`` is invalid (nothing is logged).
            RuntimeError: If the logger is closed.
        """
        values = check_metrics(metrics, step, owner=f"{type(self).__name__}.log_metrics")
        if not is_main_process():
            return
        run = self.run
        if step >= self._next_step:
            run.log(values, step=step)
        else:
            _log.debug("step %d is already in W&B run %s: not logged again", step,
                       self._run_id)
        self._step = step if self._step is None else max(self._step, step)

    def log_hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float | torch.Tensor]
    ) -> None:
        """Put ``hparams`` in the run's config and ``metrics`` in its summary.

        The summary keys are ``hparam/<name>``. Values that are not numbers, strings or
        bools are logged as their ``str``; a resumed run may log them again.

        Raises:
            TypeError: If ``hparams`` is not a mapping with string keys, or a metric is
                invalid.
            RuntimeError: If the logger is closed.
        """
        step = 0 if self._step is None else self._step
        values = check_hparams(hparams, metrics, step,
                               owner=f"{type(self).__name__}.log_hparams")
        if not is_main_process():
            return
        run = self.run
        run.config.update({name: _config_value(v) for name, v in hparams.items()},
                          allow_val_change=True)
        run.summary.update({f"hparam/{name}": value for name, value in values.items()})

    def close(self) -> None:
        """Finish the run (``run.finish()``); later writes raise ``RuntimeError``."""
        if self._run is not None:
            self._run.finish()
            self._run = None
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"run_id": the run's id, "step": the last logged step or None}``."""
        return {"run_id": self._run_id, "step": self._step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue the checkpoint's run after its last step; see the class docstring.

        A run this logger has open is finished first.

        Raises:
            KeyError: If keys are missing or unexpected.
            TypeError: If ``run_id`` is not a string or ``None``, or ``step`` not an int
                or ``None``.
            RuntimeError: If the logger is closed.
        """
        check_keys(state_dict, expected=("run_id", "step"), owner=type(self).__name__)
        run_id, step = state_dict["run_id"], state_dict["step"]
        check_run_state(type(self).__name__, run_id, step)
        if self._closed:
            raise RuntimeError(f"this WandbLogger (run {self._run_id}) is closed")
        if self._run is not None:
            self._run.finish()
            self._run = None
        if run_id is not None:
            self._run_id = run_id
        self._step = step
        self._next_step = 0
        self._resume_after = -1 if step is None else step

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.project!r}, run_id={self._run_id!r}, "
                f"step={self._step})")


def _config_value(value: Any) -> bool | int | float | str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _offline_last_step(wandb_dir: Path, run_id: str) -> int | None:
    """The largest ``_step`` in the offline runs of ``run_id`` under ``wandb_dir``."""
    pb = require("wandb.proto.wandb_internal_pb2", extra="wandb")
    last: int | None = None
    for path in offline_run_files(wandb_dir, run_id):
        for data in _records(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            for item in record.history.item:
                if (item.key or "/".join(item.nested_key)) == "_step":
                    step = int(json.loads(item.value_json))
                    last = step if last is None else max(last, step)
    return last


def offline_run_files(wandb_dir: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of the offline runs of ``run_id``, oldest first.

    W&B names each start ``offline-run-<date>_<time>-<id>``, with ``-1``, ``-2``, ...
    added when two starts fall in the same second.
    """
    name = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    runs = [path for path in wandb_dir.glob("offline-run-*") if name.fullmatch(path.name)]
    runs.sort(key=lambda path: (path.name[12:27], int(path.name.rpartition(run_id)[2][1:] or 0)))
    return [path / f"run-{run_id}.wandb" for path in runs
            if (path / f"run-{run_id}.wandb").is_file()]


def _records(data: bytes, block: int = 32768) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header, then a LevelDB-style log."""
    if data[:4] != b":W&B":
        return
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            yield b"".join(chunks)
            chunks = []
