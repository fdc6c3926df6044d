"""The ``Callback`` base class (optional hooks ``Trainer`` calls) and the recipe callbacks.

``TimeLimit`` (a planned stop), ``Throughput`` (samples/s, MFU) and ``UnfreezeSchedule``
(gradual unfreezing) work by hand too; the averaging callbacks live in ``averaging``.
"""

from __future__ import annotations

import collections
import datetime
import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from torchkit._batches import batch_size
from torchkit._names import as_patterns
from torchkit._utils import check_keys, unwrap
from torchkit.surgery import unfreeze

__all__ = ["Callback", "Throughput", "TimeLimit", "UnfreezeSchedule"]

_log = logging.getLogger(__name__)


class HistoryView(Protocol):
    """What a hook may read from ``trainer.history``: the records and one metric's values."""

    @property
    def records(self) -> list[dict[str, Any]]: ...

    def __getitem__(self, key: str) -> list[Any]: ...


@runtime_checkable
class TrainerView(Protocol):
    """What a callback hook may read from the trainer it is given.

    ``Trainer`` offers all of it (``mypy --strict`` checks this where the trainer calls
    its hooks). A hook may also set ``should_stop`` (and ``stop_reason``) to end ``fit``
    after the epoch; anything else on the trainer is not part of the hooks' contract.
    """

    should_stop: bool
    stop_reason: str | None

    @property
    def model(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def epoch(self) -> int: ...

    @property
    def batch_idx(self) -> int: ...

    @property
    def global_step(self) -> int: ...

    @property
    def history(self) -> HistoryView: ...


class Callback:
    """Base class for code that runs at fixed points of ``Trainer.fit``.

    Override only the hooks you need; each receives the trainer first and may read what
    ``TrainerView`` lists (``model``, ``optimizer``, ``epoch``, ``batch_idx``,
    ``global_step``, ``history``, ``should_stop``, ``stop_reason``) and set
    ``should_stop`` / ``stop_reason``. Every hook of the base class does nothing. A
    callback that keeps state across epochs returns it from :meth:`state_dict` (plain
    types and tensors) so that it is part of every checkpoint and restored on resume.

    Example:
        >>> class PrintEpochs(tk.Callback):
        ...     def on_epoch_end(self, trainer, metrics):
        ...         print(f"epoch {trainer.epoch}: {metrics}")
        >>> class FakeTrainer:
        ...     epoch = 3
        >>> PrintEpochs().on_epoch_end(FakeTrainer(), {"val_loss": 0.25})
        epoch 3: {'val_loss': 0.25}
        >>> tk.Callback().state_dict()
        {}
    """

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Run once at the start of ``fit``, after a resumed state has been loaded."""

    def on_fit_end(self, trainer: TrainerView) -> None:
        """Run once when ``fit`` returns normally (also after an early stop)."""

    def on_epoch_start(self, trainer: TrainerView) -> None:
        """Run at the start of each training epoch; ``trainer.epoch`` is its index."""

    def on_epoch_end(self, trainer: TrainerView, metrics: Mapping[str, float]) -> None:
        """Run at the end of each epoch, after validation, with the epoch's metrics."""

    def on_train_batch_start(self, trainer: TrainerView, batch: Any, batch_idx: int) -> None:
        """Run before each training batch's forward pass."""

    def on_train_batch_end(self, trainer: TrainerView, batch: Any, batch_idx: int) -> None:
        """Run after each training batch's backward pass (and optimizer step, if any)."""

    def on_optimizer_step(self, trainer: TrainerView) -> None:
        """Run after every optimizer step, the epoch's flushed partial window included.

        ``trainer.global_step`` already counts the step (a window skipped for nan/inf
        gradients counts too). Setting ``should_stop`` here ends ``fit`` at this step
        boundary (a planned stop, see :class:`TimeLimit`), not after the epoch.
        """

    def on_validation_end(self, trainer: TrainerView, metrics: Mapping[str, float]) -> None:
        """Run after each evaluation with its metrics (``val_loss``, ``val_acc``, ...)."""

    def on_checkpoint_save(self, trainer: TrainerView, checkpoint: dict[str, Any]) -> None:
        """Run just before a checkpoint is written; may add entries to ``checkpoint``."""

    def on_checkpoint_load(self, trainer: TrainerView, checkpoint: Mapping[str, Any]) -> None:
        """Run after a checkpoint has been loaded on resume."""

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """Run when ``fit`` is leaving because of an exception, before it propagates."""

    def state_dict(self) -> dict[str, Any]:
        """Return the callback's state; stateless callbacks return ``{}``."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""


# The hooks Trainer calls, derived once from the base class: every ``on_*`` method.
HOOKS: tuple[str, ...] = tuple(name for name in vars(Callback) if name.startswith("on_"))


def _seconds(duration: float | datetime.timedelta | str) -> float:
    """``duration`` in seconds: a number, a ``timedelta`` or ``"HH:MM:SS"``."""
    if isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, str):
        parts = duration.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"duration must be seconds, a timedelta or 'HH:MM:SS', got "
                             f"{duration!r}")
        hours, minutes, secs = (int(p) for p in parts)
        seconds = float(hours * 3600 + minutes * 60 + secs)
    elif isinstance(duration, numbers.Real) and not isinstance(duration, bool):
        seconds = float(duration)
    else:
        raise TypeError(f"duration must be seconds, a timedelta or 'HH:MM:SS', got "
                        f"{duration!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive, got {duration!r}")
    return seconds


class TimeLimit(Callback):
    """End ``fit`` at the first optimizer step after ``duration`` of training.

    A planned stop: the trainer finishes the optimizer step, saves a checkpoint (when it
    has a ``CheckpointManager`` and ``save=True``), sets ``should_stop`` and
    ``stop_reason`` and ``fit`` returns normally (SIGTERM instead raises ``SystemExit``).
    The elapsed time is part of the callback's state, so a resumed run counts on from
    where the saved one was instead of restarting the clock; one that resumes past the
    limit returns at once. Under DDP every rank reads its own clock: the stop comes at
    the trainer's first cross-rank check (every 64 optimizer steps, and at the epoch's
    end) after any rank's clock passes ``duration``, on every rank at the same step.

    Args:
        duration: Seconds, a :class:`datetime.timedelta`, or ``"HH:MM:SS"``.
        save: Save a checkpoint before stopping.

    Raises:
        TypeError: If ``duration`` has another type.
        ValueError: If it is not positive or not ``"HH:MM:SS"``.

    Example:
        >>> limit = tk.TimeLimit("01:30:00")
        >>> limit.duration_s
        5400.0
        >>> limit.load_state_dict({"elapsed_s": 5400.0})
        >>> limit.expired()
        True
    """

    def __init__(self, duration: float | datetime.timedelta | str, *, save: bool = True) -> None:
        self.duration_s = _seconds(duration)
        if not isinstance(save, bool):
            raise TypeError(f"save must be True or False, got {save!r}")
        self.save = save
        self._before_s = 0.0  # elapsed in earlier fits (or the resumed run)
        self._since: float | None = None  # monotonic time this fit started

    def elapsed_s(self) -> float:
        """Seconds of training so far, resumed runs included."""
        running = 0.0 if self._since is None else time.monotonic() - self._since
        return self._before_s + running

    def expired(self) -> bool:
        """Whether the training time has reached ``duration``."""
        return self.elapsed_s() >= self.duration_s

    def _stop(self, trainer: TrainerView) -> None:
        trainer.should_stop = True
        trainer.stop_reason = (f"time limit of {self.duration_s:g} s reached after "
                               f"{self.elapsed_s():.1f} s")

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Start the clock; stop at once if a resumed run is already past the limit."""
        self._since = time.monotonic()
        if self.expired():
            self._stop(trainer)

    def on_optimizer_step(self, trainer: TrainerView) -> None:
        """Stop at this step once the time is up."""
        if self.expired() and not trainer.should_stop:
            self._stop(trainer)

    def _pause(self) -> None:
        self._before_s, self._since = self.elapsed_s(), None

    def on_fit_end(self, trainer: TrainerView) -> None:
        """Stop the clock (a later ``fit`` counts on)."""
        self._pause()

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """Stop the clock."""
        self._pause()

    def state_dict(self) -> dict[str, Any]:
        """Return the elapsed training time in seconds."""
        return {"elapsed_s": self.elapsed_s()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the elapsed time; the clock runs again from the next ``fit``."""
        check_keys(state_dict, expected={"elapsed_s"}, owner="TimeLimit")
        self._before_s, self._since = float(state_dict["elapsed_s"]), None


class Throughput(Callback):
    """Samples and optimizer steps per second over a sliding window, with FLOPs and MFU.

    By hand, call :meth:`update` after each optimizer step with the samples it used and
    read :meth:`compute` when you log; as a callback it counts the trainer's batches,
    restarts its window each epoch (so validation time is not counted) and keeps the
    epoch's figures in ``last``. Only host clocks are read: on a GPU, which runs ahead
    of the host, the rate over a window of many steps is the true one.

    Args:
        window: The number of optimizer steps the rates average over.
        flops_per_sample: Training FLOPs per sample (forward and backward), for
            ``flops_per_s`` and ``mfu``.
        peak_flops: The device's peak FLOP/s, for ``mfu`` (needs ``flops_per_sample``).

    Raises:
        ValueError: If ``window`` is not an int >= 1, or a FLOP figure is not positive.

    Example:
        >>> meter = tk.Throughput(window=10, flops_per_sample=2e6, peak_flops=1e12)
        >>> for _ in range(3):
        ...     meter.update(32)
        >>> sorted(meter.compute())
        ['flops_per_s', 'mfu', 'samples_per_s', 'steps_per_s']
    """

    def __init__(self, *, window: int = 50, flops_per_sample: float | None = None,
                 peak_flops: float | None = None) -> None:
        errors = []
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            errors.append(f"window must be an int >= 1, got {window!r}")
        for name, value in (("flops_per_sample", flops_per_sample), ("peak_flops", peak_flops)):
            if value is not None and not (isinstance(value, numbers.Real)
                                          and not isinstance(value, bool) and value > 0):
                errors.append(f"{name} must be a positive number or None, got {value!r}")
        if peak_flops is not None and flops_per_sample is None:
            errors.append("peak_flops needs flops_per_sample (MFU is achieved / peak FLOP/s)")
        if errors:
            raise ValueError("; ".join(errors))
        self.window, self.flops_per_sample, self.peak_flops = window, flops_per_sample, \
            peak_flops
        self.last: dict[str, float] = {}
        self._pending = 0
        self.reset()

    def reset(self) -> None:
        """Empty the window and start its clock now."""
        self._points: collections.deque[tuple[float, int, int]] = collections.deque(
            [(time.perf_counter(), 0, 0)], maxlen=self.window + 1)

    def update(self, samples: int) -> None:
        """Record one optimizer step that used ``samples`` samples."""
        _, total, steps = self._points[-1]
        self._points.append((time.perf_counter(), total + int(samples), steps + 1))

    def compute(self) -> dict[str, float]:
        """Rates over the window; ``{}`` before the first :meth:`update`.

        Keys: ``samples_per_s``, ``steps_per_s``, with FLOPs ``flops_per_s`` and
        ``mfu``, and ``peak_memory_mb`` (peak CUDA memory allocated) on a CUDA machine.
        """
        (t0, s0, n0), (t1, s1, n1) = self._points[0], self._points[-1]
        if n1 == n0:
            return {}
        seconds = max(t1 - t0, 1e-12)
        result = {"samples_per_s": (s1 - s0) / seconds, "steps_per_s": (n1 - n0) / seconds}
        if self.flops_per_sample is not None:
            result["flops_per_s"] = result["samples_per_s"] * self.flops_per_sample
            if self.peak_flops is not None:
                result["mfu"] = result["flops_per_s"] / self.peak_flops
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return result

    def on_epoch_start(self, trainer: TrainerView) -> None:
        """Start a fresh window for the epoch."""
        self._pending = 0
        self.reset()

    def on_train_batch_end(self, trainer: TrainerView, batch: Any, batch_idx: int) -> None:
        """Count the batch's samples (its shape only: no device read)."""
        self._pending += batch_size(batch)

    def on_optimizer_step(self, trainer: TrainerView) -> None:
        """Record the step with the samples of its window."""
        self.update(self._pending)
        self._pending = 0

    def on_epoch_end(self, trainer: TrainerView, metrics: Mapping[str, float]) -> None:
        """Keep the epoch's figures in ``last``."""
        self.last = self.compute()
        if self.last:
            _log.info("epoch %d throughput: %.1f samples/s", trainer.epoch,
                      self.last["samples_per_s"])


class UnfreezeSchedule(Callback):
    """Unfreeze parameters by glob pattern at the start of chosen epochs (gradual unfreezing).

    ``schedule`` maps an epoch (0-based, like ``Trainer.epoch``) to the pattern(s) to
    :func:`~torchkit.unfreeze` at its start; the parameters join the optimizer as a new
    group with ``lr`` (or the first group's current LR). As a callback it steps at each
    epoch start; by hand call :meth:`step` yourself. The epochs applied are its state: on
    resume, :meth:`restore` re-applies them (``Trainer`` does this before it loads the
    optimizer's state, so the parameter groups line up). A scheduler created before
    the new groups exist does not schedule them. Under DDP, which all-reduces only the
    parameters that required grad when it wrapped the model, ``Trainer`` wraps the model
    again after an epoch start that thawed some; by hand, wrap it again yourself after a
    :meth:`step` that returned names.

    Args:
        schedule: Epoch -> glob pattern or patterns.
        optimizer: The optimizer to add groups to (``Trainer``'s by default).
        lr: The new groups' LR.

    Raises:
        TypeError: If ``schedule`` is not a mapping of ints to patterns.
        ValueError: If an epoch is negative or ``lr`` is negative.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = tk.freeze(net, "0")
        >>> opt = torch.optim.SGD(tk.trainable_parameters(net), lr=0.1)
        >>> unfreezer = tk.UnfreezeSchedule({1: "0.*"}, optimizer=opt, lr=0.01)
        >>> unfreezer.step(0, net), unfreezer.step(1, net)
        ([], ['0.weight', '0.bias'])
        >>> [group["lr"] for group in opt.param_groups]
        [0.1, 0.01]
    """

    def __init__(self, schedule: Mapping[int, str | Sequence[str]], *,
                 optimizer: torch.optim.Optimizer | None = None, lr: float | None = None
                 ) -> None:
        if not isinstance(schedule, Mapping):
            raise TypeError(f"schedule must map epochs to glob patterns, got {schedule!r}")
        self.schedule: dict[int, list[str]] = {}
        for epoch, patterns in sorted(schedule.items()):
            if isinstance(epoch, bool) or not isinstance(epoch, int):
                raise TypeError(f"schedule keys must be epochs (int), got {epoch!r}")
            if epoch < 0:
                raise ValueError(f"schedule epochs must be >= 0, got {epoch}")
            self.schedule[epoch] = as_patterns(patterns, arg=f"schedule[{epoch}]") or []
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                            f"{optimizer!r}")
        if lr is not None and not (isinstance(lr, numbers.Real) and not isinstance(lr, bool)
                                   and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0 or None, got {lr!r}")
        self.optimizer, self.lr = optimizer, lr
        self.applied: list[int] = []

    def _apply(self, epoch: int, model: nn.Module,
               optimizer: torch.optim.Optimizer | None) -> list[str]:
        lr = self.lr
        if optimizer is not None and lr is None:
            lr = optimizer.param_groups[0]["lr"]
        return unfreeze(model, self.schedule[epoch], optimizer=optimizer,
                        lr=lr if optimizer is not None else None)

    def step(self, epoch: int, model: nn.Module,
             optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        """Apply every scheduled epoch up to ``epoch`` not applied yet; return what thawed."""
        optimizer = optimizer or self.optimizer
        thawed: list[str] = []
        for scheduled in self.schedule:
            if scheduled <= epoch and scheduled not in self.applied:
                thawed += self._apply(scheduled, model, optimizer)
                self.applied.append(scheduled)
        return thawed

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-apply the loaded state's epochs to a freshly built model (and optimizer)."""
        optimizer = optimizer or self.optimizer
        for epoch in self.applied:
            self._apply(epoch, model, optimizer)

    def on_epoch_start(self, trainer: TrainerView) -> None:
        """Unfreeze what is due at this epoch."""
        self.step(trainer.epoch, unwrap(trainer.model), self.optimizer or trainer.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Return the epochs already applied."""
        return {"applied": list(self.applied)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the epochs applied (then call :meth:`restore`, as ``Trainer`` does)."""
        check_keys(state_dict, expected={"applied"}, owner="UnfreezeSchedule")
        self.applied = [int(e) for e in state_dict["applied"]]
