"""The Metric protocol: what Trainer (and any loop) needs of a stateful metric."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Metric"]


@runtime_checkable
class Metric(Protocol):
    """A stateful metric: ``update`` per batch, ``compute`` at log time, ``reset`` per epoch.

    Any object with these methods qualifies (torchmetrics metrics do); torchkit's
    :class:`ConfusionMatrix` is one.

    Example:
        >>> isinstance(tk.ConfusionMatrix(3), tk.Metric)
        True
        >>> isinstance(tk.accuracy, tk.Metric)  # a plain function is not stateful
        False
    """

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, /) -> Any:
        """Add one batch of model outputs and targets, staying on the device."""
        ...

    def compute(self) -> Any:
        """Return the metric over every batch since the last :meth:`reset`."""
        ...

    def reset(self) -> Any:
        """Forget every batch seen."""
        ...
