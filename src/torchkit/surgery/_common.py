"""Shared by the surgery functions: submodule lookup, argument checks."""

from __future__ import annotations

import difflib

from torch import nn

__all__ = [
    "check_model",
    "get_submodule",
    "like",
    "set_submodule",
]


def check_model(model: object, *, arg: str = "model") -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be an nn.Module, got {type(model).__name__}")
    return model


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
