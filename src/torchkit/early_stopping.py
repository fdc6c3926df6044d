"""Early stopping: decide when a monitored metric has stopped improving."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from torchkit._utils import check_keys
from torchkit.callbacks import Callback

__all__ = ["EarlyStopping"]

_log = logging.getLogger(__name__)

_STATE_KEYS = ("best", "best_step", "wait", "stopped", "reason", "num_steps", "best_weights")


class EarlyStopping(Callback):
    """Stop training once a monitored value has not improved for ``patience`` observations.

    Feed one observation per evaluation with :meth:`step`; it returns ``True`` when
    training should stop. An observation improves when ``value < best - min_delta``
    (``mode="min"``) or ``value > best + min_delta`` (``mode="max"``). The first counted
    observation always improves, unless ``baseline`` is set: then ``best`` starts at
    ``baseline`` and values must beat it. ``wait`` counts consecutive non-improving
    observations and training should stop once ``wait >= patience`` (so ``patience=0``
    stops at the first non-improvement). Each call decides afresh from that state: an
    improvement after a stop resets ``wait`` and the decision.

    It is also a :class:`~torchkit.Callback`: in ``Trainer(callbacks=[...])`` it reads
    ``monitor`` from each epoch's metrics and ends ``fit`` when it says to stop. There,
    one observation is one epoch, so ``best_step`` is the epoch of the best value, as in
    ``History["epoch"]`` and the metadata of that epoch's checkpoint. Each ``fit``
    starts it afresh (best, wait, kept weights), unless its state was just restored by
    ``fit(resume=...)``; and with ``restore_best=True`` the model after ``fit`` holds the
    best weights seen, also when training ran to its last epoch without stopping early.

    Args:
        monitor: The name of the metric to watch (e.g. ``"val_loss"``); used by
            ``Trainer`` to pick the value and in messages.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is better.
        patience: How many consecutive non-improving observations to allow.
        min_delta: How much a value must beat ``best`` by to count as an improvement.
        baseline: A value to beat before anything counts as an improvement.
        restore_best: Keep a CPU copy of the model's weights at the best observation
            (pass the model to :meth:`step`) and load it back when stopping.
        start_after: Ignore the first ``start_after`` observations entirely (warm-up).
        stop_on_nonfinite: Stop at once on a nan or infinite value. When ``False`` such a
            value is simply a non-improvement.

    Attributes:
        best: The best value seen so far (or ``baseline``), ``None`` before any.
        best_step: The 0-based index, among all observations, of ``best``; ``None`` while
            no observation has improved.
        wait: Consecutive non-improving observations.
        stopped: Whether the latest observation said to stop.
        reason: Why training should stop, or ``None``.
        num_steps: Observations fed so far, ignored ones included.

    Raises:
        ValueError: If an option is out of range.

    Example:
        >>> stopper = tk.EarlyStopping(patience=2)
        >>> [stopper.step(v) for v in [1.0, 0.8, 0.9, 0.85]]
        [False, False, False, True]
        >>> stopper.best, stopper.best_step
        (0.8, 1)
        >>> print(stopper.reason)
        val_loss did not improve for 2 observations; best 0.8 at observation 1
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 5,
        min_delta: float = 0.0,
        baseline: float | None = None,
        restore_best: bool = False,
        start_after: int = 0,
        stop_on_nonfinite: bool = True,
    ) -> None:
        errors = []
        if not isinstance(monitor, str):
            errors.append(f"monitor must be a metric name (str), got {monitor!r}")
        if mode not in ("min", "max"):
            errors.append(f"mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            errors.append(f"patience must be an int >= 0, got {patience!r}")
        if isinstance(min_delta, bool) or not (isinstance(min_delta, numbers.Real)
                                               and min_delta >= 0):
            errors.append(f"min_delta must be a number >= 0, got {min_delta!r}")
        if baseline is not None and (isinstance(baseline, bool) or not (
            isinstance(baseline, numbers.Real) and math.isfinite(baseline)
        )):
            errors.append(f"baseline must be a finite number or None, got {baseline!r}")
        if isinstance(start_after, bool) or not isinstance(start_after, int) or start_after < 0:
            errors.append(f"start_after must be an int >= 0, got {start_after!r}")
        for name, flag in (("restore_best", restore_best),
                           ("stop_on_nonfinite", stop_on_nonfinite)):
            if not isinstance(flag, bool):
                errors.append(f"{name} must be True or False, got {flag!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.baseline = None if baseline is None else float(baseline)
        self.restore_best = restore_best
        self.start_after = start_after
        self.stop_on_nonfinite = stop_on_nonfinite
        self.best: float | None = self.baseline
        self.best_step: int | None = None
        self.wait = 0
        self.stopped = False
        self.reason: str | None = None
        self.num_steps = 0
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._saw_model = False  # step() was given a model (for restore()'s message)
        self._restored = False  # load_state_dict ran since the last fit started

    def _start_afresh(self) -> None:
        self.best, self.best_step, self.wait = self.baseline, None, 0
        self.stopped, self.reason, self.num_steps = False, None, 0
        self._best_weights, self._saw_model = None, False

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float | torch.Tensor, model: nn.Module | None = None) -> bool:
        """Record one observation and return ``True`` when training should stop.

        Args:
            value: The monitored value, a number or a 0-d tensor (read once on the host).
            model: The model being trained; required with ``restore_best=True``, whose
                weights are copied at each improvement and restored on stopping.

        Returns:
            Whether training should stop now.

        Raises:
            TypeError: If ``value`` is not a number or a one-element tensor.
            ValueError: If ``restore_best=True`` and ``model`` is missing.

        Example:
            >>> stopper = tk.EarlyStopping(mode="max", patience=0, start_after=1)
            >>> [stopper.step(v) for v in [0.9, 0.5, 0.6, 0.6]]
            [False, False, False, True]
        """
        value = _as_float(value)
        if self.restore_best and model is None:
            raise ValueError(
                "restore_best=True needs the model: call step(value, model) so the best "
                "weights can be kept and restored"
            )
        if model is not None:
            self._saw_model = True
        index = self.num_steps
        self.num_steps += 1
        if index < self.start_after:
            return False
        if self._improves(value):
            self.best, self.best_step, self.wait = value, index, 0
            if self.restore_best and model is not None:
                self._best_weights = _cpu_copy(model)
        else:
            self.wait += 1
        self.stopped, self.reason = self._decide(value)
        if self.stopped:
            _log.info("early stopping: %s", self.reason)
            if self.restore_best and model is not None and self._best_weights is not None:
                self.restore(model)
        return self.stopped

    __call__ = step

    def _decide(self, value: float) -> tuple[bool, str | None]:
        if self.stop_on_nonfinite and not math.isfinite(value):
            return True, f"{self.monitor} is {value}, not a finite number"
        if self.wait >= max(self.patience, 1):
            where = "" if self.best_step is None else f" at observation {self.best_step}"
            best = f"best {self.best:g}{where}" if self.best is not None else "no best yet"
            noun = "observation" if self.wait == 1 else "observations"
            return True, f"{self.monitor} did not improve for {self.wait} {noun}; {best}"
        return False, None

    def on_fit_start(self, trainer: Any) -> None:
        """Start afresh for a new ``fit``, unless ``fit(resume=...)`` just restored the state."""
        if not self._restored:
            self._start_afresh()
        self._restored = False

    def on_fit_end(self, trainer: Any) -> None:
        """With ``restore_best=True``, leave the best weights seen in the trainer's model."""
        if self.restore_best and self._best_weights is not None:
            self.restore(trainer.model)

    def on_epoch_end(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        """Feed the epoch's ``monitor`` value to :meth:`step`; stop ``trainer`` if it says so.

        Raises:
            KeyError: If the epoch's metrics have no ``monitor`` value.
        """
        if self.monitor not in metrics:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, but the epoch's metrics are "
                f"{sorted(metrics)}; pass val_data to fit() or choose another monitor"
            )
        model = trainer.model if self.restore_best else None
        if self.step(metrics[self.monitor], model):
            trainer.should_stop = True
            trainer.stop_reason = self.reason

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the weights kept at the best observation into ``model`` and return it.

        Raises:
            RuntimeError: If no weights were kept: ``restore_best=False``, no model was
                passed to :meth:`step`, or no observation improved (on ``baseline``); the
                message says which.

        Example:
            >>> net = nn.Linear(1, 1)
            >>> stopper = tk.EarlyStopping(restore_best=True, patience=1)
            >>> _ = nn.init.zeros_(net.weight)
            >>> stopper.step(0.5, net)
            False
            >>> _ = nn.init.ones_(net.weight)
            >>> stopper.step(0.7, net)  # worse: stops and restores the zeros
            True
            >>> net.weight.item()
            0.0
        """
        if self._best_weights is None:
            if self.restore_best and self._saw_model:
                what = f"improved on baseline={self.baseline:g}" if self.baseline is not None \
                    else "counted as an improvement (nan/inf never does)"
                raise RuntimeError(
                    f"no best weights to restore: none of the {self.num_steps} "
                    f"observation(s) of {self.monitor} {what} (mode={self.mode!r}, "
                    f"min_delta={self.min_delta:g}, start_after={self.start_after} ignored), "
                    "so no weights were ever kept and the model keeps its own"
                )
            raise RuntimeError(
                "no best weights to restore: create EarlyStopping(restore_best=True) and pass "
                "the model to step(value, model)"
            )
        model.load_state_dict(self._best_weights)
        return model

    def state_dict(self) -> dict[str, Any]:
        """Return the progress (best, counters, kept weights), not the configuration."""
        return {
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped": self.stopped,
            "reason": self.reason,
            "num_steps": self.num_steps,
            "best_weights": self._best_weights,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the progress returned by :meth:`state_dict`."""
        check_keys(state_dict, expected=_STATE_KEYS, owner=type(self).__name__)
        self.best = state_dict["best"]
        self.best_step = state_dict["best_step"]
        self.wait = state_dict["wait"]
        self.stopped = state_dict["stopped"]
        self.reason = state_dict["reason"]
        self.num_steps = state_dict["num_steps"]
        weights = state_dict["best_weights"]
        self._best_weights = None if weights is None else dict(weights)
        self._saw_model = self._saw_model or weights is not None
        self._restored = True  # a resume: the next fit continues this state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(monitor={self.monitor!r}, mode={self.mode!r}, "
            f"patience={self.patience}, best={self.best}, wait={self.wait})"
        )


def _as_float(value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"value must be a number or a one-element tensor, got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"value must be a number or a one-element tensor, got {value!r}")
    return float(value)


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
