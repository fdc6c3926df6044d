"""Private: stop signals for Trainer (SIGTERM/SIGINT handlers and the cross-rank stop check)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from torchkit.distributed import get_world_size
from torchkit.trainer import _distributed as ddp

__all__ = ["SYNC_EVERY", "StopSignals", "sync_stops"]

_log = logging.getLogger("torchkit.trainer")

SYNC_EVERY = 64  # under DDP, ranks share stops every this many optimizer steps


class StopSignals:
    """A pending SIGTERM/SIGINT, and the one check that makes every rank stop together.

    :meth:`installed` catches the signals while ``fit`` runs (the trainer then finishes
    the optimizer step, saves and raises :meth:`exit_for`'s exception). Under a process
    group a signal may reach one rank only: :meth:`sync` shares it, together with
    ``should_stop`` and a nan loss, in one small collective that every rank calls at the
    same points.

    Example:
        >>> stops = StopSignals()
        >>> stops.sync(should_stop=True, nonfinite=False, device=torch.device("cpu"))
        (True, False)
        >>> stops.ready(), type(stops.exit_for(signal.SIGINT)).__name__
        (False, 'KeyboardInterrupt')
    """

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal received and not yet acted on
        self._shared = False  # every rank knows of it (always true in a single process)
        self.planned = False  # a planned stop (TimeLimit, max_steps) not yet acted on
        self._plan_shared = False  # every rank knows of it
        self._world = get_world_size()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Catch SIGTERM and SIGINT inside this context; restore the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop right now
            self.signum = signum
            _log.warning("received %s: finishing the optimizer step, then saving and "
                         "stopping", signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old)

    def sync(self, *, should_stop: bool, nonfinite: bool,
             device: torch.device) -> tuple[bool, bool]:
        """The cross-rank stop check: whether any rank should stop, or saw a nan loss.

        A signal on any rank becomes every rank's. Without a process group nothing is
        communicated and the flags come back as given.
        """
        if self._world == 1:
            return should_stop, nonfinite
        stop_any, signal_any, nan_any, plan_any = ddp.any_ranks(
            [should_stop, self.signum is not None, nonfinite, self.planned], device)
        if signal_any:
            self.signum, self._shared = self.signum or signal.SIGTERM, True
        if plan_any:
            self.planned = self._plan_shared = True
        return stop_any, nan_any

    def plan(self, *, shared: bool) -> None:
        """Record a planned stop decided on this rank; ``shared``: every rank decided it.

        A stop from this rank's own clock (TimeLimit) waits for the next :meth:`sync`,
        so that every rank stops at the same optimizer step; ``max_steps`` is reached
        at the same step everywhere.
        """
        self.planned = True
        self._plan_shared = self._plan_shared or shared

    def plan_ready(self) -> bool:
        """Whether to make the planned stop at this optimizer step: every rank knows of it."""
        return self.planned and (self._world == 1 or self._plan_shared)

    def forget_plan(self) -> None:
        """The planned stop was made (or a new ``fit`` starts): forget it."""
        self.planned = self._plan_shared = False

    def ready(self) -> bool:
        """Whether to stop at this optimizer step: a signal that every rank knows of."""
        return self.signum is not None and (self._world == 1 or self._shared)

    def take(self) -> int:
        """Return the pending signal (SIGTERM if none) and forget it."""
        signum, self.signum, self._shared = self.signum, None, False
        return int(signum or signal.SIGTERM)

    @staticmethod
    def exit_for(signum: int) -> BaseException:
        """What ends training after ``signum``: ``KeyboardInterrupt`` or ``SystemExit``."""
        if signum == signal.SIGINT:
            return KeyboardInterrupt()
        return SystemExit(128 + signum)


def sync_stops(trainer: Any, *, weights: bool = False) -> None:
    """The one cross-rank stop check: ``should_stop``, a signal and a nan loss, shared.

    An inf/nan gradient with a finite loss ruins the weights without a bad loss, so the
    weights are checked here too, with the losses (in bulk, off the per-step path):
    always at epoch ends and before saves (``weights=True``), else within a time budget.

    Raises:
        FloatingPointError: If a loss (or the weights) became nan/inf, here or on
            another rank.
    """
    ledger = trainer._ledger
    nonfinite = ledger.nonfinite()
    weights_bad = not nonfinite and ledger.checks_in_bulk and trainer._weights_guard.bad(
        trainer.model, epoch=trainer.epoch, batch_idx=trainer.batch_idx - 1,
        step=trainer.global_step, force=weights)
    nonfinite = nonfinite or weights_bad
    stop_any, nonfinite_any = trainer._stops.sync(should_stop=trainer.should_stop,
                                                  nonfinite=nonfinite, device=trainer.device)
    if stop_any and not trainer.should_stop:
        trainer.should_stop, trainer.stop_reason = True, "another rank decided to stop"
    if nonfinite_any:
        if weights_bad:
            raise trainer._weights_guard.error()
        raise ledger.error(trainer.epoch, here=nonfinite)
