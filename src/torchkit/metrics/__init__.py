"""Classification metrics computed on the device, without a host sync per batch."""

from __future__ import annotations

from torchkit.metrics._confusion import ConfusionMatrix, Metric, accuracy

__all__ = ["ConfusionMatrix", "Metric", "accuracy"]
