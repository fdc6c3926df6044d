"""Loading a saved model state_dict honestly: prefixes, pruning masks, strict or warned."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkit.checkpoint._errors import CheckpointError

__all__ = ["load_module_state"]

_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def load_module_state(module: nn.Module, saved: Mapping[str, Any], *, strict: bool,
                      path: Path, name: str) -> None:
    """Load ``saved`` into ``module``; strict: every key must match, else a clear error.

    Wrapper prefixes (``module.``, ``_orig_mod.``) are removed when the model has none.
    A pruned model's keys (``weight_orig`` + ``weight_mask``) re-create the pruning in a
    freshly built model first (:func:`~torchkit.restore_pruning`). With ``strict=False``
    what matches (by name and shape) is loaded and a warning lists the rest.
    """
    if not isinstance(saved, Mapping):
        raise CheckpointError(path, f"state[{name!r}] is a {type(saved).__name__}, not a "
                              "model state_dict")
    saved = _strip_prefixes(saved, module.state_dict())
    if _has_pruning_masks(saved):
        from torchkit.pruning import restore_pruning  # pruning is a piece above this one

        try:
            restore_pruning(module, saved)
        except KeyError as error:
            if strict:
                raise CheckpointError(path, f"state[{name!r}]: {error.args[0]}") from error
    expected = module.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    mismatched = [f"{k} (saved {tuple(v.shape)}, model {tuple(expected[k].shape)})"
                  for k, v in saved.items()
                  if k in expected and isinstance(v, torch.Tensor)
                  and isinstance(expected[k], torch.Tensor) and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        report = _report(missing, unexpected, mismatched)
        if strict:
            hint = _hint(missing, unexpected)
            raise CheckpointError(path, f"state[{name!r}] does not fit the "
                                  f"{type(module).__name__}: {report}. {hint}")
        warnings.warn(f"checkpoint {path}: loaded state[{name!r}] only in part: {report}",
                      UserWarning, stacklevel=4)
        bad = {m.split(" ", 1)[0] for m in mismatched}
        saved = {k: v for k, v in saved.items() if k not in bad}
    try:
        module.load_state_dict(saved, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(path, f"state[{name!r}] does not load into the "
                              f"{type(module).__name__}: {error}") from error


def _strip_prefixes(saved: Mapping[str, Any], expected: Mapping[str, Any]) -> Mapping[str, Any]:
    for prefix in _PREFIXES:
        if saved and all(k.startswith(prefix) for k in saved) and \
                not any(k.startswith(prefix) for k in expected):
            saved = {k[len(prefix):]: v for k, v in saved.items()}
    return saved


def _has_pruning_masks(saved: Mapping[str, Any]) -> bool:
    return any(k.endswith("_mask") and f"{k[:-len('_mask')]}_orig" in saved for k in saved)


def _report(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _hint(missing: list[str], unexpected: list[str]) -> str:
    if any(k.endswith(("_orig", "_mask")) for k in missing):
        return ("The model is pruned but the checkpoint is not: call tk.remove_pruning(model) "
                "first, or tk.restore_pruning(model, state_dict) for a pruned checkpoint.")
    if any(k.endswith(("_orig", "_mask")) for k in unexpected):
        return ("The checkpoint holds pruning masks that this model has no tensor for: see "
                "tk.restore_pruning, and check it is the same architecture.")
    return ("Is it the same architecture (e.g. the same number of classes)? To load only the "
            "matching part, pass strict=False: it loads what matches and warns about the rest.")
