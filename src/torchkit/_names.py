"""The one glob matcher over qualified names (``"layer4.1.conv2"``), shared by every piece.

``freeze``/``unfreeze``, ``checkpoint_activations`` and ``capture`` select parameters or
submodules with these helpers, so a pattern means the same thing everywhere: an
:mod:`fnmatch` glob (``*`` also matches dots), where a pattern that names a module also
selects everything under it.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

__all__ = ["as_patterns", "matches", "name_hint", "unmatched"]

_HINT_SIZE = 6


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
