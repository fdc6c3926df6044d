"""accuracy: the fraction of one batch scored right, as a 0-d tensor on the device."""

from __future__ import annotations

import numbers

import torch

from torchkit.metrics._inputs import check_tensors, target_indices

__all__ = ["accuracy"]


def accuracy(
    outputs: torch.Tensor, targets: torch.Tensor, *, top_k: int = 1, threshold: float = 0.0
) -> torch.Tensor:
    """Return the fraction of samples whose target is among the ``top_k`` highest scores.

    Multi-class: ``outputs`` of shape ``(N, C, ...)`` with ``C >= 2`` and targets as
    described in the module docs. Binary: ``outputs`` of shape ``(N, ...)`` or
    ``(N, 1, ...)`` are logits, predicted positive when ``> threshold`` (use
    ``threshold=0.5`` for probabilities); ``targets`` of shape ``(N, ...)`` or
    ``(N, 1, ...)`` hold 0/1 labels (any value ``> 0.5`` counts as positive). With
    ``(N, d1, ...)`` outputs every position counts as one sample.

    The result stays on the outputs' device: nothing is read back to the host, so
    calling it every batch costs no synchronisation. Target values are not
    range-checked (that would need a host read): an index outside ``[0, C)`` simply
    never matches.

    Args:
        outputs: Scores, logits or probabilities, class dimension 1.
        targets: Class indices (integer tensor) or one-hot/soft labels.
        top_k: How many of the highest-scoring classes may contain the target.
        threshold: The decision threshold for binary outputs.

    Returns:
        A 0-d float32 tensor in ``[0, 1]`` on the device of ``outputs``.

    Raises:
        TypeError: If an argument is not a tensor, or index targets are not integers.
        ValueError: If the shapes do not match, the batch is empty or ``top_k`` is out
            of range.

    Example:
        >>> logits = torch.tensor([[2.0, 1.0, 0.1], [0.2, 0.3, 3.0], [1.0, 2.0, 0.0]])
        >>> targets = torch.tensor([0, 1, 1])
        >>> tk.accuracy(logits, targets)
        tensor(0.6667)
        >>> tk.accuracy(logits, targets, top_k=2)
        tensor(1.)
        >>> tk.accuracy(torch.tensor([1.5, -0.3, 0.2]), torch.tensor([1, 0, 0]))  # binary
        tensor(0.6667)
    """
    check_tensors(outputs, targets)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    if outputs.numel() == 0:
        raise ValueError(
            f"accuracy of an empty batch is undefined: outputs has shape {tuple(outputs.shape)}"
        )
    if outputs.ndim == 1 or outputs.shape[1] == 1:
        correct = _binary_correct(outputs, targets, top_k=top_k, threshold=float(threshold))
    else:
        classes = outputs.shape[1]
        if top_k > classes:
            raise ValueError(
                f"top_k must be at most the number of classes ({classes}), got {top_k}"
            )
        indices = target_indices(outputs, targets)
        if top_k == 1:
            correct = outputs.argmax(dim=1) == indices
        else:
            best = outputs.topk(top_k, dim=1).indices
            correct = (best == indices.unsqueeze(1)).any(dim=1)
    return correct.float().mean()


def _binary_correct(
    outputs: torch.Tensor, targets: torch.Tensor, *, top_k: int, threshold: float
) -> torch.Tensor:
    if top_k != 1:
        raise ValueError(f"top_k must be 1 for binary outputs of shape "
                         f"{tuple(outputs.shape)}, got {top_k}")
    scores = outputs.squeeze(1) if outputs.ndim > 1 else outputs
    labels = targets.squeeze(1) if targets.ndim > 1 and targets.shape[1] == 1 else targets
    if labels.shape != scores.shape:
        raise ValueError(
            f"binary targets must have shape {tuple(scores.shape)} (or with a size-1 "
            f"dimension 1) to match outputs of shape {tuple(outputs.shape)}, got "
            f"{tuple(targets.shape)}"
        )
    return (scores > threshold) == (labels > 0.5)
