"""Trainer and History: the fit / evaluate / predict loop, composed from torchkit's pieces."""

from __future__ import annotations

from torchkit.trainer._history import History
from torchkit.trainer._trainer import Trainer

__all__ = ["History", "Trainer"]
