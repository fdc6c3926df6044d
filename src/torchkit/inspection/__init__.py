"""See what a model learned: feature maps and their gradients, Grad-CAM, its mistakes.

:func:`capture` hooks submodules chosen by the same glob patterns as
:func:`~torchkit.freeze` and records their outputs (and, on request, the gradients of
those outputs) for as long as a ``with`` block lasts; nothing is left on the model
afterwards. :func:`feature_grid` turns a ``(N, C, H, W)`` feature map into one image per
sample for :meth:`~torchkit.TensorBoardLogger.log_images` or
:func:`~torchkit.plot_samples`. :func:`grad_cam` says where in an image the evidence
for a class lies, and :func:`misclassified` collects the samples a model gets wrong.
"""

from __future__ import annotations

from torchkit.inspection._capture import Captured, capture, feature_grid
from torchkit.inspection._explain import grad_cam, misclassified

__all__ = ["Captured", "capture", "feature_grid", "grad_cam", "misclassified"]
