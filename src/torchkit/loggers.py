"""Experiment loggers: metrics to TensorBoard event files or a CSV file, resumable.

A logger receives ``log_metrics({"train_loss": 0.3, "lr": 0.01}, step)`` calls at log
time (never per step on the device: values are read to the host here), hyperparameters
once at the end of training, and survives a crash: its :meth:`Logger.state_dict` goes
into the checkpoint, and after ``load_state_dict`` whatever the crashed run logged past
the checkpoint is discarded, so a resumed run logs no step twice. Subclass
:class:`Logger` to send metrics anywhere else.
"""

from __future__ import annotations

import csv
import logging
import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from torchkit._utils import check_keys, require

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from typing_extensions import Self

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]

_log = logging.getLogger(__name__)


class Logger:
    """Base class of torchkit's loggers; subclass it to log anywhere else.

    Only :meth:`log_metrics` must be overridden (it raises ``NotImplementedError``
    here); the other methods do nothing by default. A logger is a context manager
    that closes itself on exit. ``Trainer`` calls, on rank 0 only: ``log_graph`` with
    the first training batch's inputs, ``log_metrics`` once per epoch (the epoch is
    the step), ``log_hparams`` at the end of ``fit``, then ``flush`` (closing is yours,
    so one logger can span several ``fit`` calls); its checkpoints hold
    ``state_dict()``.

    Example:
        >>> class ListLogger(tk.Logger):
        ...     def __init__(self):
        ...         self.rows = []
        ...     def log_metrics(self, metrics, step):
        ...         self.rows.append((step, dict(metrics)))
        >>> with ListLogger() as logger:
        ...     logger.log_metrics({"loss": 0.5}, step=10)
        >>> logger.rows
        [(10, {'loss': 0.5})]
    """

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Record scalar ``metrics`` (numbers or one-element tensors) at ``step``."""
        raise NotImplementedError(
            f"{type(self).__name__} must override log_metrics(metrics, step)"
        )

    def log_hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float | torch.Tensor]
    ) -> None:
        """Record the run's hyperparameters with its final ``metrics``; a no-op here."""

    def log_graph(self, model: nn.Module, example_input: Any) -> bool:
        """Record the model's graph if the logger supports it; return whether it did."""
        return False

    def flush(self) -> None:
        """Write buffered records out; a no-op here."""

    def close(self) -> None:
        """Flush and release files; a no-op here."""

    def state_dict(self) -> dict[str, Any]:
        """Return what a resumed run needs to continue the same log; ``{}`` here."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        check_keys(state_dict, expected=(), owner=type(self).__name__)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _check_metrics(
    metrics: Mapping[str, float | torch.Tensor], step: int, *, owner: str
) -> dict[str, float]:
    """Validate metrics and a step (``owner`` names the caller) and read them to the host."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{owner} expects a mapping of metric names to numbers, got "
            f"{type(metrics).__name__}"
        )
    errors = []
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        errors.append(f"step must be an int >= 0, got {step!r}")
    values: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or name == "step":
            errors.append(f"metric names must be non-empty strings other than 'step', "
                          f"got {name!r}")
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            values[name] = float(value.item())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            errors.append(f"metric {name!r} must be a number or a one-element tensor, "
                          f"got {value!r}")
    if errors:
        raise TypeError(f"{owner}: " + "; ".join(errors))
    return values


class TensorBoardLogger(Logger):
    """Write metrics as TensorBoard scalars into ``log_dir`` (needs the ``tensorboard`` extra).

    Each metric becomes a scalar tag of the same name (use ``/`` in names to group
    them, e.g. ``"loss/train"``). Use one step counter for every tag (e.g. the
    optimizer step): on resume, events after the checkpoint's last logged step are
    discarded by step, through ``SummaryWriter(purge_step=...)``. The underlying
    :class:`~torch.utils.tensorboard.SummaryWriter` is :attr:`writer`, created at the
    first write, for anything else (images, histograms).

    Args:
        log_dir: The run directory (created if needed); point TensorBoard at its parent
            to compare runs.
        log_graph: Make :meth:`log_graph` write the model graph (off by default:
            tracing runs the model once).
        flush_secs: How often, in seconds, buffered events are written to disk.
        max_queue: How many events to buffer before writing them out regardless.

    Raises:
        ImportError: If tensorboard is not installed.
        ValueError: If ``flush_secs`` or ``max_queue`` is not positive.

    Example:
        >>> import tempfile
        >>> with tk.TensorBoardLogger(tempfile.mkdtemp()) as logger:
        ...     logger.log_metrics({"train_loss": 0.25, "lr": torch.tensor(0.1)}, step=1)
        ...     logger.log_metrics({"train_loss": 0.20}, step=2)
        >>> logger.state_dict()
        {'step': 2}
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        log_graph: bool = False,
        flush_secs: float = 30.0,
        max_queue: int = 10,
    ) -> None:
        require("tensorboard", extra="tensorboard")
        errors = []
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, numbers.Real) or not (
            flush_secs > 0
        ):
            errors.append(f"flush_secs must be a number > 0, got {flush_secs!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            errors.append(f"max_queue must be an int >= 1, got {max_queue!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.log_dir = Path(log_dir)
        self._log_graph = log_graph
        self._flush_secs = float(flush_secs)
        self._max_queue = max_queue
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None
        self._step: int | None = None
        self._closed = False

    @property
    def writer(self) -> SummaryWriter:
        """The :class:`~torch.utils.tensorboard.SummaryWriter`, opened on first use."""
        return self._writer or self._open_writer()

    def _open_writer(self) -> SummaryWriter:
        if self._closed:
            raise RuntimeError(f"this TensorBoardLogger ({self.log_dir}) is closed")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(
            os.fspath(self.log_dir),
            purge_step=self._purge_step,
            flush_secs=self._flush_secs,
            max_queue=self._max_queue,
        )
        if self._purge_step is not None:
            _log.info("resuming %s: dropping events at steps >= %d", self.log_dir,
                      self._purge_step)
        self._purge_step = None
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Add each metric as a scalar at ``step``.

        Raises:
            TypeError: If a name, value or ``step`` is invalid (nothing is logged).
            RuntimeError: If the logger is closed.
        """
        values = _check_metrics(metrics, step, owner=f"{type(self).__name__}.log_metrics")
        writer = self.writer
        for name, value in values.items():
            writer.add_scalar(name, value, step)
        self._step = step if self._step is None else max(self._step, step)

    def log_hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float | torch.Tensor]
    ) -> None:
        """Record hyperparameters and final metrics for TensorBoard's HPARAMS tab.

        They go into ``log_dir`` itself (not a timestamped sub-run as with
        ``SummaryWriter.add_hparams``), with each metric also written as the scalar
        ``hparam/<name>`` at the last logged step. Numbers, strings and bools are kept;
        other values (``None``, tuples, dtypes, paths, ...) are logged as their ``str``.

        Raises:
            TypeError: If ``hparams`` is not a mapping with string keys, or a metric is
                invalid.
            RuntimeError: If the logger is closed.
        """
        from torch.utils.tensorboard import summary

        step = 0 if self._step is None else self._step
        values = _check_metrics(metrics, step, owner=f"{type(self).__name__}.log_hparams")
        if not isinstance(hparams, Mapping):
            raise TypeError(f"hparams must be a mapping of names to values, got "
                            f"{type(hparams).__name__}")
        bad = [repr(name) for name in hparams if not isinstance(name, str)]
        if bad:
            raise TypeError(f"hyperparameter names must be strings, got {', '.join(bad)}")
        tags = {f"hparam/{name}": value for name, value in values.items()}
        writer = self.writer
        # SummaryWriter.add_hparams would write these into a new timestamped sub-run.
        file_writer: Any = writer.file_writer
        hparam_values = {name: _hparam(value) for name, value in hparams.items()}
        protos = summary.hparams(hparam_values, tags)  # type: ignore[no-untyped-call]
        for proto in protos:
            file_writer.add_summary(proto, step)
        for tag, value in tags.items():
            writer.add_scalar(tag, value, step)

    def log_graph(self, model: nn.Module, example_input: Any) -> bool:
        """Trace ``model`` on ``example_input`` and write its graph, if ``log_graph=True``.

        Graphs are traced with ``torch.jit.trace`` (deprecated by torch, used by
        ``SummaryWriter.add_graph``); its deprecation warning is not repeated here.

        Returns:
            Whether a graph was written (``False`` when created with ``log_graph=False``).
        """
        if not self._log_graph:
            _log.debug("log_graph=False: not writing the model graph")
            return False
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated",
                category=FutureWarning,
            )
            self.writer.add_graph(model, example_input)
        return True

    def flush(self) -> None:
        """Write buffered events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later writes raise ``RuntimeError``."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"step": the largest step logged so far, or None}``."""
        return {"step": self._step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: events the crashed run wrote past it are dropped.

        A new event file is started with a purge marker at ``step + 1`` (``0`` when
        nothing had been logged), which makes TensorBoard discard earlier events at
        that step and later.

        Raises:
            KeyError: If keys are missing or unexpected.
            TypeError: If ``step`` is not an int or ``None``.
            RuntimeError: If the logger is closed.
        """
        check_keys(state_dict, expected=("step",), owner=type(self).__name__)
        step = state_dict["step"]
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"TensorBoardLogger state 'step' must be an int or None, "
                            f"got {step!r}")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._step = step
        self._purge_step = 0 if step is None else step + 1
        self._open_writer()  # writes the purge marker now, even if nothing else follows

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.log_dir)!r}, step={self._step})"


def _hparam(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


class CSVLogger(Logger):
    """Append one row per :meth:`log_metrics` call to a CSV file: ``step`` + metric columns.

    Columns are ``step`` followed by metric names in order of first appearance; a name
    that appears later adds a column (the file is rewritten atomically with the wider
    header) and cells a row did not log stay empty. Values are written at full
    precision (``repr`` of the float). Each row is flushed as it is written.

    Args:
        path: The CSV file, or a directory to hold ``metrics.csv`` when ``path`` does not
            end in ``.csv``. Parent directories are created.
        if_exists: What the first write does when the file already exists and no
            checkpoint state was loaded: ``"error"`` (raise ``FileExistsError``),
            ``"overwrite"`` or ``"append"`` (keep its rows and columns).

    Raises:
        ValueError: If ``if_exists`` is unknown.

    Example:
        >>> import tempfile
        >>> with tk.CSVLogger(tempfile.mkdtemp()) as logger:
        ...     logger.log_metrics({"train_loss": 0.5}, step=1)
        ...     logger.log_metrics({"train_loss": 0.25, "val_acc": 0.75}, step=2)
        >>> print(logger.path.read_text(), end="")
        step,train_loss,val_acc
        1,0.5,
        2,0.25,0.75
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        if_exists: Literal["error", "overwrite", "append"] = "error",
    ) -> None:
        if if_exists not in ("error", "overwrite", "append"):
            raise ValueError(
                f"if_exists must be 'error', 'overwrite' or 'append', got {if_exists!r}"
            )
        path = Path(path)
        self.path = path if path.suffix.lower() == ".csv" else path / "metrics.csv"
        self.if_exists = if_exists
        self._columns: list[str] = []
        self._num_rows = 0
        self._file: IO[str] | None = None
        self._closed = False

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Append a row with ``step`` and ``metrics``.

        Raises:
            TypeError: If a name, value or ``step`` is invalid (nothing is written).
            FileExistsError: On the first write, if the file exists and
                ``if_exists="error"``.
            ValueError: On the first write with ``if_exists="append"``, if the file is
                not a CSV whose first column is ``step``.
            RuntimeError: If the logger is closed.
        """
        values = _check_metrics(metrics, step, owner=f"{type(self).__name__}.log_metrics")
        if self._closed:
            raise RuntimeError(f"this CSVLogger ({self.path}) is closed")
        handle = self._file or self._open()
        new = [name for name in values if name not in self._columns]
        if new:
            handle = self._rewrite([*self._columns, *new], self._read()[1])
        row = [str(step), *(repr(values[c]) if c in values else "" for c in self._columns)]
        csv.writer(handle, lineterminator="\n").writerow(row)
        handle.flush()
        self._num_rows += 1

    def _open(self) -> IO[str]:
        """Start the file on the first write, as ``if_exists`` says."""
        if self.path.exists() and self.if_exists == "error":
            raise FileExistsError(
                f"{self.path} already exists; pass if_exists='overwrite' or 'append', "
                "pick another path, or load the logger's state from a checkpoint to resume"
            )
        columns, rows = self._read() if self.if_exists == "append" else ([], [])
        self._num_rows = len(rows)
        return self._rewrite(columns, rows)

    def _read(self) -> tuple[list[str], list[list[str]]]:
        """The file's metric columns and data rows, as text; empty if there is no file."""
        if self._file is not None:
            self._file.flush()
        if not self.path.exists():
            return [], []
        with self.path.open(newline="") as handle:
            lines = list(csv.reader(handle))
        if not lines:
            return [], []
        if lines[0][:1] != ["step"]:
            raise ValueError(
                f"{self.path} is not a CSVLogger file: its header must start with 'step', "
                f"got {lines[0][:3]}; pick another path or if_exists='overwrite'"
            )
        return lines[0][1:], lines[1:]

    def _rewrite(self, columns: list[str], rows: list[list[str]]) -> IO[str]:
        """Replace the file atomically with these columns and rows; reopen it to append."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        width = 1 + len(columns)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", newline="") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(["step", *columns])
                writer.writerows(row + [""] * (width - len(row)) for row in rows)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._columns = list(columns)
        self._file = self.path.open("a", newline="")
        return self._file

    def flush(self) -> None:
        """Flush the file to the operating system."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Close the file; later writes raise ``RuntimeError``."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"rows": the number of data rows in the file}``."""
        return {"rows": self._num_rows}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: keep the file's first ``rows`` rows, drop the rest.

        Columns that only the dropped rows used are removed too, so the file reads as
        if the crashed run had stopped at the checkpoint. ``if_exists`` does not apply.

        Raises:
            KeyError: If keys are missing or unexpected.
            TypeError: If ``rows`` is not an int >= 0.
            ValueError: If the file is not a CSV whose first column is ``step``.
        """
        check_keys(state_dict, expected=("rows",), owner=type(self).__name__)
        keep = state_dict["rows"]
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise TypeError(f"CSVLogger state 'rows' must be an int >= 0, got {keep!r}")
        columns, rows = self._read()
        if len(rows) < keep:
            _log.warning("%s has %d rows but the checkpoint counted %d; continuing after "
                         "the rows that are there", self.path, len(rows), keep)
        rows = [row + [""] * (1 + len(columns) - len(row)) for row in rows[:keep]]
        used = [i for i in range(1, 1 + len(columns)) if any(row[i] for row in rows)]
        self._rewrite([columns[i - 1] for i in used], [[r[0], *(r[i] for i in used)]
                                                       for r in rows])
        self._num_rows = len(rows)
        _log.info("resuming %s after %d rows", self.path, self._num_rows)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({os.fspath(self.path)!r}, rows={self._num_rows})"
