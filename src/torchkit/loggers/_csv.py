"""CSVLogger: one row per log call in a CSV file, rewritten atomically when columns grow."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import torch

from torchkit._utils import atomic_write, check_keys
from torchkit.loggers._base import Logger, check_metrics

if TYPE_CHECKING:
    pass

__all__ = ["CSVLogger"]

_log = logging.getLogger(__name__)


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
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"path must be a str or os.PathLike (a .csv file or a directory), "
                            f"got {type(path).__name__}")
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
        values = check_metrics(metrics, step, owner=f"{type(self).__name__}.log_metrics")
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
        with self.path.open(newline="", encoding="utf-8") as handle:
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

        def write(handle: IO[Any]) -> None:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["step", *columns])
            writer.writerows(row + [""] * (width - len(row)) for row in rows)

        atomic_write(self.path, write, mode="w")
        self._columns = list(columns)
        self._file = self.path.open("a", newline="", encoding="utf-8")  # as atomic_write
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

