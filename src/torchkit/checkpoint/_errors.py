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


_MISMATCH_TYPES: dict[type[BaseException], type[CheckpointError]] = {}


def mismatch(path: str | os.PathLike[str], cause: str, error: BaseException) -> CheckpointError:
    """A ``CheckpointError`` that is also of ``error``'s type (``ValueError``, ``KeyError``...).

    An object's own ``load_state_dict`` error keeps its type, so ``except ValueError``
    written for it still works, and it is a ``CheckpointError`` naming the file too.
    """
    base = type(error)
    if base not in _MISMATCH_TYPES:
        _MISMATCH_TYPES[base] = type("CheckpointError", (CheckpointError, base),
                                     {"__str__": BaseException.__str__,
                                      "__module__": CheckpointError.__module__})
    return _MISMATCH_TYPES[base](path, cause)
