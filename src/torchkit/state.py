"""The ``Stateful`` protocol that every resumable torchkit piece satisfies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["Stateful"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict()``, as torch modules and optimizers.

    torchkit's stateful pieces (``EarlyStopping``, ``GradAccumulator``, ...) return
    state made of plain Python types and tensors only, so a checkpoint holding it loads
    with ``torch.load(..., weights_only=True)``. They save state, never configuration:
    a piece is rebuilt from code and then handed its saved state.

    Example:
        >>> isinstance(tk.EarlyStopping(), tk.Stateful)
        True
        >>> isinstance(nn.Linear(2, 2), tk.Stateful)
        True
        >>> isinstance(object(), tk.Stateful)
        False
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the object's state."""
        ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any:
        """Restore the state returned by :meth:`state_dict`."""
        ...
