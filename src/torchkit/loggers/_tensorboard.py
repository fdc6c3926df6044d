"""TensorBoardLogger: metrics, hyper-parameters and the model graph as TensorBoard events."""

from __future__ import annotations

import logging
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkit._utils import check_keys, require
from torchkit.loggers._base import Logger, check_metrics

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardLogger"]

_log = logging.getLogger(__name__)


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
        values = check_metrics(metrics, step, owner=f"{type(self).__name__}.log_metrics")
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
        values = check_metrics(metrics, step, owner=f"{type(self).__name__}.log_hparams")
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


