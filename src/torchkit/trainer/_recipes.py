"""Private: what the training recipes need from Trainer: planned stops, averaged evaluation, groups.

A planned stop (``TimeLimit``, ``fit(max_steps=)``) ends ``fit`` at an optimizer-step
boundary by raising :class:`PlannedStop`, which ``fit`` catches to return normally.
Averaging callbacks (``ModelEMA``/``SWA`` with ``evaluate=True``) give the weights
validation runs under; ``UnfreezeSchedule`` re-creates its optimizer parameter groups on
resume, before the optimizer's state is loaded into them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

from torchkit.callbacks import TimeLimit, UnfreezeSchedule

__all__ = ["PlannedStop", "averaged_weights", "budget_spent", "check_max_steps", "load_order",
           "plan_stop", "planned_stop", "restore_groups", "saves_on_stop"]


class PlannedStop(Exception):
    """Raised at an optimizer-step boundary to end ``fit`` normally."""


def check_max_steps(max_steps: object) -> int | None:
    """``fit``'s ``max_steps``: ``None`` or an int >= 1."""
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise ValueError(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
    return max_steps


def budget_spent(trainer: Any) -> bool:
    """Whether ``fit(max_steps=)`` has been reached."""
    return trainer._max_steps is not None and trainer.global_step >= trainer._max_steps


def plan_stop(trainer: Any) -> None:
    """After an optimizer step: call ``on_optimizer_step``; record a planned stop it set.

    One is planned when that hook set ``should_stop`` (``TimeLimit``) or ``max_steps`` is
    reached. The trainer makes it once every rank knows of it (``StopSignals.plan``).
    """
    stopped = trainer.should_stop
    if trainer._hooks["on_optimizer_step"]:
        trainer._call("on_optimizer_step")
    if budget_spent(trainer):  # the same step on every rank
        if not trainer.should_stop:
            trainer.should_stop = True
            trainer.stop_reason = f"max_steps={trainer._max_steps} reached"
        trainer._stops.plan(shared=True)
    elif trainer.should_stop and not stopped:
        trainer._stops.plan(shared=False)  # this rank's clock: shared at the next sync


def planned_stop(trainer: Any) -> NoReturn:
    """Save (as a run that can go on when resumed), then end ``fit`` normally."""
    reason = trainer.stop_reason
    trainer._stops.forget_plan()
    if trainer.checkpoint is not None and saves_on_stop(trainer.callbacks):
        trainer.should_stop, trainer.stop_reason = False, None
        trainer._save(None)
    trainer.should_stop, trainer.stop_reason = True, reason
    raise PlannedStop


def saves_on_stop(callbacks: Sequence[Any]) -> bool:
    """Whether a planned stop saves first (unless a ``TimeLimit(save=False)`` says not to)."""
    return all(cb.save for cb in callbacks if isinstance(cb, TimeLimit))


@contextlib.contextmanager
def averaged_weights(trainer: Any) -> Iterator[None]:
    """Validate under the averaged weights of callbacks built with ``evaluate=True``."""
    with contextlib.ExitStack() as stack:
        for callback in trainer.callbacks:
            eval_weights = getattr(callback, "eval_weights", None)
            if getattr(callback, "evaluate", False) is True and callable(eval_weights):
                stack.enter_context(eval_weights(trainer))
        yield


def load_order(state: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's objects in load order: model, then trainer (callbacks), then the rest.

    So ``UnfreezeSchedule`` has added its parameter groups when the optimizer loads.
    """
    first = [k for k in ("model", "trainer") if k in state]
    return {**{k: state[k] for k in first}, **{k: v for k, v in state.items() if k not in first}}


def restore_groups(trainer: Any) -> None:
    """Let each ``UnfreezeSchedule`` re-apply the unfreezing its loaded state records."""
    for callback in trainer.callbacks:
        if isinstance(callback, UnfreezeSchedule):
            callback.restore(trainer.module, callback.optimizer or trainer.optimizer)
