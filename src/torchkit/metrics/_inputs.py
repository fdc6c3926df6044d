"""The input convention of every metric: classes in dimension 1, index or one-hot targets."""

from __future__ import annotations

import torch

__all__ = ["check_tensors", "target_indices"]


def check_tensors(outputs: object, targets: object) -> None:
    bad = [
        f"{name} must be a torch.Tensor, got {type(value).__name__}"
        for name, value in (("outputs", outputs), ("targets", targets))
        if not isinstance(value, torch.Tensor)
    ]
    if bad:
        raise TypeError("; ".join(bad))


def target_indices(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class indices of shape ``outputs.shape`` without dimension 1."""
    index_shape = outputs.shape[:1] + outputs.shape[2:]
    if targets.shape == outputs.shape:
        return targets.argmax(dim=1)
    if targets.shape != index_shape:
        raise ValueError(
            f"targets must be class indices of shape {tuple(index_shape)} or one-hot/soft "
            f"labels of shape {tuple(outputs.shape)} to match outputs of shape "
            f"{tuple(outputs.shape)}, got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(
            f"class index targets must be an integer tensor, got {targets.dtype}; "
            "convert them with targets.long()"
        )
    return targets
