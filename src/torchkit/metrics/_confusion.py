"""ConfusionMatrix: (true, predicted) counts across batches on the device, and scores from them."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from torchkit._utils import check_keys, require
from torchkit.metrics._inputs import check_tensors, target_indices

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ConfusionMatrix"]

_log = logging.getLogger(__name__)

_NORMALIZE = (None, "true", "pred", "all")


class ConfusionMatrix:
    """Count (true class, predicted class) pairs across batches, on the device.

    Rows are true classes and columns predicted classes: ``compute()[i, j]`` counts
    samples of class ``i`` predicted as ``j``. :meth:`update` never reads back to the
    host; an index outside ``[0, num_classes)`` (in targets or predictions) is counted
    apart and makes :meth:`compute` raise, so such samples never vanish silently.

    Args:
        num_classes: The number of classes ``C`` (at least 2).
        normalize: What :meth:`compute` divides the counts by: ``None`` (raw counts),
            ``"true"`` (each row sums to 1: recall), ``"pred"`` (each column sums to 1:
            precision) or ``"all"`` (the whole matrix sums to 1). Rows, columns or
            matrices without samples stay 0.
        device: Where to keep the counts; batches are moved there. ``None`` keeps them
            on the device of the latest batch.

    Attributes:
        num_classes: ``C``.
        normalize: The normalisation :meth:`compute` applies.

    Raises:
        TypeError: If ``num_classes`` is not an int.
        ValueError: If ``num_classes < 2`` or ``normalize`` is unknown.

    Example:
        >>> cm = tk.ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 9.0]]), torch.tensor([0, 1]))
        >>> cm.update(torch.tensor([2, 2]), torch.tensor([2, 1]))  # predicted indices
        >>> cm.compute()
        tensor([[1, 0, 0],
                [0, 0, 2],
                [0, 0, 1]])
        >>> cm.per_class_accuracy()
        tensor([1., 0., 1.])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        normalize: Literal["true", "pred", "all"] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"num_classes must be an int, got {num_classes!r}")
        errors = []
        if num_classes < 2:
            errors.append(f"num_classes must be >= 2, got {num_classes}")
        if normalize not in _NORMALIZE:
            errors.append(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.num_classes = num_classes
        self.normalize = normalize
        self._device = None if device is None else torch.device(device)
        # C*C pair counts plus one last bin for out-of-range pairs (checked in compute).
        self._counts = torch.zeros(num_classes * num_classes + 1, dtype=torch.long,
                                   device=self._device)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch: scores ``(N, C, ...)`` (argmax taken) or predicted indices.

        Args:
            outputs: Scores with class dimension 1, or integer predicted class indices
                of the same shape as index ``targets``.
            targets: Class indices (integer tensor) or one-hot/soft labels shaped like
                score ``outputs``.

        Raises:
            TypeError: If an argument is not a tensor or indices are not integers.
            ValueError: If the shapes do not match ``num_classes`` or each other.

        Example:
            >>> cm = tk.ConfusionMatrix(2)
            >>> cm.update(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]))
            >>> cm.compute().tolist()
            [[1, 1], [0, 1]]
        """
        preds, labels = self._pairs(outputs, targets)
        device = labels.device if self._device is None else self._device
        if self._counts.device != device:
            self._counts = self._counts.to(device)
        preds, labels = preds.reshape(-1).to(device), labels.reshape(-1).to(device)
        c = self.num_classes
        valid = (labels >= 0) & (labels < c) & (preds >= 0) & (preds < c)
        # scatter_add_ (not bincount) because bincount reads its maximum back to the host.
        index = torch.where(valid, labels.long() * c + preds.long(), c * c)
        self._counts.scatter_add_(0, index, torch.ones_like(index))

    def _pairs(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensors(outputs, targets)
        if outputs.is_floating_point():
            if outputs.ndim < 2 or outputs.shape[1] != self.num_classes:
                raise ValueError(
                    f"score outputs must have shape (N, {self.num_classes}, ...) with the "
                    f"classes in dimension 1, got {tuple(outputs.shape)}; pass integer "
                    "predicted indices instead (e.g. (logits > 0).long() for binary)"
                )
            return outputs.argmax(dim=1), target_indices(outputs, targets)
        if outputs.is_complex() or targets.is_floating_point() or targets.is_complex():
            raise TypeError(
                f"predicted indices need integer targets of the same shape, got outputs "
                f"{outputs.dtype} and targets {targets.dtype}; convert them with .long()"
            )
        if outputs.shape != targets.shape:
            raise ValueError(
                f"predicted indices and targets must have the same shape, got "
                f"{tuple(outputs.shape)} and {tuple(targets.shape)}"
            )
        return outputs, targets

    def counts(self) -> torch.Tensor:
        """Return the raw ``(C, C)`` counts (a view), without the range check.

        Example:
            >>> cm = tk.ConfusionMatrix(2)
            >>> cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))  # 5 is out of range
            >>> cm.counts().tolist()
            [[1, 0], [0, 0]]
        """
        c = self.num_classes
        return self._counts[: c * c].view(c, c)

    def compute(self) -> torch.Tensor:
        """Return the matrix, normalised as configured (reads one number to the host).

        Returns:
            A ``(C, C)`` tensor on the counts' device: int64 counts, or float32 with
            ``normalize`` set.

        Raises:
            ValueError: If some batch had an index outside ``[0, num_classes)``.

        Example:
            >>> cm = tk.ConfusionMatrix(2, normalize="true")
            >>> cm.update(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]))
            >>> cm.compute()
            tensor([[0.6667, 0.3333],
                    [0.0000, 1.0000]])
        """
        counts = self._checked_counts()
        if self.normalize is None:
            return counts.clone()
        total = counts.float()
        if self.normalize == "true":
            denominator = total.sum(dim=1, keepdim=True)
        elif self.normalize == "pred":
            denominator = total.sum(dim=0, keepdim=True)
        else:
            denominator = total.sum()
        return total / denominator.clamp(min=1)

    def per_class_accuracy(self) -> torch.Tensor:
        """Return each class's recall (diagonal over row sums); ``nan`` for absent classes.

        Raises:
            ValueError: If some batch had an out-of-range index (as :meth:`compute`).

        Example:
            >>> cm = tk.ConfusionMatrix(3)
            >>> cm.update(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]))
            >>> cm.per_class_accuracy()
            tensor([1.0000, 0.5000,    nan])
        """
        counts = self._checked_counts().float()
        return counts.diagonal() / counts.sum(dim=1)

    def precision(self, average: Literal["macro", "micro"] | None = "macro") -> torch.Tensor:
        """Return precision: of the samples predicted as a class, the fraction that are it.

        Args:
            average: ``"macro"``: the mean over the classes that occur (as a target or
                a prediction; a class never predicted counts 0); ``"micro"``: over all
                samples (equal to accuracy for single-label data); ``None``: per class,
                ``nan`` for a class never predicted.

        Returns:
            A float32 0-d tensor (or ``(C,)`` with ``average=None``) on the counts'
            device; ``nan`` when no sample was seen.

        Raises:
            ValueError: If ``average`` is unknown or an index was out of range.

        Example:
            >>> cm = tk.ConfusionMatrix(3)
            >>> cm.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]))
            >>> cm.precision(None), cm.precision(), cm.precision("micro")
            (tensor([0.5000, 1.0000, 0.0000]), tensor(0.5000), tensor(0.5000))
        """
        return self._score("precision", average)

    def recall(self, average: Literal["macro", "micro"] | None = "macro") -> torch.Tensor:
        """Return recall: of the samples of a class, the fraction predicted as it.

        ``average`` as for :meth:`precision`; per class, ``nan`` for a class with no
        samples (as :meth:`per_class_accuracy`, which is the per-class recall).

        Example:
            >>> cm = tk.ConfusionMatrix(3)
            >>> cm.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]))
            >>> cm.recall(None), cm.recall()
            (tensor([1.0000, 0.3333,    nan]), tensor(0.4444))
        """
        return self._score("recall", average)

    def f1(self, average: Literal["macro", "micro"] | None = "macro") -> torch.Tensor:
        """Return the F1 score, ``2 * TP / (2 * TP + FP + FN)`` per class, then averaged.

        ``average`` as for :meth:`precision`; per class, ``nan`` for a class that never
        occurs.

        Example:
            >>> cm = tk.ConfusionMatrix(3)
            >>> cm.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]))
            >>> cm.f1(None), cm.f1()
            (tensor([0.6667, 0.5000, 0.0000]), tensor(0.3889))
        """
        return self._score("f1", average)

    def _score(self, kind: str, average: str | None) -> torch.Tensor:
        if average not in ("macro", "micro", None):
            raise ValueError(f"average must be 'macro', 'micro' or None, got {average!r}")
        counts = self._checked_counts().double()
        tp = counts.diagonal()
        fp, fn = counts.sum(dim=0) - tp, counts.sum(dim=1) - tp
        if average == "micro":
            tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
        numerator = 2 * tp if kind == "f1" else tp
        denominator = {"precision": tp + fp, "recall": tp + fn, "f1": 2 * tp + fp + fn}[kind]
        score = numerator / denominator  # 0 / 0 -> nan: undefined
        if average == "macro":
            occurs = (tp + fp + fn) > 0
            score = torch.where(occurs, score.nan_to_num(0.0), 0.0).sum() / occurs.sum()
        return score.float()

    def _checked_counts(self) -> torch.Tensor:
        invalid = int(self._counts[-1])
        if invalid:
            raise ValueError(
                f"{invalid} sample(s) had a target or predicted index outside "
                f"[0, {self.num_classes}); check num_classes and the labels (an "
                "ignore_index such as -100 or 255 must be filtered out), then reset()"
            )
        return self.counts()

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of the default process group, in place.

        Call it on every rank before :meth:`compute` (``Trainer.evaluate`` does) so the
        matrix, and :meth:`precision` / :meth:`recall` / :meth:`f1`, cover every rank's
        samples. Without a process group it does nothing. The counts must be on a
        device the backend works on (CPU for gloo, this rank's GPU for nccl).

        Example:
            >>> cm = tk.ConfusionMatrix(2)
            >>> cm.update(torch.tensor([1, 0]), torch.tensor([1, 1]))
            >>> cm.all_reduce()  # one process: unchanged
            >>> cm.compute().tolist()
            [[0, 0], [1, 1]]
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and self._counts.device.type != "cuda":
                self._counts = self._counts.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(self._counts)

    def reset(self) -> None:
        """Zero every count.

        Example:
            >>> cm = tk.ConfusionMatrix(2)
            >>> cm.update(torch.tensor([1]), torch.tensor([1]))
            >>> cm.reset()
            >>> int(cm.compute().sum())
            0
        """
        self._counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Return the counts: ``{"counts": (C, C) int64, "num_invalid": 0-d int64}``."""
        c = self.num_classes
        return {"counts": self.counts().clone(), "num_invalid": self._counts[c * c].clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore counts returned by :meth:`state_dict` (onto this matrix's device).

        Raises:
            KeyError: If keys are missing or unexpected.
            ValueError: If the counts are not a ``(C, C)`` tensor for this matrix's ``C``.
        """
        check_keys(state_dict, expected=("counts", "num_invalid"), owner=type(self).__name__)
        counts, invalid = state_dict["counts"], state_dict["num_invalid"]
        c = self.num_classes
        if not isinstance(counts, torch.Tensor) or counts.shape != (c, c):
            got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts)
            raise ValueError(
                f"ConfusionMatrix.load_state_dict expects counts of shape ({c}, {c}) for "
                f"num_classes={c}, got {got}; build the matrix with the saved num_classes"
            )
        flat = torch.cat([counts.reshape(-1), torch.as_tensor(invalid).reshape(1)])
        self._counts = flat.to(self._counts.device, torch.long)

    def plot(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        ax: Axes | None = None,
    ) -> Figure:
        """Draw the matrix as an annotated heat map (needs the ``plot`` extra).

        Uses :class:`matplotlib.figure.Figure` directly, not pyplot, so it works
        headless and leaves no global figure open.

        Args:
            path: Save the figure there (format from the suffix, e.g. ``.png``).
            class_names: Tick labels, one per class (default: the indices).
            ax: Draw into these axes instead of a new figure.

        Returns:
            The figure drawn into.

        Raises:
            ImportError: If matplotlib is not installed.
            ValueError: If ``class_names`` does not have ``num_classes`` entries (and
                as :meth:`compute`).

        Example:
            >>> cm = tk.ConfusionMatrix(2, normalize="true")
            >>> cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
            >>> fig = cm.plot(class_names=["cat", "dog"])
            >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
            ['cat', 'dog']
        """
        names = [str(i) for i in range(self.num_classes)] if class_names is None else list(
            class_names)
        if len(names) != self.num_classes:
            raise ValueError(
                f"class_names must have num_classes={self.num_classes} entries, got "
                f"{len(names)}"
            )
        matrix = self.compute().cpu()
        if ax is None:
            figure_module = require("matplotlib.figure", extra="plot")
            size = 2.0 + 0.5 * self.num_classes
            fig: Figure = figure_module.Figure(figsize=(size, size), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure.figure  # the root figure, also when ax is in a SubFigure
        _draw(ax, matrix, names, normalized=self.normalize is not None)
        if path is not None:
            fig.savefig(os.fspath(path))
            _log.info("saved confusion matrix plot to %s", path)
        return fig

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, "
            f"normalize={self.normalize!r}, device={self._counts.device})"
        )


def _draw(ax: Axes, matrix: torch.Tensor, names: list[str], *, normalized: bool) -> None:
    values = matrix.tolist()
    image = ax.imshow(values, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    peak = float(matrix.max()) if matrix.numel() else 0.0
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            text = f"{value:.2f}" if normalized else str(value)
            color = "white" if peak and value > peak / 2 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color)
    ax.figure.colorbar(image, ax=ax)
