"""Private FSDP2 helpers: find fully_shard modules, switch their gradient sync, reduce late."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["fsdp_modules", "has_dtensor_params", "local_tensors", "reduce_pending",
           "set_gradient_sync"]


def has_dtensor_params(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2, tensor parallel)."""
    return any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
               for p in model.parameters())


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each DTensor (a view: in-place changes reach the DTensor)."""
    return [t.to_local() if type(t).__name__ == "DTensor" else t  # type: ignore[attr-defined]
            for t in tensors]


def fsdp_modules(model: nn.Module | None) -> list[Any]:
    """The modules of ``model`` that ``fully_shard`` was applied to, outermost first."""
    if model is None:
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch build without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(modules: list[Any], enabled: bool) -> None:
    """Turn the gradient reduce-scatter of every FSDP module on or off (the next backward)."""
    for module in modules:
        module.set_requires_gradient_sync(enabled, recurse=False)


def reduce_pending(modules: list[Any]) -> None:
    """Reduce-scatter the gradients that backward passes without sync left unsharded.

    torch has no public call for this (a partial accumulation window that ended without
    a synced backward): it runs each parameter group's own post-backward reduction, as
    the last backward of a window would have, innermost modules first, then waits for
    it. Every rank must call it (it is a collective).
    """
    set_gradient_sync(modules, True)
    groups = [group for module in reversed(modules) for group in _param_groups(module)]
    for group in groups:
        group.post_backward()
    for group in groups:
        group.finalize_backward()


def _param_groups(module: Any) -> list[Any]:
    """The FSDP parameter groups of one ``fully_shard`` module (private torch state).

    torch 2.8 keeps at most one (``_fsdp_param_group``, None without parameters); newer
    releases keep a list (``_fsdp_param_groups``).
    """
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = state._fsdp_param_group
    return [] if group is None else [group]
