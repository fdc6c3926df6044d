"""See what a model learned: feature maps and their gradients, Grad-CAM, its mistakes."""

from __future__ import annotations

from torchkit.inspection._capture import Captured, capture, feature_grid, grad_cam, misclassified

__all__ = ["Captured", "capture", "feature_grid", "grad_cam", "misclassified"]
