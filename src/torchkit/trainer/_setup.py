"""Private helpers for Trainer: argument checks, device choice, metric and hook lookup."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchkit.callbacks import Callback
from torchkit.checkpoint import CheckpointManager
from torchkit.distributed import is_main_process

__all__ = ["is_main_process"]

HOOKS = ("on_fit_start", "on_fit_end", "on_epoch_start", "on_epoch_end",
         "on_train_batch_start", "on_train_batch_end", "on_validation_end",
         "on_checkpoint_save", "on_checkpoint_load", "on_exception")

Metric = Callable[[Any, Any], Any] | Any  # a callable, or an object with update/compute/reset


def check_config(*, model: Any, optimizer: Any, precision: Any, checkpoint: Any,
                 checkpoint_every: Any, scheduler_interval: Any, nonfinite: Any,
                 callbacks: list[Any]) -> None:
    """Raise one error listing every problem with Trainer's arguments."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    for i, cb in enumerate(callbacks):
        if not all(callable(getattr(cb, name, None)) for name in ("state_dict",
                                                                  "load_state_dict")):
            raise TypeError(
                f"callbacks[{i}] ({type(cb).__name__}) is not a callback: subclass "
                "torchkit.Callback"
            )
    errors = []
    if precision not in ("32", "bf16", "16"):
        errors.append(f"precision must be '32', 'bf16' or '16', got {precision!r}")
    if checkpoint is not None and not isinstance(checkpoint, CheckpointManager):
        errors.append(f"checkpoint must be a CheckpointManager or None, got {checkpoint!r}")
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
        or checkpoint_every < 1
    ):
        errors.append(f"checkpoint_every must be an int >= 1 or None, got {checkpoint_every!r}")
    if checkpoint_every is not None and checkpoint is None:
        errors.append("checkpoint_every needs checkpoint=CheckpointManager(...)")
    if scheduler_interval not in ("epoch", "step"):
        errors.append(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    if nonfinite not in ("raise", "skip"):
        errors.append(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if errors:
        raise ValueError("; ".join(errors))


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"`` into CUDA, then MPS, then CPU; pass any other device through."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto' or a torch device, got {device!r}") from None


def named_metrics(metrics: Mapping[str, Metric] | Sequence[Metric] | None) -> dict[str, Any]:
    """Give every metric a name: mapping keys, or the callables' ``__name__``."""
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        items = [(getattr(m, "__name__", type(m).__name__.lower()), m) for m in metrics]
    named = {}
    for name, metric in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"metric names must be non-empty strings, got {name!r}")
        stateful = all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset"))
        if not stateful and not callable(metric):
            raise TypeError(
                f"metric {name!r} must be a callable fn(outputs, targets) or have "
                f"update/compute/reset, got {type(metric).__name__}"
            )
        if name in named:
            raise ValueError(f"two metrics are named {name!r}; pass a dict to name them")
        named[name] = metric
    return named


def overrides(callback: Any, hook: str) -> bool:
    """Whether ``callback`` does something in ``hook`` (so the loop can skip no-op calls)."""
    method = getattr(type(callback), hook, None)
    if method is None:
        return False
    return not isinstance(callback, Callback) or method is not getattr(Callback, hook)


