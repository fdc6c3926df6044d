"""TensorBoardLogger: metrics, hyper-parameters, images, histograms, figures and the graph."""

from __future__ import annotations

import io
import logging
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkit._names import as_patterns, matches, name_hint, unmatched
from torchkit._utils import check_keys, require
from torchkit.loggers._base import Logger, check_hparams, check_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure
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
    first write, for anything else. Besides scalars: :meth:`log_images` (feature maps
    through :func:`~torchkit.feature_grid`), :meth:`log_histograms` of parameters and
    gradients, :meth:`log_figure` for matplotlib figures, and :meth:`log_graph`.

    Args:
        log_dir: The run directory (created if needed); point TensorBoard at its parent
            to compare runs.
        log_graph: Let ``Trainer`` write the model graph at the start of ``fit`` (off
            by default: tracing runs the model once); read back as
            :attr:`graph_on_fit`. An explicit :meth:`log_graph` call writes either way.
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
        if not isinstance(log_dir, str | os.PathLike):
            raise TypeError(f"log_dir must be a str or os.PathLike (the run directory), got "
                            f"{type(log_dir).__name__}")
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
        self._seen(step)

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
        values = check_hparams(hparams, metrics, step,
                               owner=f"{type(self).__name__}.log_hparams")
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

    @property
    def graph_on_fit(self) -> bool:
        """Whether ``Trainer`` should log the graph by itself (the ``log_graph`` option)."""
        return self._log_graph

    def log_graph(self, model: nn.Module, example_input: Any) -> bool:
        """Trace ``model`` on ``example_input`` and write its graph (always, when called).

        ``SummaryWriter.add_graph`` traces in eval mode with ``torch.jit.trace``
        (deprecated by torch; its deprecation warning is not repeated here). The
        ``log_graph`` option only decides whether ``Trainer`` calls this by itself.

        Returns:
            ``True``: a graph was written.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated",
                category=FutureWarning,
            )
            self.writer.add_graph(model, example_input)
        return True

    def log_images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """Write a batch of images, tiled into one picture, under ``tag`` at ``step``.

        Args:
            tag: The image's name in TensorBoard's IMAGES tab.
            images: ``(N, C, H, W)`` or one ``(C, H, W)`` image with 1 or 3 channels:
                floats in ``[0, 1]`` or ``uint8``. Un-normalise inputs first; show a
                feature map with ``tk.feature_grid(features)``.
            step: The step, as for :meth:`log_metrics`.

        Raises:
            TypeError: If ``tag``, ``images`` or ``step`` has the wrong type.
            ValueError: If the shape does not fit or float values lie outside ``[0, 1]``.
            RuntimeError: If the logger is closed.

        Example:
            >>> import tempfile
            >>> with tk.TensorBoardLogger(tempfile.mkdtemp()) as logger:
            ...     logger.log_images("inputs", torch.rand(4, 3, 8, 8), step=0)
            ...     logger.log_images("conv1", tk.feature_grid(torch.randn(4, 16, 8, 8)), 0)
        """
        owner = f"{type(self).__name__}.log_images"
        _check_tag_step(tag, step, owner=owner)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{owner}: images must be a tensor, got {type(images).__name__}")
        x = images.detach().cpu()
        x = x.unsqueeze(0) if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
            raise ValueError(f"{owner}: images must have shape (N, C, H, W) or (C, H, W) "
                             f"with C = 1 or 3, got {tuple(images.shape)}; show a feature "
                             "map with tk.feature_grid(features)")
        if x.dtype != torch.uint8:
            x = x.float()
            low, high = float(x.min()), float(x.max())
            if not (low >= 0.0 and high <= 1.0):
                raise ValueError(f"{owner}: float images must lie in [0, 1], got values in "
                                 f"[{low:.4g}, {high:.4g}]; undo the normalisation "
                                 "(x * std + mean) or pass uint8")
        self.writer.add_images(tag, x, step, dataformats="NCHW")
        self._seen(step)

    def log_histograms(
        self, model: nn.Module, step: int, *, include: str | Sequence[str] | None = None,
        grads: bool = True,
    ) -> list[str]:
        """Write a histogram of each parameter (``parameters/<name>``) and its gradient.

        Gradients (``gradients/<name>``) are written for parameters whose ``.grad`` is
        set; call it after ``backward`` (before ``zero_grad``) to see them. Watching
        them over steps shows weights that stop changing, or gradients that vanish.

        Args:
            model: Whose ``named_parameters()`` to write.
            step: The step, as for :meth:`log_metrics`.
            include: Glob pattern(s) over parameter names, matched as by
                :func:`~torchkit.freeze` (``None``: all).
            grads: Also write the gradients.

        Returns:
            The tags written.

        Raises:
            TypeError: If ``model`` is not a module, or ``step``/``include`` is invalid.
            ValueError: If a pattern matches no parameter, or a value is not finite.
            RuntimeError: If the logger is closed.

        Example:
            >>> import tempfile
            >>> net = nn.Linear(3, 2)
            >>> net(torch.randn(4, 3)).sum().backward()
            >>> with tk.TensorBoardLogger(tempfile.mkdtemp()) as logger:
            ...     logger.log_histograms(net, step=0)
            ['parameters/weight', 'gradients/weight', 'parameters/bias', 'gradients/bias']
        """
        owner = f"{type(self).__name__}.log_histograms"
        _check_tag_step("histograms", step, owner=owner)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        patterns = as_patterns(include, arg="include")
        named = list(model.named_parameters())
        if patterns is not None:
            names = [n for n, _ in named]
            wrong = unmatched(patterns, names)
            if wrong or not patterns:
                raise ValueError(f"{owner}: include {include!r} matched no parameter of "
                                 f"{type(model).__name__}; {name_hint(names, wrong)}")
            named = [(n, p) for n, p in named if matches(n, patterns)]
        values: list[tuple[str, torch.Tensor]] = []
        for name, param in named:
            values.append((f"parameters/{name}", param))
            if grads and param.grad is not None:
                values.append((f"gradients/{name}", param.grad))
        bad = [tag for tag, value in values if not bool(torch.isfinite(value).all())]
        if bad:
            raise ValueError(f"{owner}: non-finite values in {', '.join(bad)}; nothing "
                             "was written")
        writer = self.writer
        for tag, value in values:
            writer.add_histogram(tag, value.detach().float().cpu(), step)
        self._seen(step)
        return [tag for tag, _ in values]

    def log_figure(self, tag: str, figure: Figure, step: int) -> None:
        """Write a matplotlib figure as an image (e.g. from ``ConfusionMatrix.plot``).

        The figure is rendered to PNG (``figure.savefig``) and left open: close it
        yourself if pyplot made it.

        Raises:
            ImportError: If Pillow (which comes with matplotlib) is not installed.
            TypeError: If ``figure`` is not a matplotlib figure, or ``tag``/``step`` is
                invalid.
            RuntimeError: If the logger is closed.

        Example:
            >>> import tempfile
            >>> from matplotlib.figure import Figure
            >>> fig = Figure(figsize=(2, 2))
            >>> _ = fig.add_subplot().plot([0, 1], [1, 0])
            >>> with tk.TensorBoardLogger(tempfile.mkdtemp()) as logger:
            ...     logger.log_figure("curve", fig, step=0)
        """
        owner = f"{type(self).__name__}.log_figure"
        _check_tag_step(tag, step, owner=owner)
        if not callable(getattr(figure, "savefig", None)):
            raise TypeError(f"{owner}: figure must be a matplotlib Figure, got "
                            f"{type(figure).__name__}")
        pil = require("PIL.Image", extra="plot")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        buffer.seek(0)
        with pil.open(buffer) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()),
                                      dtype=torch.uint8).view(image.height, image.width, 3)
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self._seen(step)

    def _seen(self, step: int) -> None:
        self._step = step if self._step is None else max(self._step, step)

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


def _check_tag_step(tag: object, step: object, *, owner: str) -> None:
    errors = []
    if not isinstance(tag, str) or not tag:
        errors.append(f"tag must be a non-empty string, got {tag!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        errors.append(f"step must be an int >= 0, got {step!r}")
    if errors:
        raise TypeError(f"{owner}: " + "; ".join(errors))


def _hparam(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


