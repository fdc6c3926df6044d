"""Freeze and unfreeze parameters by name, and count and collect what is left to train."""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import UninitializedParameter

from torchkit._names import as_patterns, matches, name_hint, unmatched
from torchkit.surgery._common import check_model

__all__ = ["count_parameters", "freeze", "trainable_parameters", "unfreeze"]

_log = logging.getLogger(__name__)

_Named = list[tuple[str, nn.Parameter]]


def freeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    bn_eval: bool = True,
) -> list[str]:
    """Stop gradients for the parameters whose qualified names match ``include``.

    Patterns are :mod:`fnmatch` globs over the names of ``model.named_parameters()``
    (``*`` also matches dots). A pattern that names a module selects all of its
    parameters: ``"fc"`` is short for ``"fc.*"``.

    With ``bn_eval`` (the default) the batch-norm layers this call freezes completely
    (BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm with running statistics) are also
    kept in eval mode: they normalise with their running statistics and never update
    them, even after ``model.train()``. An instance-level ``train`` and a forward
    pre-hook do this, so module classes, ``state_dict`` keys and optimizers are left as
    they are; :func:`unfreeze` removes both (``model.requires_grad_()`` does not).
    A layer without affine parameters counts as frozen when its ``weight`` would be.

    Args:
        model: The model to change in place.
        include: Glob pattern(s) over parameter names; ``None`` selects every parameter.
        exclude: Glob pattern(s) to leave alone even when ``include`` matches them.
        bn_eval: Keep the frozen batch-norm layers in eval mode during training.

    Returns:
        The names of the parameters that were trainable and are now frozen, in
        ``named_parameters()`` order.

    Raises:
        TypeError: If ``model`` is not a module or a pattern is not a string.
        ValueError: If a pattern matches no parameter name (the message lists some
            names that exist), or ``include`` is an empty list.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> tk.freeze(net, exclude="2")
        ['0.weight', '0.bias', '1.weight', '1.bias']
        >>> [p.requires_grad for p in net.parameters()]
        [False, False, False, False, True, True]
        >>> net.train()[1].training  # the frozen BatchNorm1d stays in eval mode
        False
        >>> _ = net(torch.randn(8, 4))
        >>> net[1].running_mean  # unchanged
        tensor([0., 0., 0., 0.])
    """
    changed = _set_requires_grad(model, include, exclude, requires_grad=False, op="freeze")
    if bn_eval:
        for norm in _touched_norms(model, include, exclude):
            if not any(p.requires_grad for p in norm.parameters()):
                _lock(norm)
    return [name for name, _ in changed]


def unfreeze(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    *,
    exclude: str | Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
) -> list[str]:
    """Let gradients flow again to the parameters whose qualified names match ``include``.

    The mirror of :func:`freeze`, with the same patterns. Batch-norm layers with a
    selected parameter follow ``model.train()`` / ``model.eval()`` again (they take
    the mode of ``model`` now). Given an ``optimizer``, the newly trainable parameters
    it does not hold yet are added to it as one new parameter group, with its own
    ``lr`` (the optimizer's default when ``None``): gradual unfreezing for fine-tuning.
    Create learning-rate schedulers after adding groups, as they track each group.

    Args:
        model: The model to change in place.
        include: Glob pattern(s) over parameter names; ``None`` selects every parameter.
        exclude: Glob pattern(s) to leave alone even when ``include`` matches them.
        optimizer: An optimizer to add the newly trainable parameters to.
        lr: The learning rate of the new parameter group (needs ``optimizer``).

    Returns:
        The names of the parameters that were frozen and are now trainable.

    Raises:
        TypeError: If ``model`` or ``optimizer`` has the wrong type, or a pattern is
            not a string.
        ValueError: If a pattern matches no parameter name, ``include`` is an empty
            list, ``lr`` is negative or given without an optimizer.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = tk.freeze(net, "0")
        >>> opt = torch.optim.SGD(tk.trainable_parameters(net), lr=0.1)
        >>> tk.unfreeze(net, "0.*", optimizer=opt, lr=0.01)
        ['0.weight', '0.bias']
        >>> [group["lr"] for group in opt.param_groups]
        [0.1, 0.01]
    """
    errors = []
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    if lr is not None and not (
        isinstance(lr, numbers.Real)
        and not isinstance(lr, bool)
        and math.isfinite(lr)
        and lr >= 0
    ):
        errors.append(f"lr must be a finite number >= 0 or None, got {lr!r}")
    if lr is not None and optimizer is None:
        errors.append("lr was given without an optimizer: pass optimizer=... to add a group")
    if errors:
        raise ValueError("; ".join(errors))
    changed = _set_requires_grad(model, include, exclude, requires_grad=True, op="unfreeze")
    for norm in _touched_norms(model, include, exclude):
        if _is_locked(norm):
            _unlock(norm, training=model.training)
    if optimizer is not None:
        _add_group(optimizer, changed, lr)
    return [name for name, _ in changed]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that require gradients: what an optimizer should get.

    Build the optimizer after surgery (:func:`freeze`, :func:`replace_head`, ...):
    ``torch.optim.AdamW(tk.trainable_parameters(model), lr=1e-3)``. A layer created
    by surgery is a new tensor that an optimizer built before it never sees.

    Args:
        model: The model whose parameters to collect (shared ones once).

    Returns:
        The trainable parameters, in ``model.parameters()`` order.

    Raises:
        TypeError: If ``model`` is not a module.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = tk.freeze(net, "0")
        >>> [tuple(p.shape) for p in tk.trainable_parameters(net)]
        [(2, 4), (2,)]
    """
    check_model(model)
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of parameter elements of ``model`` (shared ones counted once).

    Args:
        model: The model to count.
        trainable_only: Count only the parameters that require gradients.

    Returns:
        The total number of elements.

    Raises:
        TypeError: If ``model`` is not a module.
        ValueError: If a lazy module has not been run yet, so its size is unknown.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> tk.count_parameters(net)
        30
        >>> _ = tk.freeze(net, "0")
        >>> tk.count_parameters(net, trainable_only=True)
        10
    """
    check_model(model)
    lazy = [n for n, p in model.named_parameters() if isinstance(p, UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"cannot count parameters {', '.join(lazy)}: they belong to lazy modules that "
            "have not run yet; run one forward pass first"
        )
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _set_requires_grad(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    *,
    requires_grad: bool,
    op: str,
) -> _Named:
    changed = [
        (name, p) for name, p in _select(model, include, exclude, op=op)
        if p.requires_grad != requires_grad
    ]
    for _, p in changed:
        p.requires_grad_(requires_grad)
    _log.debug("%s: %d parameter tensors changed", op, len(changed))
    return changed


def _select(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    *,
    op: str,
) -> _Named:
    check_model(model)
    inc, exc = as_patterns(include, arg="include"), as_patterns(exclude, arg="exclude") or []
    if inc == []:
        raise ValueError(
            f"{op}: include must be a pattern or a non-empty list of patterns, got "
            f"{include!r}; pass None to select every parameter"
        )
    named = list(model.named_parameters(remove_duplicate=False))
    names = [n for n, _ in named]
    known = names + _stats_only_names(model)  # a pattern may select just such a layer
    wrong_inc, wrong_exc = unmatched(inc or [], known), unmatched(exc, known)
    missing = [f"include pattern {p!r}" for p in wrong_inc]
    missing += [f"exclude pattern {p!r}" for p in wrong_exc]
    if missing:
        wrong = [*wrong_inc, *wrong_exc]
        raise ValueError(
            f"{op}: {' and '.join(missing)} matched no parameter of "
            f"{type(model).__name__}; {name_hint(names, wrong)}"
        )
    seen: set[int] = set()
    selected: _Named = []
    for name, p in named:
        if _selects(name, inc, exc) and id(p) not in seen:
            seen.add(id(p))
            selected.append((name, p))
    return selected


def _selects(name: str, include: list[str] | None, exclude: list[str]) -> bool:
    return (include is None or matches(name, include)) and not matches(name, exclude)


def _stats_only_names(model: nn.Module) -> list[str]:
    """The would-be ``weight`` names of batch-norm layers with statistics but no parameters."""
    return [
        f"{prefix}.weight" if prefix else "weight"
        for prefix, module in model.named_modules()
        if isinstance(module, _NormBase) and module.track_running_stats
        and not any(True for _ in module.parameters(recurse=False))
    ]


def _touched_norms(
    model: nn.Module,
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
) -> list[nn.Module]:
    """The batch-norm layers with running statistics that the patterns select a part of."""
    inc, exc = as_patterns(include, arg="include"), as_patterns(exclude, arg="exclude") or []
    touched: list[nn.Module] = []
    for prefix, module in model.named_modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            own = [n for n, _ in module.named_parameters(recurse=False)] or ["weight"]
            if any(_selects(f"{prefix}.{n}" if prefix else n, inc, exc) for n in own):
                touched.append(module)
    return touched


def _keep_eval(module: nn.Module, args: tuple[object, ...]) -> None:
    # A frozen batch-norm layer normalises with, and never updates, its running stats,
    # even when something sets ``training`` without calling ``train()``.
    module.training = False


def _train_locked(module: nn.Module, mode: bool = True) -> nn.Module:
    module.training = False
    return module


def _is_locked(module: nn.Module) -> bool:
    return any(hook is _keep_eval for hook in module._forward_pre_hooks.values())


def _lock(module: nn.Module) -> None:
    if not _is_locked(module):
        module.register_forward_pre_hook(_keep_eval)
        module.train = functools.partial(_train_locked, module)  # type: ignore[method-assign]
    module.training = False


def _unlock(module: nn.Module, *, training: bool) -> None:
    # Found by identity rather than a stored handle, so copies and pickles unlock too.
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _keep_eval:
            del module._forward_pre_hooks[key]
    train = module.__dict__.get("train")
    if isinstance(train, functools.partial) and train.func is _train_locked:
        del module.__dict__["train"]
    module.train(training)


def _add_group(optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]],
               lr: float | None) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [(n, p) for n, p in named if id(p) not in held]
    if new:
        group: dict[str, object] = {"params": [p for _, p in new]}
        if lr is not None:
            group["lr"] = lr
        if all("param_names" in g for g in optimizer.param_groups):
            # torch refuses a group without names beside named ones (tk.param_groups)
            group["param_names"] = [n for n, _ in new]
            group["name"] = f"unfrozen {len(optimizer.param_groups)}"
        optimizer.add_param_group(group)
