"""Private: Trainer's sharded models: call ``parallelize``, re-point the optimizer, no DDP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchkit.distributed import get_world_size

__all__ = ["build_mesh", "prepare", "repoint_optimizer"]


def build_mesh(device: torch.device) -> Any:
    """A 1-D DeviceMesh over the whole process group (one rank without a group)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (get_world_size(),))


def repoint_optimizer(optimizer: torch.optim.Optimizer, before: dict[int, str],
                      model: nn.Module) -> None:
    """Give ``optimizer``'s groups the parameters now in ``model`` under the same names.

    ``before`` maps the ids of the parameters the optimizer was built with to their
    names; groups, their order and every option (lr, weight decay, ...) stay as they are.
    """
    after = dict(model.named_parameters())
    for i, group in enumerate(optimizer.param_groups):
        params = []
        for p in group["params"]:
            name = before.get(id(p))
            if name is None or name not in after:
                raise ValueError(
                    f"optimizer.param_groups[{i}] holds a parameter that is not "
                    f"{'in the model' if name is None else repr(name) + ' after parallelize'}"
                    "; build the optimizer from model.parameters()"
                )
            params.append(after[name])
        group["params"] = params


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer,
            parallelize: Callable[[nn.Module, Any], nn.Module] | None, mesh: Any,
            device: torch.device) -> nn.Module:
    """Apply ``parallelize(model, mesh)`` once (if given) and re-point the optimizer."""
    if parallelize is None:
        return model
    if optimizer.state:
        raise ValueError(
            "Trainer(parallelize=...) re-points the optimizer at the sharded parameters, "
            "so it must not have state yet (it has stepped); pass a fresh optimizer"
        )
    before = {id(p): name for name, p in model.named_parameters()}
    if mesh is None:
        mesh = build_mesh(device)
    out = parallelize(model, mesh)
    if not isinstance(out, nn.Module):
        raise TypeError(f"parallelize(model, mesh) must return the model (an nn.Module), "
                        f"got {type(out).__name__}")
    repoint_optimizer(optimizer, before, out)
    return out
