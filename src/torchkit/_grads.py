"""Private gradient helpers shared by clipping and accumulation: grouping, unscaling, checks."""

from __future__ import annotations

import numbers
from collections import defaultdict
from typing import Any, cast

import torch
from torch.amp import GradScaler

__all__ = [
    "NonFiniteFlag",
    "check_norm_type",
    "group_by_device",
    "group_by_device_and_dtype",
    "unscale_and_check",
    "unscale_once",
    "zero_grad",
]

_torch_group: Any
try:  # the C++ grouping torch's own clipping uses; much faster than a Python loop
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype as _torch_group
except ImportError:  # pragma: no cover - depends on the torch version
    _torch_group = None

# The fused kernel GradScaler uses: one pass both scales and checks for nan/inf.
_FUSED = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)


def group_by_device_and_dtype(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split ``grads`` into lists of one device and one dtype each (what ``_foreach`` takes).

    Example:
        >>> grads = [torch.ones(2), torch.ones(3, dtype=torch.float64), torch.ones(1)]
        >>> sorted(len(group) for group in group_by_device_and_dtype(grads))
        [1, 2]
    """
    if _torch_group is not None:
        grouped = _torch_group([list(grads)])
        return [cast(list[torch.Tensor], tensors) for ((tensors,), _) in grouped.values()]
    groups: defaultdict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    return list(groups.values())


def group_by_device(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split non-empty ``grads`` into lists of one device each (dtypes may mix).

    Example:
        >>> grads = [torch.ones(2), torch.ones(3, dtype=torch.float64)]
        >>> [len(group) for group in group_by_device(grads)]
        [2]
    """
    # The fused kernel takes mixed dtypes but one device; usually there is only one.
    device = grads[0].device
    if all(g.device == device for g in grads):
        return [grads]
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return list(groups.values())


def check_norm_type(norm_type: float) -> float:
    """Return ``norm_type`` as a float, or raise ``ValueError`` unless it is positive or inf.

    Example:
        >>> check_norm_type(2), check_norm_type(float("inf"))
        (2.0, inf)
    """
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a positive number or inf, got {norm_type!r} "
                        f"({type(norm_type).__name__})")
    norm_type = float(norm_type)
    if not norm_type > 0:  # also rejects nan
        raise ValueError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    return norm_type


def unscale_once(scaler: GradScaler | None, optimizer: torch.optim.Optimizer | None) -> None:
    """Unscale ``optimizer``'s gradients unless it already happened since the last update.

    Nothing happens without a scaler and an optimizer, or with a disabled scaler.

    Example:
        >>> unscale_once(None, None)  # no scaler: nothing to undo
    """
    if scaler is None or optimizer is None or not scaler.is_enabled():
        return
    # GradScaler raises if unscale_ is called twice per step; its per-optimizer stage tells
    # whether a user (or another helper) already unscaled this step.
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        stage = states[id(optimizer)].get("stage")
        if getattr(stage, "name", None) == "UNSCALED":
            return
    scaler.unscale_(optimizer)


def unscale_and_check(grads: list[torch.Tensor], inv_scale: torch.Tensor,
                      found_inf: torch.Tensor | None = None, *,
                      zeroed: bool = False) -> torch.Tensor:
    """Multiply ``grads`` (one device) by ``inv_scale`` in place; return 1.0 if any is nan/inf.

    The result is a one-element float32 tensor on the gradients' device (0.0 when all
    are finite), so reading it is up to the caller: nothing here syncs with the host.
    Pass ``found_inf`` (such a tensor) to have it zeroed and reused instead of allocated,
    and ``zeroed=True`` when the caller knows it already holds 0.0 (saves a kernel).

    Example:
        >>> grads = [torch.tensor([2.0, 4.0]), torch.tensor([float("inf")])]
        >>> unscale_and_check(grads, torch.tensor([0.5]))
        tensor([1.])
        >>> grads[0]
        tensor([1., 2.])
    """
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
    elif not zeroed:
        found_inf.zero_()
    if _FUSED is not None and not any(g.is_sparse for g in grads):
        _FUSED(grads, found_inf, inv_scale)
        return found_inf
    for g in grads:
        g.mul_(inv_scale.to(g.dtype))
        values = g.coalesce().values() if g.is_sparse else g
        found_inf += (~torch.isfinite(values)).any().float()
    return found_inf.clamp_(max=1.0)


class NonFiniteFlag:
    """A reusable nan/inf flag for :func:`unscale_and_check`, read cheaply on the host.

    One one-element float32 buffer on the first gradients' device, so a step allocates
    nothing. A CPU buffer is read through a NumPy view of its memory (no tensor dispatch),
    and after a read of 0.0 it is known to hold 0.0, so the next check skips its
    ``zero_()`` kernel. Anything else (a read of 1.0, an unread check, an error inside the
    kernel) makes the next check zero it again. Gradients on another device get a fresh
    flag each time.

    Example:
        >>> flag = NonFiniteFlag()
        >>> found = flag.check([torch.tensor([2.0, float("nan")])], torch.tensor([0.5]))
        >>> flag.read(found)
        True
        >>> flag.read(flag.check([torch.tensor([1.0])], torch.tensor([1.0])))
        False
    """

    __slots__ = ("_buffer", "_view", "_zero")

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._view: Any = None  # a NumPy view of a CPU buffer
        self._zero = False  # the buffer is known to hold 0.0 (it was read so)

    def check(self, grads: list[torch.Tensor], inv_scale: torch.Tensor) -> torch.Tensor:
        """:func:`unscale_and_check` ``grads`` (one device) into the reused buffer."""
        buf = self._buffer
        if buf is None:
            buf = self._buffer = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
            self._zero = True
            if buf.device.type == "cpu":
                try:  # shares the buffer's memory; NumPy is optional
                    self._view = buf.numpy()
                except (ImportError, RuntimeError):  # no NumPy: read it as a tensor
                    self._view = None
        elif buf.device != grads[0].device:
            return unscale_and_check(grads, inv_scale)  # several devices: the others allocate
        zeroed, self._zero = self._zero, False  # until it is read as 0.0 again
        return unscale_and_check(grads, inv_scale, buf, zeroed=zeroed)

    def read(self, found: torch.Tensor) -> bool:
        """Whether ``found`` (from :meth:`check`, or combined from several) says nan/inf.

        The one host read: a device sync for an accelerator's flag, none on the CPU.
        """
        if found is not self._buffer:
            return bool(found)
        view = self._view
        nonfinite = bool(view[0]) if view is not None else bool(found)
        self._zero = not nonfinite
        return nonfinite


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``, without its profiler label when unprofiled.

    ``Optimizer.zero_grad`` opens a ``record_function`` range on every call, which costs
    more than the loop itself on small models; an optimizer that overrides it, or a
    running profiler, gets the real call.

    Example:
        >>> weight = torch.ones(2, requires_grad=True)
        >>> weight.sum().backward()
        >>> zero_grad(torch.optim.SGD([weight], lr=0.1))
        >>> weight.grad is None
        True
    """
    if type(optimizer).zero_grad is not _BASE_ZERO_GRAD or "zero_grad" in vars(optimizer) \
            or getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


_BASE_ZERO_GRAD = torch.optim.Optimizer.zero_grad
