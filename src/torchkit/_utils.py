"""Private helpers shared by torchkit's modules: optional imports and state checks."""

from __future__ import annotations

import importlib
from collections.abc import Collection, Mapping
from types import ModuleType
from typing import Any

__all__: list[str] = []


def require(module: str, *, extra: str) -> ModuleType:
    """Import an optional dependency, or say which torchkit extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{module!r} is required for this feature; "
            f'install it with: pip install "torchkit[{extra}]"'
        ) from None


def check_keys(state: Mapping[str, Any], *, expected: Collection[str], owner: str) -> None:
    """Raise ``KeyError`` unless ``state`` has exactly the ``expected`` keys."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}.load_state_dict expects a mapping, got {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{owner}.load_state_dict got a state with missing keys {missing} and "
            f"unexpected keys {unexpected}; expected exactly {sorted(expected)}"
        )
