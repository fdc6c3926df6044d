"""CheckpointError: the one error a checkpoint that cannot be used raises."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, foreign or unsafe.

    Attributes:
        path: The file concerned.

    Example:
        >>> try:
        ...     tk.load_checkpoint("no/such/file.pt")
        ... except tk.CheckpointError as error:
        ...     print(error)
        checkpoint no/such/file.pt: no such file
    """

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        super().__init__(f"checkpoint {os.fspath(path)}: {cause}")
        self.path = Path(path)
