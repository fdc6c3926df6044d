"""Shared by the surgery functions: glob patterns, submodule lookup, argument checks."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = [
    "as_patterns",
    "check_model",
    "get_submodule",
    "like",
    "matches",
    "name_hint",
    "set_submodule",
    "unmatched",
]

_HINT_SIZE = 6


def check_model(model: object, *, arg: str = "model") -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be an nn.Module, got {type(model).__name__}")
    return model


def as_patterns(value: str | Sequence[str] | None, *, arg: str) -> list[str] | None:
    """Normalise one glob pattern or a sequence of them to a list (``None`` stays)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return list(value)
    raise TypeError(
        f"{arg} must be a glob pattern (str) or a sequence of patterns, got {value!r}"
    )


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches a pattern, or lies under a module a pattern names."""
    return any(
        fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns
    )


def unmatched(patterns: Iterable[str], names: Sequence[str]) -> list[str]:
    """Return the patterns that match none of ``names``."""
    return [p for p in patterns if not any(matches(n, [p]) for n in names)]


def name_hint(names: Sequence[str], wrong: Iterable[str] = ()) -> str:
    """Describe a few of ``names``: what the ``wrong`` patterns were close to, or a sample.

    Module names (the prefixes of ``names``) are candidates too: ``"fc2"`` suggests ``fc``.
    """
    candidates = list(dict.fromkeys(
        ".".join(parts[:i]) for parts in (n.split(".") for n in names)
        for i in range(1, len(parts) + 1)
    ))
    close: list[str] = []
    for w in wrong:
        close += [c for c in difflib.get_close_matches(w, candidates, n=3, cutoff=0.6)
                  if c not in close]
    if close:
        return f"did you mean {', '.join(close)}? ({len(names)} names in all)"
    if len(names) <= _HINT_SIZE:
        return f"the names are: {', '.join(names) or '(none)'}"
    half = _HINT_SIZE // 2
    sample = [*names[:half], "...", *names[-half:]]
    return f"the names look like: {', '.join(sample)} ({len(names)} in all)"


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; a ``KeyError`` lists the names that exist."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a qualified submodule name (str), got {name!r}")
    module = model
    path: list[str] = []
    for part in name.split(".") if name else []:
        children = dict(module.named_children())
        if part not in children:
            where = f"{'.'.join(path)!r}" if path else type(model).__name__
            options = [".".join([*path, child]) for child in children]
            same_depth = [n for n, _ in model.named_modules() if n.count(".") == name.count(".")]
            close = difflib.get_close_matches(name, same_depth, n=3, cutoff=0.6)
            advice = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"no submodule {name!r} in {type(model).__name__}: the children of {where} "
                f"are: {', '.join(options) or '(none)'}{advice}"
            )
        module = children[part]
        path.append(part)
    return module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule called ``name`` (which must exist)."""
    parent_name, _, child = name.rpartition(".")
    get_submodule(model, name)
    setattr(get_submodule(model, parent_name), child, module)


def like(module: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``module`` to the device and floating-point dtype of ``old``'s first parameter."""
    reference = next(iter(old.parameters()), None)
    if reference is None:
        return module
    if reference.is_floating_point():
        return module.to(device=reference.device, dtype=reference.dtype)
    return module.to(device=reference.device)
