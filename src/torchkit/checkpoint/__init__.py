"""Checkpoints that never corrupt: atomic save, safe load, and a retention manager."""

from __future__ import annotations

from torchkit.checkpoint._files import CheckpointError, load_checkpoint, save_checkpoint
from torchkit.checkpoint._manager import CheckpointManager

__all__ = ["CheckpointError", "CheckpointManager", "load_checkpoint", "save_checkpoint"]
