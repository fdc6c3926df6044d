"""Private: the one rule for when Trainer steps its LR scheduler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["step_scheduler", "steps_per_optimizer_step"]


def steps_per_optimizer_step(scheduler: Any, interval: str) -> bool:
    """Whether the rule steps ``scheduler`` after optimizer steps (not only after epochs).

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> steps_per_optimizer_step(torch.optim.lr_scheduler.StepLR(opt, 1), "step")
        True
        >>> steps_per_optimizer_step(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), "step")
        False
    """
    return scheduler is not None and interval == "step" and not isinstance(
        scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def step_scheduler(scheduler: Any, metrics: Mapping[str, Any] | None, *, interval: str,
                   monitor: str) -> None:
    """Step ``scheduler`` after an optimizer step (``metrics=None``) or an epoch.

    Interval ``"step"`` steps after each optimizer step, ``"epoch"`` after each epoch;
    ``ReduceLROnPlateau`` steps only after an epoch, with the epoch's ``monitor`` metric.

    Raises:
        KeyError: If ``ReduceLROnPlateau``'s ``monitor`` is not among the epoch's metrics.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        >>> for loss in (1.0, 2.0):
        ...     step_scheduler(plateau, {"val_loss": loss}, interval="epoch", monitor="val_loss")
        >>> opt.param_groups[0]["lr"]
        0.1
    """
    if scheduler is None:
        return
    if metrics is None:
        if steps_per_optimizer_step(scheduler, interval):
            scheduler.step()
    elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if monitor not in metrics:
            raise KeyError(
                f"ReduceLROnPlateau watches scheduler_monitor={monitor!r}, but this epoch's "
                f"metrics are {sorted(metrics)}; pass val_data or another scheduler_monitor"
            )
        scheduler.step(metrics[monitor])
    elif interval == "epoch":
        scheduler.step()
