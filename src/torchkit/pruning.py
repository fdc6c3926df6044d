"""Weight pruning that survives checkpoints and copies, and a schedule that prunes gradually."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn.utils import prune as _torch_prune

from torchkit._utils import check_keys, check_module
from torchkit.callbacks import Callback

__all__ = ["PruningSchedule", "prune", "remove_pruning", "restore_pruning", "sparsity"]

Method = Literal["l1", "random", "ln"]
Scope = Literal["global", "layer"]
torch_prune: Any = _torch_prune  # untyped upstream
_DEFAULT_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def prune(
    model: nn.Module,
    amount: float,
    *,
    method: Method = "l1",
    scope: Scope = "global",
    modules: Sequence[type[nn.Module]] = _DEFAULT_MODULES,
    n: float = 2,
    dim: int = 0,
) -> nn.Module:
    """Zero a fraction of the weights of ``model``'s ``modules``, in place, through masks.

    Uses :mod:`torch.nn.utils.prune`: each pruned layer keeps ``weight_orig`` (a
    parameter) and ``weight_mask`` (a buffer) and computes ``weight`` from them, so
    pruned weights stay zero while training. ``amount`` is a fraction of the weights
    that are **still unpruned** (as in torch): pruning twice by 0.5 leaves a quarter.
    Unlike torch's, a pruned model can be ``copy.deepcopy``-ed at any time.

    Args:
        model: The model to prune in place.
        amount: Fraction in ``[0, 1]`` of the unpruned weights to prune now.
        method: ``"l1"`` (smallest magnitudes), ``"random"``, or ``"ln"`` (structured:
            whole slices along ``dim`` with the smallest ``n``-norm, per layer).
        scope: ``"global"`` ranks the weights of all layers together (layers end up
            with different sparsities); ``"layer"`` prunes each layer by ``amount``.
            ``"ln"`` works per layer only.
        modules: The layer types whose ``weight`` is pruned.
        n: The norm order for ``method="ln"`` (``2``, ``1``, ``float("inf")``, ...).
        dim: The dimension along which ``method="ln"`` removes slices (0: output rows
            of a Linear, output channels of a conv).

    Returns:
        ``model``, pruned.

    Raises:
        TypeError: If ``model`` is not a module or ``modules`` not layer types.
        ValueError: If ``amount``, ``method``, ``scope``, ``n`` or ``dim`` is invalid, or
            ``model`` has no layer of the given types.

    Example:
        >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> tk.prune(model, 0.5)
        Sequential(...)
        >>> tk.sparsity(model)["total"]
        0.5
        >>> sorted(model[0].state_dict())
        ['bias', 'weight_mask', 'weight_orig']
    """
    layers = _layers(model, modules)
    _check_prune_args(amount, method, scope, n, dim, layers)
    if method == "ln":
        for _, layer in layers:
            torch_prune.ln_structured(layer, "weight", amount=float(amount), n=n, dim=dim)
    else:
        technique = torch_prune.L1Unstructured if method == "l1" else torch_prune.RandomUnstructured
        if scope == "global":
            torch_prune.global_unstructured(
                [(layer, "weight") for _, layer in layers], technique, amount=float(amount)
            )
        else:
            for _, layer in layers:
                technique.apply(layer, "weight", amount=float(amount))
    for _, layer in layers:
        _make_copyable(layer)
    return model


def remove_pruning(model: nn.Module) -> nn.Module:
    """Make the pruning of every pruned layer permanent, in place.

    Each ``weight_orig``/``weight_mask`` pair becomes a plain ``weight`` parameter that
    holds the zeros, so the state_dict loads strictly into an unpruned model of the same
    architecture. Pruned weights may become non-zero again if you keep training.

    Args:
        model: The model to change in place.

    Returns:
        ``model``, with no pruning masks left.

    Raises:
        TypeError: If ``model`` is not a module.

    Example:
        >>> model = tk.prune(nn.Linear(8, 4), 0.25)
        >>> sorted(tk.remove_pruning(model).state_dict())
        ['bias', 'weight']
        >>> tk.sparsity(model)["total"]
        0.25
    """
    check_module(model)
    for module in model.modules():
        for name in _pruned_names(module):
            torch_prune.remove(module, name)
        for hooks in (module._forward_hooks, module._load_state_dict_post_hooks):
            for key in [k for k, hook in hooks.items() if hook in _HOOKS]:
                del hooks[key]
    return model


def restore_pruning(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Re-create, in place, the pruning masks that ``state_dict`` was saved with.

    A pruned model's state_dict holds ``<name>_orig`` and ``<name>_mask`` instead of
    ``<name>``, so it does not load into a freshly built model. Call this first, then
    ``model.load_state_dict(state_dict)`` (or ``tk.load_checkpoint``) loads strictly
    and the model resumes pruned, its masks intact.

    Args:
        model: A freshly built (unpruned) model of the same architecture.
        state_dict: The model state_dict saved from the pruned model.

    Returns:
        ``model``, pruned with the saved masks.

    Raises:
        TypeError: If ``model`` is not a module or ``state_dict`` not a mapping.
        KeyError: If a saved mask belongs to no submodule or tensor of ``model``.

    Example:
        >>> saved = tk.prune(nn.Linear(8, 4), 0.5).state_dict()
        >>> model = tk.restore_pruning(nn.Linear(8, 4), saved)
        >>> model.load_state_dict(saved)
        <All keys matched successfully>
        >>> tk.sparsity(model)["total"]
        0.5
    """
    check_module(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    submodules = dict(model.named_modules())
    for key, mask in state_dict.items():
        path, _, leaf = key.rpartition(".")
        if not leaf.endswith("_mask") or f"{key[: -len('_mask')]}_orig" not in state_dict:
            continue
        name = leaf[: -len("_mask")]
        module = submodules.get(path)
        if module is None or not isinstance(getattr(module, name, None), torch.Tensor):
            raise KeyError(
                f"state_dict has a pruning mask {key!r}, but {type(model).__name__} has no "
                f"tensor {name!r} in submodule {path!r}; is it the same architecture?"
            )
        if name not in _pruned_names(module):
            torch_prune.custom_from_mask(module, name, mask=mask.detach().clone())
            _make_copyable(module)
    return model


def sparsity(
    model: nn.Module, *, modules: Sequence[type[nn.Module]] = _DEFAULT_MODULES
) -> dict[str, float]:
    """Return the fraction of zero weights of each layer and of all of them together.

    Counts every layer of the given types and every pruned layer, whether or not its
    pruning was removed. Reads the masks of pruned layers, so it is right even before
    the first forward pass after loading a checkpoint.

    Args:
        model: The model to inspect.
        modules: The layer types to count (pruned layers always count).

    Returns:
        ``{layer name: fraction of zeros in its weight, ..., "total": overall fraction}``.

    Raises:
        TypeError: If ``model`` is not a module or ``modules`` not layer types.
        ValueError: If ``model`` has no such layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> with torch.no_grad():
        ...     model[1].weight[:2] = 0
        >>> tk.sparsity(model)
        {'0': 0.0, '1': 0.5, 'total': 0.25}
    """
    check_module(model)
    kinds = _check_types(modules)
    result: dict[str, float] = {}
    zeros = total = 0
    for name, module in model.named_modules():
        weight = _effective_weight(module)
        if weight is None or not (isinstance(module, kinds) or _pruned_names(module)):
            continue
        layer_zeros = int((weight == 0).sum())
        result[name or type(module).__name__] = layer_zeros / weight.numel()
        zeros, total = zeros + layer_zeros, total + weight.numel()
    if not total:
        raise ValueError(
            f"{type(model).__name__} has no layer of types {[k.__name__ for k in kinds]}; "
            "pass modules=(...) with the layer types to count"
        )
    result["total"] = zeros / total
    return result


class PruningSchedule(Callback):
    """Prune gradually to a ``target`` sparsity over ``epochs`` steps (a cubic schedule).

    Gradual pruning with fine-tuning in between keeps more accuracy than pruning at
    once. After step ``t`` (1-based) the scheduled sparsity is
    ``target * (1 - (1 - t / epochs) ** 3)``: big steps early, small ones near the
    target, and exactly ``target`` from step ``epochs`` on (later steps do nothing).
    As a :class:`~torchkit.Callback` it steps at each epoch end with ``trainer.model``;
    in a hand-written loop call :meth:`step` with the model once per epoch.

    Args:
        target: The final fraction of pruned weights, in ``[0, 1)``.
        epochs: Steps over which to reach it.
        start_epoch: Epochs to train unpruned first (the callback's ``on_epoch_end``
            does nothing while ``trainer.epoch < start_epoch``).
        method, scope, modules, n, dim: As for :func:`prune`.

    Attributes:
        num_steps: Pruning steps taken so far (the state saved by :meth:`state_dict`).

    Raises:
        ValueError: If ``target``, ``epochs`` or ``start_epoch`` is out of range.

    Example:
        >>> model = nn.Sequential(nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 2))
        >>> schedule = tk.PruningSchedule(0.8, epochs=3)
        >>> for epoch in range(4):
        ...     # ... train one epoch ...
        ...     print(round(schedule.step(model), 3), round(tk.sparsity(model)["total"], 3))
        0.563 0.564
        0.77 0.77
        0.8 0.8
        0.8 0.8
    """

    def __init__(
        self,
        target: float,
        *,
        epochs: int,
        start_epoch: int = 0,
        method: Method = "l1",
        scope: Scope = "global",
        modules: Sequence[type[nn.Module]] = _DEFAULT_MODULES,
        n: float = 2,
        dim: int = 0,
    ) -> None:
        errors = []
        if not isinstance(target, numbers.Real) or not 0 <= target < 1:
            errors.append(f"target must be a number in [0, 1), got {target!r}")
        for label, value, low in (("epochs", epochs, 1), ("start_epoch", start_epoch, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                errors.append(f"{label} must be an int >= {low}, got {value!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.target, self.epochs, self.start_epoch = float(target), epochs, start_epoch
        self.method, self.scope, self.n, self.dim = method, scope, n, dim
        self.modules = tuple(modules)
        self.num_steps = 0

    def sparsity_at(self, step: int) -> float:
        """Return the scheduled sparsity after ``step`` steps (0 before the first)."""
        progress = min(max(step, 0), self.epochs) / self.epochs
        return self.target * (1.0 - (1.0 - progress) ** 3)

    def step(self, model: nn.Module) -> float:
        """Prune ``model`` to the next scheduled sparsity and return that sparsity."""
        before = self.sparsity_at(self.num_steps)
        self.num_steps += 1
        after = self.sparsity_at(self.num_steps)
        # prune() takes a fraction of the still-unpruned weights: (after - before) of all
        # weights is this share of the (1 - before) that are left.
        amount = (after - before) / (1.0 - before)
        prune(model, amount, method=self.method, scope=self.scope, modules=self.modules,
              n=self.n, dim=self.dim)
        return after

    def on_epoch_end(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        """Take one pruning step on ``trainer.model`` once ``start_epoch`` is reached."""
        if trainer.epoch >= self.start_epoch:
            self.step(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        """Return the number of steps taken (the masks live in the model's state)."""
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step count saved by :meth:`state_dict`."""
        check_keys(state_dict, expected={"num_steps"}, owner=type(self).__name__)
        self.num_steps = int(state_dict["num_steps"])


def _check_types(modules: Any) -> tuple[type[nn.Module], ...]:
    valid = isinstance(modules, (tuple, list)) and bool(modules) and all(
        isinstance(m, type) and issubclass(m, nn.Module) for m in modules
    )
    if not valid:
        raise TypeError(
            f"modules must be a non-empty tuple of nn.Module subclasses, got {modules!r}; "
            "e.g. modules=(nn.Linear, nn.Conv2d)"
        )
    return tuple(modules)


def _layers(model: nn.Module, modules: Any) -> list[tuple[str, nn.Module]]:
    check_module(model)
    kinds = _check_types(modules)
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer with a weight of types "
            f"{[k.__name__ for k in kinds]}; pass modules=(...) with the types to prune"
        )
    return layers


def _check_prune_args(
    amount: Any, method: str, scope: str, n: Any, dim: Any, layers: list[tuple[str, nn.Module]]
) -> None:
    errors = []
    real = isinstance(amount, numbers.Real) and not isinstance(amount, bool)
    if real and isinstance(amount, numbers.Integral):
        # torch.nn.utils.prune reads an int as a count of weights: never guess which.
        errors.append(
            f"amount must be a float fraction in [0, 1], got the int {amount!r} (an int "
            f"reads as a count of weights in torch.nn.utils.prune); pass {float(amount)!r} "
            "for that fraction"
        )
    elif not real or not 0 <= float(amount) <= 1:
        errors.append(f"amount must be a fraction in [0, 1], got {amount!r}")
    if method not in ("l1", "random", "ln"):
        errors.append(f"method must be 'l1', 'random' or 'ln', got {method!r}")
    if scope not in ("global", "layer"):
        errors.append(f"scope must be 'global' or 'layer', got {scope!r}")
    if method == "ln":
        if scope == "global":
            errors.append("method='ln' removes whole slices layer by layer: pass scope='layer'")
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or n <= 0:
            errors.append(f"n must be a positive number (or float('inf')), got {n!r}")
        ndims = {cast(torch.Tensor, layer.weight).dim() for _, layer in layers}
        if isinstance(dim, bool) or not isinstance(dim, int) or not -min(ndims) <= dim < min(ndims):
            errors.append(f"dim must be an int in [{-min(ndims)}, {min(ndims)}), got {dim!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _pruned_names(module: nn.Module) -> list[str]:
    return [hook._tensor_name for hook in module._forward_pre_hooks.values()
            if isinstance(hook, torch_prune.BasePruningMethod)]


def _effective_weight(module: nn.Module) -> torch.Tensor | None:
    if "weight" in _pruned_names(module):
        return (module.weight_orig * module.weight_mask).detach()  # type: ignore[operator]
    weight = getattr(module, "weight", None)
    return weight.detach() if isinstance(weight, torch.Tensor) else None


def _refresh(module: nn.Module) -> None:
    # torch keeps ``weight = weight_orig * weight_mask`` as a non-leaf tensor attribute,
    # which deepcopy cannot copy; a detached value copies, and forward recomputes it.
    with torch.no_grad():
        for name in _pruned_names(module):
            setattr(module, name, getattr(module, name + "_orig") * getattr(module, name + "_mask"))


def _detach_after_forward(module: nn.Module, args: Any, output: Any) -> None:
    for name in _pruned_names(module):
        setattr(module, name, getattr(module, name).detach())


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    _refresh(module)  # the loaded weight_orig/weight_mask, not the ones before loading


_HOOKS = (_detach_after_forward, _refresh_after_load)


def _make_copyable(module: nn.Module) -> None:
    _refresh(module)
    if _detach_after_forward not in module._forward_hooks.values():
        module.register_forward_hook(_detach_after_forward)
    if _refresh_after_load not in module._load_state_dict_post_hooks.values():
        cast(Any, module).register_load_state_dict_post_hook(_refresh_after_load)
