"""Learning-rate warm-up schedules with a closed form: plain ``LambdaLR``s that resume exactly.

Each function returns a :class:`torch.optim.lr_scheduler.LambdaLR` meant to be stepped
once per optimizer step (``Trainer(scheduler_interval="step")``). The LR at step ``s``
is a closed form of ``s`` alone, so a resumed scheduler (whose ``last_epoch`` is
restored by ``load_state_dict``) continues exactly, also in the middle of the warm-up:
nothing is composed from chained schedulers that would have to replay their history.
Parameter groups added to the optimizer later (gradual unfreezing) join the schedule at
the current step, with their own LR as base.

With base LR ``base`` (each group's own), warm-up ``w`` and ``f0 = warmup_start_factor``:
``base * (f0 + (1 - f0) * s / w)`` for ``s < w``; then cosine ``min_lr + (base - min_lr)
* (1 + cos(pi * (s - w) / (total_steps - w))) / 2``, linear ``base - (base - min_lr) *
(s - w) / (total_steps - w)``, or constant ``base``. ``min_lr`` is an absolute LR, held
from ``total_steps`` on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_constant", "warmup_cosine", "warmup_linear"]

_Shape = Literal["cosine", "linear", "constant"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(optimizer: object, total_steps: int | None, warmup_steps: object, min_lr: object,
           warmup_start_factor: object) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    errors = []
    if total_steps is not None and (not _is_int(total_steps) or total_steps < 1):
        errors.append(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not _is_int(warmup_steps) or warmup_steps < 0:  # type: ignore[operator]
        errors.append(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    elif total_steps is not None and _is_int(total_steps) \
            and warmup_steps > total_steps:  # type: ignore[operator]
        errors.append(f"warmup_steps must be <= total_steps={total_steps}, got {warmup_steps}")
    if not (isinstance(min_lr, numbers.Real) and not isinstance(min_lr, bool)
            and math.isfinite(min_lr) and float(min_lr) >= 0):
        errors.append(f"min_lr must be a finite number >= 0, got {min_lr!r}")
    if not (isinstance(warmup_start_factor, numbers.Real)
            and not isinstance(warmup_start_factor, bool)
            and 0.0 <= float(warmup_start_factor) <= 1.0):
        errors.append(f"warmup_start_factor must be a number in [0, 1], got "
                      f"{warmup_start_factor!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _factor(base: float, shape: _Shape, total: int, warmup: int, min_lr: float,
            f0: float) -> Callable[[int], float]:
    """The multiplier ``LR(s) / base`` of one parameter group."""

    def factor(step: int) -> float:
        if step < warmup:
            return f0 + (1.0 - f0) * step / warmup
        if shape == "constant" or base == 0.0:
            return 1.0
        if step >= total:
            return min_lr / base
        progress = (step - warmup) / (total - warmup)
        if shape == "cosine":
            lr = min_lr + (base - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
        else:
            lr = base - (base - min_lr) * progress
        return lr / base

    return factor


class _ClosedForm(LambdaLR):
    """A ``LambdaLR`` that also schedules parameter groups added after it was made.

    A group added later (``tk.unfreeze(optimizer=)``, ``UnfreezeSchedule``) joins the
    schedule at the current step with its own LR as base; torch's schedulers would
    fail on the group count instead.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 make: Callable[[float], Callable[[int], float]]) -> None:
        self._make = make
        bases = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        super().__init__(optimizer, [make(float(base)) for base in bases])

    def _adopt_new_groups(self) -> None:
        groups = self.optimizer.param_groups
        while len(self.base_lrs) < len(groups):
            group = groups[len(self.base_lrs)]
            group.setdefault("initial_lr", group["lr"])
            self.base_lrs.append(group["initial_lr"])
        while len(self.lr_lambdas) < len(self.base_lrs):
            self.lr_lambdas.append(self._make(float(self.base_lrs[len(self.lr_lambdas)])))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        self._adopt_new_groups()
        return super().get_lr()  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_make", None)  # a function: not state, and not loadable weights-only
        return state


def _schedule(optimizer: torch.optim.Optimizer, shape: _Shape, total: int, warmup: int,
              min_lr: float, f0: float) -> LambdaLR:
    def make(base: float) -> Callable[[int], float]:
        return _factor(base, shape, total, warmup, float(min_lr), float(f0))

    return _ClosedForm(optimizer, make)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                  min_lr: float = 0.0, warmup_start_factor: float = 0.0) -> LambdaLR:
    """Warm the LR up linearly, then decay it along a half cosine to ``min_lr``.

    Args:
        optimizer: The optimizer; each group's current LR is its base LR.
        total_steps: Optimizer steps until the LR reaches ``min_lr`` (held after).
        warmup_steps: Steps of linear warm-up from ``warmup_start_factor * base``.
        min_lr: The final LR (absolute, the same for every group).
        warmup_start_factor: The fraction of ``base`` at step 0.

    Returns:
        A ``LambdaLR``: call ``step()`` after each optimizer step.

    Raises:
        TypeError: If ``optimizer`` is not an optimizer.
        ValueError: If a step count or LR is out of range (``warmup_steps`` above
            ``total_steps``, a negative ``min_lr``, ...).

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = tk.warmup_cosine(opt, 10, warmup_steps=2)
        >>> lrs = []
        >>> for _ in range(11):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
        ...     opt.step(); sched.step()
        >>> lrs
        [0.0, 0.5, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038, 0.0]
    """
    _check(optimizer, total_steps, warmup_steps, min_lr, warmup_start_factor)
    return _schedule(optimizer, "cosine", total_steps, warmup_steps, min_lr, warmup_start_factor)


def warmup_linear(optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0,
                  min_lr: float = 0.0, warmup_start_factor: float = 0.0) -> LambdaLR:
    """Warm the LR up linearly, then decay it linearly to ``min_lr`` at ``total_steps``.

    Args, returns and raises as :func:`warmup_cosine`.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = tk.warmup_linear(opt, 6, warmup_steps=2, min_lr=0.2)
        >>> lrs = []
        >>> for _ in range(8):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
        ...     opt.step(); sched.step()
        >>> lrs
        [0.0, 0.5, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2]
    """
    _check(optimizer, total_steps, warmup_steps, min_lr, warmup_start_factor)
    return _schedule(optimizer, "linear", total_steps, warmup_steps, min_lr, warmup_start_factor)


def warmup_constant(optimizer: torch.optim.Optimizer, *, warmup_steps: int,
                    warmup_start_factor: float = 0.0) -> LambdaLR:
    """Warm the LR up linearly over ``warmup_steps``, then hold each group's base LR.

    Args:
        optimizer: The optimizer.
        warmup_steps: Steps of linear warm-up.
        warmup_start_factor: The fraction of the base LR at step 0.

    Returns:
        A ``LambdaLR``: call ``step()`` after each optimizer step.

    Raises:
        TypeError: If ``optimizer`` is not an optimizer.
        ValueError: If ``warmup_steps`` or ``warmup_start_factor`` is out of range.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
        >>> sched = tk.warmup_constant(opt, warmup_steps=4, warmup_start_factor=0.2)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
        ...     opt.step(); sched.step()
        >>> lrs
        [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    """
    _check(optimizer, None, warmup_steps, 0.0, warmup_start_factor)
    return _schedule(optimizer, "constant", max(warmup_steps, 1), warmup_steps, 0.0,
                     warmup_start_factor)
