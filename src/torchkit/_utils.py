"""Private helpers shared by torchkit's modules: optional imports, checks, unwrap, atomic files."""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import IO, Any, Literal

from torch import nn

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


def check_module(value: object, *, arg: str = "model") -> nn.Module:
    """Return ``value`` if it is an ``nn.Module``, else raise ``TypeError`` naming ``arg``."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{arg} must be an nn.Module, got {type(value).__name__}")
    return value


def unwrap(module: nn.Module) -> nn.Module:
    """Return the model inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
            continue
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if not isinstance(inner, nn.Module):
            return module
        module = inner


TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<pid>-<random>"


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *,
                 durable: bool = True, mode: Literal["wb", "w"] = "wb") -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary file that replaces ``path``.

    The temporary file lives in the same directory (``.<name>.tmp-<pid>-<random>``); it
    is flushed, fsynced when ``durable``, closed and renamed over ``path``, and then the
    directory is fsynced (when ``durable``) so the rename survives a power loss. On any
    error the temporary file is closed and removed, so its space is freed at once, and
    ``path`` is untouched; an ``OSError`` is re-raised with its errno and ``path``.
    Text mode (``"w"``) writes UTF-8 with ``newline=""`` (what ``csv`` expects).
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-",
                                        dir=path.parent)
    except OSError as error:  # a read-only or missing directory, no inodes left
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror or error}",
                          str(path)) from error
    tmp = Path(tmp_name)
    try:
        with (os.fdopen(fd, "wb") if mode == "wb"
              else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror or error}",
                          str(path)) from error
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_directory(path.parent)
    return path


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (nothing to do on Windows)."""
    if os.name == "nt":  # pragma: no cover - NTFS journals the rename itself
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
