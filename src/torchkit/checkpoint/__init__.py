"""Checkpoints you can trust: atomic, verified save and load, retention, plain weights."""

from __future__ import annotations

from torchkit.checkpoint._dcp import consolidate_checkpoint
from torchkit.checkpoint._errors import CheckpointError
from torchkit.checkpoint._files import load_checkpoint, save_checkpoint
from torchkit.checkpoint._manager import CheckpointManager
from torchkit.checkpoint._weights import extract_weights, load_weights, save_weights

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "consolidate_checkpoint",
    "extract_weights",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "save_weights",
]
