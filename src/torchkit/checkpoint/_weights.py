"""Plain weights for deployment: save, load and extract a model's bare state_dict."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from torchkit._utils import atomic_write, require, unwrap
from torchkit.checkpoint._errors import CheckpointError
from torchkit.checkpoint._integrity import FORMAT, read_checkpoint
from torchkit.checkpoint._keys import load_module_state

__all__ = ["extract_weights", "load_weights", "save_weights"]

PathLike = str | os.PathLike[str]


def _check_module(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
    return model


def _check_path(path: Any, name: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def _with_masks_applied(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A pruned state_dict's ``x_orig`` * ``x_mask`` as ``x``: what the model computes with."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_mask") and f"{key[:-len('_mask')]}_orig" in state:
            continue
        if key.endswith("_orig") and f"{key[:-len('_orig')]}_mask" in state:
            out[key[:-len("_orig")]] = value * state[f"{key[:-len('_orig')]}_mask"]
        else:
            out[key] = value
    return out


def _write(path: Path, state: Mapping[str, Any]) -> Path:
    state = _with_masks_applied(state)
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", extra="safetensors")
        # safetensors refuses tensors that share memory (tied weights): store copies.
        seen: set[tuple[int, int]] = set()
        tensors = {}
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"safetensors holds only tensors; state_dict[{key!r}] is a "
                                f"{type(value).__name__}: save it to a .pt file instead")
            ident = (value.untyped_storage().data_ptr(), int(value.storage_offset()))
            tensor = value.detach().to("cpu")
            tensors[key] = tensor.clone() if ident in seen or not tensor.is_contiguous() \
                else tensor
            seen.add(ident)
        data: bytes = safetensors_torch.save(tensors, metadata={"format": "pt"})

        def write_bytes(file: IO[Any]) -> None:
            file.write(data)

        return atomic_write(path, write_bytes)

    def write(file: IO[Any]) -> None:
        torch.save(dict(state), file)

    return atomic_write(path, write)


def save_weights(path: PathLike, model: nn.Module) -> Path:
    """Write ``model``'s bare weights (its unwrapped ``state_dict``) for deployment.

    A path ending in ``.safetensors`` is written with safetensors (the
    ``torchkit[safetensors]`` extra); any other path gets a plain
    ``torch.save(state_dict)`` that ``torch.load(path, weights_only=True)`` reads
    anywhere, without torchkit. DDP / ``torch.compile`` wrappers are removed, and a
    pruned model's weights are written with the masks applied (``weight``, not
    ``weight_orig`` and ``weight_mask``), so they load into a plain model. The write is
    atomic, like a checkpoint's.

    Args:
        path: The file to write.
        model: The model.

    Returns:
        The path written.

    Raises:
        TypeError: If ``model`` is not a module or ``path`` not a path.
        ImportError: For ``.safetensors`` without the safetensors package.
        OSError: If the disk is full or the directory read-only.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.pt"
        >>> net = tk.prune(nn.Linear(8, 2), 0.5)
        >>> sorted(torch.load(tk.save_weights(path, net), weights_only=True))
        ['bias', 'weight']
    """
    _check_module(model)
    return _write(_check_path(path, "path"), unwrap(model).state_dict())


def _read_weights(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a file")
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", extra="safetensors")
        try:
            return dict(safetensors_torch.load_file(os.fspath(path), device="cpu"))
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointError(path, f"cannot be read as safetensors ({error})") from error
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile,
            ValueError) as error:
        raise CheckpointError(path, f"cannot be read as a state_dict "
                              f"({type(error).__name__}: {error})") from error
    if isinstance(data, dict) and data.get("format") == FORMAT:  # a full checkpoint
        return _model_state(read_checkpoint(path), path, "model")
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise CheckpointError(path, f"holds a {type(data).__name__}, not a state_dict")
    return dict(data)


def load_weights(path: PathLike, model: nn.Module, *, strict: bool = True) -> nn.Module:
    """Load weights written by :func:`save_weights` (or any plain state_dict) into ``model``.

    Also reads a full torchkit checkpoint (its ``"model"``). Keys are matched as by
    :func:`load_checkpoint`: a ``module.`` / ``_orig_mod.`` prefix is removed, and
    with ``strict=True`` a mismatch raises ``CheckpointError`` listing the missing and
    unexpected keys; ``strict=False`` loads what matches and warns about the rest.

    Args:
        path: A ``.safetensors`` file or a ``torch.save``'d state_dict.
        model: The model to load into (in place).
        strict: Require the keys and shapes to match exactly.

    Returns:
        ``model``.

    Raises:
        CheckpointError: If the file cannot be read or (strict) does not fit the model.

    Example:
        >>> import tempfile, pathlib
        >>> path = tk.save_weights(pathlib.Path(tempfile.mkdtemp()) / "m.pt", nn.Linear(2, 1))
        >>> tk.load_weights(path, nn.Linear(2, 1))
        Linear(in_features=2, out_features=1, bias=True)
    """
    _check_module(model)
    path = _check_path(path, "path")
    load_module_state(unwrap(model), _read_weights(path), strict=strict, path=path,
                      name="weights")
    return model


def _model_state(payload: Mapping[str, Any], path: Path, name: str) -> dict[str, Any]:
    state = payload["state"]
    if name not in state:
        raise CheckpointError(path, f"holds no {name!r}; it holds "
                              f"{', '.join(map(repr, state)) or 'nothing'}")
    weights = state[name]
    if not isinstance(weights, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(path, f"state[{name!r}] is not a model state_dict")
    return dict(weights)


def extract_weights(checkpoint_path: PathLike, out_path: PathLike, *,
                    name: str = "model") -> Path:
    """Write the weights held in a full torchkit checkpoint to a plain weights file.

    The checkpoint is verified as by :func:`load_checkpoint`; the weights are written as
    by :func:`save_weights` (safetensors for a ``.safetensors`` ``out_path``, pruning
    masks applied), ready for deployment where torchkit is not installed.

    Args:
        checkpoint_path: A file written by :func:`save_checkpoint` or a manager.
        out_path: Where to write the weights.
        name: The entry of the checkpoint that holds the model.

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: If the checkpoint cannot be read or holds no model ``name``.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = tk.save_checkpoint(folder / "ckpt.pt", {"model": nn.Linear(2, 1)}, step=5)
        >>> out = tk.extract_weights(folder / "ckpt.pt", folder / "weights.pt")
        >>> sorted(torch.load(out, weights_only=True))
        ['bias', 'weight']
    """
    source = _check_path(checkpoint_path, "checkpoint_path")
    out = _check_path(out_path, "out_path")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    return _write(out, _model_state(read_checkpoint(source), source, name))
