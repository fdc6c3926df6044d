"""The Logger base class and the metric checks every torchkit logger shares."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchkit._utils import check_keys

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Logger", "check_hparams", "check_metrics", "check_run_state"]

class Logger:
    """Base class of torchkit's loggers; subclass it to log anywhere else.

    Only :meth:`log_metrics` must be overridden (it raises ``NotImplementedError``
    here); the other methods do nothing by default. A logger is a context manager
    that closes itself on exit. ``Trainer`` calls, on rank 0 only: ``log_graph`` with
    the first training batch's inputs, ``log_metrics`` once per epoch (the epoch is
    the step), ``log_hparams`` at the end of ``fit``, then ``flush`` (closing is yours,
    so one logger can span several ``fit`` calls); its checkpoints hold
    ``state_dict()``.

    Example:
        >>> class ListLogger(tk.Logger):
        ...     def __init__(self):
        ...         self.rows = []
        ...     def log_metrics(self, metrics, step):
        ...         self.rows.append((step, dict(metrics)))
        >>> with ListLogger() as logger:
        ...     logger.log_metrics({"loss": 0.5}, step=10)
        >>> logger.rows
        [(10, {'loss': 0.5})]
    """

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Record scalar ``metrics`` (numbers or one-element tensors) at ``step``."""
        raise NotImplementedError(
            f"{type(self).__name__} must override log_metrics(metrics, step)"
        )

    def log_hparams(
        self, hparams: Mapping[str, Any], metrics: Mapping[str, float | torch.Tensor]
    ) -> None:
        """Record the run's hyperparameters with its final ``metrics``; a no-op here."""

    def log_graph(self, model: nn.Module, example_input: Any) -> bool:
        """Record the model's graph if the logger supports it; return whether it did."""
        return False

    def flush(self) -> None:
        """Write buffered records out; a no-op here."""

    def close(self) -> None:
        """Flush and release files; a no-op here."""

    def state_dict(self) -> dict[str, Any]:
        """Return what a resumed run needs to continue the same log; ``{}`` here."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        check_keys(state_dict, expected=(), owner=type(self).__name__)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def check_metrics(
    metrics: Mapping[str, float | torch.Tensor], step: int, *, owner: str
) -> dict[str, float]:
    """Validate metrics and a step (``owner`` names the caller) and read them to the host."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{owner} expects a mapping of metric names to numbers, got "
            f"{type(metrics).__name__}"
        )
    errors = []
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        errors.append(f"step must be an int >= 0, got {step!r}")
    values: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name or name == "step":
            errors.append(f"metric names must be non-empty strings other than 'step', "
                          f"got {name!r}")
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            values[name] = float(value.item())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            values[name] = float(value)
        else:
            errors.append(f"metric {name!r} must be a number or a one-element tensor, "
                          f"got {value!r}")
    if errors:
        raise TypeError(f"{owner}: " + "; ".join(errors))
    return values




def check_hparams(hparams: Any, metrics: Mapping[str, float | torch.Tensor], step: int, *,
                  owner: str) -> dict[str, float]:
    """Validate ``log_hparams``' arguments; return the final metrics read to the host."""
    values = check_metrics(metrics, step, owner=owner)
    if not isinstance(hparams, Mapping):
        raise TypeError(f"hparams must be a mapping of names to values, got "
                        f"{type(hparams).__name__}")
    bad = [repr(name) for name in hparams if not isinstance(name, str)]
    if bad:
        raise TypeError(f"hyperparameter names must be strings, got {', '.join(bad)}")
    return values


def check_run_state(owner: str, run_id: Any, step: Any) -> None:
    """Validate a run-tracking logger's saved ``run_id`` and last ``step``."""
    errors = []
    if run_id is not None and not isinstance(run_id, str):
        errors.append(f"'run_id' must be a string or None, got {run_id!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        errors.append(f"'step' must be an int or None, got {step!r}")
    if errors:
        raise TypeError(f"{owner} state: " + "; ".join(errors))
