"""Private: re-initialise selected parameters by name (``init_weights``), one method table."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchkit._names import as_patterns, matches, name_hint, unmatched
from torchkit.surgery._common import check_model

__all__ = ["INIT_METHODS", "init_weights"]


def _trunc_normal(tensor: torch.Tensor) -> None:
    nn.init.trunc_normal_(tensor, std=0.02, a=-0.04, b=0.04)


# Methods for weights with two or more dimensions (Linear, conv); named as in nn.init.
INIT_METHODS: dict[str, Callable[[torch.Tensor], object]] = {
    "kaiming_normal": lambda t: nn.init.kaiming_normal_(t, nonlinearity="relu"),
    "kaiming_uniform": lambda t: nn.init.kaiming_uniform_(t, nonlinearity="relu"),
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "orthogonal": nn.init.orthogonal_,
    "trunc_normal": _trunc_normal,
    "zeros": nn.init.zeros_,
}


def init_weights(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    method: str = "kaiming_normal",
    bias: float = 0.0,
) -> list[str]:
    """Re-initialise the parameters whose qualified names match ``include``.

    Patterns work as in :func:`~torchkit.freeze` (one glob matcher): ``"fc"`` selects
    everything under ``fc``. A selected weight with two or more dimensions is drawn
    with ``method`` (``"kaiming_normal"``/``"kaiming_uniform"`` for ReLU nets,
    ``"xavier_normal"``, ``"xavier_uniform"``, ``"orthogonal"``, ``"trunc_normal"``
    (std 0.02) or ``"zeros"``); a one-dimensional parameter named ``bias`` is set to
    ``bias``; any other one-dimensional parameter (a norm layer's scale) to 1. Random
    draws use torch's global generator, so seed it for repeatable weights.

    Args:
        model: The model to change in place.
        include: Glob pattern(s) over parameter names; ``None`` selects every parameter.
        exclude: Glob pattern(s) to leave alone even when included.
        method: How to draw weights (see above).
        bias: The value for biases.

    Returns:
        The names of the re-initialised parameters.

    Raises:
        TypeError: If ``model`` is not a module or a pattern is not a string.
        ValueError: If ``method`` is unknown or a pattern matches no parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> tk.init_weights(net, "2", method="zeros", bias=0.5)
        ['2.weight', '2.bias']
        >>> net[2].bias
        Parameter containing:
        tensor([0.5000, 0.5000], requires_grad=True)
    """
    check_model(model)
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, INIT_METHODS))}, "
                         f"got {method!r}")
    if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
        raise ValueError(f"bias must be a finite number, got {bias!r}")
    includes = as_patterns(include, arg="include")
    excludes = as_patterns(exclude, arg="exclude") or []
    named = dict(model.named_parameters())
    names = list(named)
    wrong = unmatched([*(includes or []), *excludes], names)
    if wrong:
        raise ValueError(f"init_weights: pattern(s) {', '.join(map(repr, wrong))} match no "
                         f"parameter of {type(model).__name__}; {name_hint(names, wrong)}")
    chosen = [n for n in names
              if (includes is None or matches(n, includes)) and not matches(n, excludes)]
    draw = INIT_METHODS[method]
    with torch.no_grad():
        for name in chosen:
            tensor = named[name]
            if tensor.dim() >= 2:
                draw(tensor)
            elif name.rsplit(".", 1)[-1] == "bias":
                tensor.fill_(bias)
            else:
                tensor.fill_(1.0)
    return chosen
