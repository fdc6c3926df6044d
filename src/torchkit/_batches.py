"""Private helpers that take batches apart: device moves, inputs/targets, sample counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__: list[str] = []

_INPUT_KEYS = ("inputs", "input", "x", "images", "image")
_TARGET_KEYS = ("targets", "target", "y", "labels", "label")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``, without blocking where it can."""
    kind = type(batch)
    if kind is tuple or kind is list:  # first: the common case, per batch
        for t in batch:
            if not isinstance(t, torch.Tensor) or t.device != device:
                break
        else:
            return batch  # already in place: no copy of the container
    elif isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _pick(batch: Mapping[str, Any], keys: tuple[str, ...], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise KeyError(
        f"a dict batch needs its {what} under one of the keys {list(keys)}, got keys "
        f"{sorted(batch)}; for anything else, override train_step/eval_step/predict_step"
    )


def split_batch(batch: Any) -> tuple[Any, Any]:
    """Return ``(inputs, targets)`` from a ``(inputs, targets)`` sequence or a dict."""
    if type(batch) in (list, tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        return _pick(batch, _INPUT_KEYS, "inputs"), _pick(batch, _TARGET_KEYS, "targets")
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    kind = f"a {type(batch).__name__}" + (f" of length {len(batch)}"
                                         if isinstance(batch, list | tuple) else "")
    raise TypeError(
        f"the default step expects a batch (inputs, targets) or a dict with 'inputs' and "
        f"'targets', got {kind}; override train_step/eval_step for other batches"
    )


def batch_inputs(batch: Any) -> Any:
    """Return the inputs of a batch for prediction: a tensor, ``batch[0]`` or ``"inputs"``."""
    if isinstance(batch, Mapping):
        return _pick(batch, _INPUT_KEYS, "inputs")
    if isinstance(batch, list | tuple):
        return batch[0]
    return batch


def batch_size(batch: Any) -> int:
    """Return the number of samples: the first dimension of the first tensor found."""
    kind = type(batch)
    if (kind is tuple or kind is list) and batch and isinstance(batch[0], torch.Tensor):
        first = batch[0]  # first: the common case, per batch
        return first.shape[0] if first.ndim else 1
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, list | tuple) or isinstance(batch, Mapping):
        for value in values:
            size = batch_size(value)
            if size:
                return size
    return 0


def check_not_empty(batch: Any, epoch: int, batch_idx: int) -> None:
    """Refuse a batch with 0 samples (its mean loss is nan): say what it is instead."""
    shape = first_shape(batch)
    if shape is None or not shape or shape[0] != 0:
        return  # a custom batch whose size is unknown
    raise ValueError(
        f"batch {batch_idx} of epoch {epoch} has 0 samples (its first tensor has shape "
        f"{shape}): a 0-sample batch has no mean loss; check the sampler / "
        "collate_fn, or drop empty batches"
    )


def first_shape(batch: Any) -> tuple[int, ...] | None:
    """The shape of the first tensor in a batch (``None`` if it holds none at its top)."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape)
    if not isinstance(batch, Mapping | list | tuple):
        return None
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
    return None
