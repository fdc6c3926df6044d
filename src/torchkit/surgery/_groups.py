"""Private: optimizer parameter groups by name: per-pattern LRs, no weight decay, layer decay."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from torchkit._names import as_patterns, matches, name_hint
from torchkit.surgery._common import check_model

__all__ = ["GroupList", "param_groups"]


class GroupList(list[dict[str, Any]]):
    """The list :func:`param_groups` returns; its ``repr`` is a table of what went where."""

    def __repr__(self) -> str:
        rows = [(g["name"], str(len(g["params"])), f"{g['lr']:g}" if "lr" in g else "default",
                 f"{g['weight_decay']:g}") for g in self]
        head = ("group", "params", "lr", "weight_decay")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in [head, *rows]]
        return "\n".join(lines)

    __str__ = __repr__


def _is_lr(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(value) and float(value) >= 0


def _check(lrs: Mapping[str, float] | None, lr: float | None, weight_decay: float,
           layer_decay: float | None) -> list[str]:
    errors = []
    if lrs is not None and not isinstance(lrs, Mapping):
        raise TypeError(f"lrs must map glob patterns to learning rates, got {lrs!r}")
    for pattern, value in (lrs or {}).items():
        if not isinstance(pattern, str):
            raise TypeError(f"lrs keys must be glob patterns (str), got {pattern!r}")
        if not _is_lr(value):
            errors.append(f"lrs[{pattern!r}] must be a finite number >= 0, got {value!r}")
    if lr is not None and not _is_lr(lr):
        errors.append(f"lr must be a finite number >= 0 or None, got {lr!r}")
    if not _is_lr(weight_decay):
        errors.append(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if layer_decay is not None:
        if not (_is_lr(layer_decay) and 0 < layer_decay <= 1):
            errors.append(f"layer_decay must be a number in (0, 1] or None, got {layer_decay!r}")
        if lr is None:
            errors.append("layer_decay scales lr: pass lr=... too")
    return errors


def _depths(model: nn.Module) -> dict[str, int]:
    """Each top-level child's distance from the head (the last child is 0)."""
    children = [name for name, _ in model.named_children()]
    return {name: len(children) - 1 - i for i, name in enumerate(children)}


def param_groups(
    model: nn.Module,
    lrs: Mapping[str, float] | None = None,
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    no_decay: str | Sequence[str] = ("*.bias", "*norm*", "*bn*"),
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into named optimizer parameter groups.

    Each trainable parameter takes the LR of the first pattern in ``lrs`` that matches
    its name (patterns as in :func:`~torchkit.freeze`), else ``lr`` (or, when ``lr`` is
    ``None``, the optimizer's default: the group has no ``"lr"`` key). With
    ``layer_decay=f``, parameters no pattern claims get ``lr * f ** depth``, where the
    depth counts top-level children back from the last one (the head, depth 0);
    parameters held by the model itself count as the first child. Parameters matching
    ``no_decay`` get ``weight_decay=0``, the others ``weight_decay``. Frozen parameters
    are left out. Each group carries a ``"name"`` and ``"param_names"``; the returned
    list prints as a table.

    Args:
        model: The model.
        lrs: Glob pattern -> learning rate, first match wins.
        lr: The LR of parameters no pattern matches.
        weight_decay: The weight decay of parameters not matching ``no_decay``.
        no_decay: Glob pattern(s) of parameters without weight decay.
        layer_decay: Scale per top-level block back from the head, in ``(0, 1]``.

    Returns:
        Parameter groups to hand to any ``torch.optim`` optimizer.

    Raises:
        TypeError: If ``model`` is not a module or a pattern is not a string.
        ValueError: If a pattern of ``lrs`` selects no trainable parameter (none
            matches, or earlier patterns took all it matches), or an LR, decay or
            ``layer_decay`` is out of range (``layer_decay`` needs ``lr``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> groups = tk.param_groups(net, {"2.*": 1e-2}, lr=1e-3, weight_decay=0.05,
        ...                          no_decay=("*.bias", "1.*"))
        >>> groups
        group             params  lr     weight_decay
        default           1       0.001  0.05
        default/no_decay  3       0.001  0
        2.*               1       0.01   0.05
        2.*/no_decay      1       0.01   0
        >>> opt = torch.optim.AdamW(groups)
        >>> [g["name"] for g in opt.param_groups]
        ['default', 'default/no_decay', '2.*', '2.*/no_decay']
    """
    check_model(model)
    skip = as_patterns(no_decay, arg="no_decay") or []
    errors = _check(lrs, lr, weight_decay, layer_decay)
    if errors:
        raise ValueError("; ".join(errors))
    patterns = dict(lrs or {})
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in trainable]
    depths = _depths(model)
    top = max(depths.values(), default=0)
    groups: dict[str, dict[str, Any]] = {}
    claimed = {p: 0 for p in patterns}
    for name, param in trainable:
        group_lr: float | None
        pattern = next((p for p in patterns if matches(name, [p])), None)
        if pattern is not None:
            claimed[pattern] += 1
            key, group_lr = pattern, patterns[pattern]
        elif layer_decay is not None and lr is not None:
            depth = depths.get(name.split(".", 1)[0], top) if "." in name else top
            key, group_lr = f"layer {top - depth}", lr * layer_decay ** depth
        else:
            key, group_lr = "default", lr
        decay = 0.0 if matches(name, skip) else float(weight_decay)
        if weight_decay and not decay:
            key += "/no_decay"
        group = groups.setdefault(key, {"name": key, "params": [], "param_names": [],
                                        "weight_decay": decay})
        if group_lr is not None:
            group["lr"] = float(group_lr)
        group["params"].append(param)
        group["param_names"].append(name)
    empty = [p for p, count in claimed.items() if count == 0]
    if empty:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        raise ValueError(
            f"lrs pattern(s) {', '.join(map(repr, empty))} select no trainable parameter "
            f"(first match wins: an earlier pattern may have taken them"
            f"{'; frozen parameters are left out' if frozen else ''}); "
            f"{name_hint(names, empty)}"
        )
    return GroupList(groups.values())
