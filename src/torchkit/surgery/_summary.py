"""A layer-by-layer table of a model: output shapes and parameter counts from one forward."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchkit.surgery._common import check_model

__all__ = ["LayerSummary", "ModelSummary", "summary"]


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One row of a :class:`ModelSummary`: one call of one submodule.

    Attributes:
        name: The submodule's qualified name, e.g. ``"layer1.0.conv1"``.
        type: Its class name, e.g. ``"Conv2d"``.
        output_shape: The shape of its output as a tuple of ints; for a tuple, list or
            dict of outputs, a tuple of their shapes (nested alike); ``None`` for
            anything that is not a tensor.
        num_params: Its parameter elements, its children's included.
        num_trainable: How many of those require gradients.
    """

    name: str
    type: str
    output_shape: tuple[Any, ...] | None
    num_params: int
    num_trainable: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """A torchsummary-style table of a model, returned by :func:`summary`.

    ``str()`` (or ``print``) renders the table; the fields hold the same figures for
    code and tests.

    Attributes:
        layers: One row per submodule call, in call order.
        num_params: The model's parameter elements (shared ones once, uncalled
            submodules included).
        num_trainable: How many of those require gradients.
    """

    layers: tuple[LayerSummary, ...]
    num_params: int
    num_trainable: int

    def __str__(self) -> str:
        header = ("layer (type)", "output shape", "params", "trainable")
        rows = [
            (f"{r.name} ({r.type})", _format_shape(r.output_shape), f"{r.num_params:,}",
             f"{r.num_trainable:,}")
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

        def line(row: tuple[str, str, str, str]) -> str:
            return "  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]),
                              row[2].rjust(widths[2]), row[3].rjust(widths[3])]).rstrip()

        rule = "-" * len(line(header))
        frozen = self.num_params - self.num_trainable
        totals = (f"params: {self.num_params:,}  trainable: {self.num_trainable:,}  "
                  f"frozen: {frozen:,}")
        return "\n".join([line(header), rule, *map(line, rows), rule, totals])


def summary(model: nn.Module, input: Any, *, max_depth: int | None = None) -> ModelSummary:
    """Run ``model`` once on ``input`` and tabulate each layer's output shape and size.

    The forward pass runs under ``torch.no_grad()`` with every module in eval mode
    (batch-norm statistics do not move; dropout is off); each module's mode is restored
    afterwards and the hooks used are removed, so the model is left as it was. Only
    submodules that run appear as rows (auxiliary heads skipped in eval mode do not);
    the totals count every parameter.

    Args:
        model: The model to describe.
        input: The model's input: a tensor (or any single argument), or a tuple of
            positional arguments. Put it on the model's device.
        max_depth: Show only submodules at most this deep (``1``: the model's
            children); ``None`` shows all.

    Returns:
        A :class:`ModelSummary`; ``print`` it for the table.

    Raises:
        TypeError: If ``model`` is not a module.
        ValueError: If ``max_depth`` is not an int >= 1 or None.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = tk.freeze(net, "0")
        >>> print(tk.summary(net, torch.randn(3, 4)))
        layer (type)  output shape  params  trainable
        ---------------------------------------------
        0 (Linear)    [3, 8]            40          0
        1 (ReLU)      [3, 8]             0          0
        2 (Linear)    [3, 2]            18         18
        ---------------------------------------------
        params: 58  trainable: 18  frozen: 40
    """
    check_model(model)
    if max_depth is not None and (
        isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1
    ):
        raise ValueError(f"max_depth must be an int >= 1 or None, got {max_depth!r}")
    args = input if isinstance(input, tuple) else (input,)
    rows: list[dict[str, Any]] = []
    open_rows: list[dict[str, Any]] = []
    handles: list[RemovableHandle] = []
    modes = {m: m.training for m in model.modules()}

    def before(module: nn.Module, _: object, *, name: str) -> None:
        row = {"name": name, "type": type(module).__name__}
        rows.append(row)
        open_rows.append(row)

    def after(module: nn.Module, _: object, output: object) -> None:
        # Counted after the call, when a lazy module knows its size.
        num_params, num_trainable = _counts(module)
        open_rows.pop().update(output_shape=_shape(output), num_params=num_params,
                               num_trainable=num_trainable)

    for name, module in model.named_modules():
        if name and (max_depth is None or name.count(".") < max_depth):
            handles.append(module.register_forward_pre_hook(functools.partial(before, name=name)))
            handles.append(module.register_forward_hook(after))
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    num_params, num_trainable = _counts(model)
    return ModelSummary(tuple(LayerSummary(**row) for row in rows), num_params, num_trainable)


def _counts(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _shape(output: object) -> tuple[Any, ...] | None:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return tuple(_shape(o) for o in output)
    if isinstance(output, Mapping):
        return tuple(_shape(o) for o in output.values())
    return None


def _format_shape(shape: tuple[Any, ...] | None) -> str:
    if shape is None:
        return "-"
    if all(isinstance(d, int) for d in shape):
        return "[" + ", ".join(map(str, shape)) + "]"
    return "(" + ", ".join(_format_shape(s) for s in shape) + ")"
