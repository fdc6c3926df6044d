"""The ``Callback`` base class: optional hooks that ``Trainer`` calls during ``fit``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Callback"]


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
