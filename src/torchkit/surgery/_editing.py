"""Edit a model's forward path: insert layers, and recompute blocks' activations in backward."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint

from torchkit._names import as_patterns, matches, name_hint, unmatched
from torchkit.surgery._common import check_model, get_submodule, like, set_submodule

__all__ = ["checkpoint_activations", "insert_after", "insert_before"]

_log = logging.getLogger(__name__)


def insert_after(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Run ``module`` on the output of submodule ``name``; change ``model`` in place.

    The submodule is replaced by ``nn.Sequential(submodule, module)``, so the forward
    path goes through ``module`` wherever the submodule is called. The submodule's
    ``state_dict`` keys gain a ``.0`` (``fc.weight`` becomes ``fc.0.weight``) and
    ``module``'s appear under ``.1``; a checkpoint saved after the insertion loads into
    a model edited the same way. ``module`` is moved to the submodule's device and dtype.

    Args:
        model: The model to change in place.
        name: The qualified name of the submodule, e.g. ``"layer4.1.conv2"``.
        module: The module to insert; it takes the submodule's (single) output.

    Returns:
        ``model``, so calls chain.

    Raises:
        TypeError: If ``model`` or ``module`` is not a module, or ``name`` not a string.
        ValueError: If ``name`` is ``""`` (the model itself) or ``module`` contains
            the submodule (which would make a cycle).
        KeyError: If ``name`` is not a submodule (the message lists those that exist).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> tk.insert_after(net, "0", nn.ReLU())
        Sequential(
          (0): Sequential(
            (0): Linear(in_features=4, out_features=8, bias=True)
            (1): ReLU()
          )
          (1): Linear(in_features=8, out_features=2, bias=True)
        )
        >>> net(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """
    target = _target(model, name, module)
    set_submodule(model, name, nn.Sequential(target, like(module, target)))
    return model


def insert_before(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Run ``module`` on the input of submodule ``name``; change ``model`` in place.

    The submodule is replaced by ``nn.Sequential(module, submodule)``: its
    ``state_dict`` keys gain a ``.1`` and ``module``'s appear under ``.0``.
    ``module`` is moved to the submodule's device and dtype.

    Args:
        model: The model to change in place.
        name: The qualified name of the submodule.
        module: The module to insert; its output becomes the submodule's input.

    Returns:
        ``model``, so calls chain.

    Raises:
        TypeError: If ``model`` or ``module`` is not a module, or ``name`` not a string.
        ValueError: If ``name`` is ``""`` or ``module`` contains the submodule.
        KeyError: If ``name`` is not a submodule (the message lists those that exist).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        >>> _ = tk.insert_before(net, "1", nn.Dropout(0.1))
        >>> [key for key in net.state_dict()]
        ['0.weight', '0.bias', '1.1.weight', '1.1.bias']
    """
    target = _target(model, name, module)
    set_submodule(model, name, nn.Sequential(like(module, target), target))
    return model


def checkpoint_activations(model: nn.Module, include: str | Sequence[str]) -> list[str]:
    """Recompute the activations of the matching blocks in backward, to save memory.

    Each matching submodule runs its forward under :func:`torch.utils.checkpoint.checkpoint`
    (``use_reentrant=False``) when gradients are enabled: its intermediate activations
    are dropped after the forward pass and recomputed during backward, with the same
    random state (dropout), so gradients equal the plain model's. Only the outermost
    matching modules are wrapped (``"layer*"`` checkpoints ``layer1`` ... as a whole, not
    their children too). Peak memory falls to roughly the blocks' inputs plus one
    block's activations, for one extra forward pass of compute.

    The module keeps its class, parameters and hooks: only its ``forward`` is wrapped on
    the instance, so ``state_dict`` keys, optimizers and ``print(model)`` are unchanged,
    and calling this again is harmless. Batch-norm running statistics are updated once
    per forward, as without checkpointing (the recomputation leaves them alone). Under
    ``torch.no_grad()`` the blocks run plainly.

    Args:
        model: The model to change in place.
        include: Glob pattern(s) over qualified submodule names, e.g. ``"layer*"`` or
            ``"encoder.layers.*"``.

    Returns:
        The names of the checkpointed blocks.

    Raises:
        TypeError: If ``model`` is not a module or a pattern is not a string.
        ValueError: If ``include`` is empty or a pattern matches no submodule (the
            message lists some names that exist).

    Example:
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        >>> tk.checkpoint_activations(net, "*")
        ['0', '1', '2']
        >>> net(torch.randn(2, 8, requires_grad=True)).sum().backward()
        >>> list(net.state_dict())[:2]
        ['0.0.weight', '0.0.bias']
    """
    check_model(model)
    patterns = as_patterns(include, arg="include")
    if not patterns:
        raise ValueError(
            f"include must be a pattern or a non-empty list of patterns, got {include!r}"
        )
    modules = {n: m for n, m in model.named_modules() if n}
    names = list(modules)
    wrong = unmatched(patterns, names)
    if wrong:
        raise ValueError(
            f"checkpoint_activations: include pattern(s) {', '.join(map(repr, wrong))} "
            f"matched no submodule of {type(model).__name__}; {name_hint(names, wrong)}"
        )
    chosen: list[str] = []
    for name in names:
        if matches(name, patterns) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    for name in chosen:
        module = modules[name]
        if not isinstance(module.__dict__.get("forward"), _Checkpointed):
            module.forward = _Checkpointed(module, module.__dict__.get("forward"))
    _log.info("activation checkpointing on %d blocks: %s", len(chosen), ", ".join(chosen))
    return chosen


def _target(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    check_model(model)
    check_model(module, arg="module")
    if name == "":
        raise ValueError(
            "name must name a submodule, got '' (the model itself); to add a layer around "
            "the whole model, build nn.Sequential(model, module) instead"
        )
    target = get_submodule(model, name)
    if any(m is target for m in module.modules()) or module is model:
        raise ValueError(
            f"cannot insert a {type(module).__name__} that contains {name!r} (or the "
            "model itself): the forward path would call itself; insert a new module"
        )
    return target


class _Checkpointed:
    """A module's instance-level ``forward``: its own forward under activation checkpointing."""

    def __init__(self, module: nn.Module, inner: Callable[..., Any] | None) -> None:
        self.module = module
        self.inner = inner  # a forward the instance already had, else the class's

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._forward(*args, **kwargs)
        runs = 0

        def run(*inputs: Any) -> Any:
            nonlocal runs
            runs += 1
            if runs == 1:
                return self._forward(*inputs, **kwargs)
            with _running_stats_kept(self.module):  # the recomputation in backward
                return self._forward(*inputs, **kwargs)

        return checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    # Recomputing a block in train mode would update its batch-norm statistics twice.
    saved = [
        (buffer, buffer.clone())
        for m in module.modules()
        if isinstance(m, _NormBase) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
