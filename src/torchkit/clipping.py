"""Gradient clipping helpers that are AMP-aware and cheap enough to call every step."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable

import torch
from torch.amp import GradScaler

from torchkit._grads import check_norm_type, group_by_device_and_dtype, unscale_once

__all__ = ["clip_grad_adaptive", "clip_grad_norm", "clip_grad_value", "grad_norm"]

Parameters = torch.Tensor | Iterable[torch.Tensor]

# torch.nn.utils.clip_grad_norm_ adds the same epsilon, so clipped results agree with it.
_EPS = 1e-6


def _grads(parameters: Parameters) -> list[torch.Tensor]:
    params = _params(parameters)
    try:
        return [p.grad for p in params if p.grad is not None]
    except AttributeError:
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"parameters must be tensors, got an item of type {type(p).__name__}"
                ) from None
        raise


def _params(parameters: Parameters) -> list[torch.Tensor]:
    """``parameters`` as a list of tensors; warn if an iterator of them was already used up."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    if isinstance(parameters, str | bytes) or not isinstance(parameters, Iterable):
        raise TypeError(
            f"parameters must be a tensor or an iterable of tensors (e.g. "
            f"model.parameters()), got {type(parameters).__name__}"
        )
    params = list(parameters)
    if not params and iter(parameters) is parameters:
        warnings.warn(
            "parameters is an iterator that yielded no tensors, so nothing was clipped: "
            "was it used up already (model.parameters() is a generator)? Pass "
            "list(model.parameters()) to use it more than once",
            UserWarning, stacklevel=3,
        )
    return params


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a float, or raise naming ``name`` unless it is a positive number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                        f"number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if math.isnan(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, "
                         f"got {value!r}")
    return number


def _check_scaler(scaler: GradScaler | None, optimizer: torch.optim.Optimizer | None) -> None:
    if scaler is not None and optimizer is None:
        raise ValueError(
            "scaler was given without optimizer: pass optimizer= too, so the gradients can be "
            "unscaled through scaler.unscale_(optimizer)"
        )
    if optimizer is not None and scaler is None:
        raise ValueError("optimizer is only used together with scaler=; pass both or neither")


def _total_norm(groups: list[list[torch.Tensor]], norm_type: float) -> torch.Tensor:
    if len(groups) == 1:
        norms = torch.stack(torch._foreach_norm(groups[0], norm_type))
        if norms.dtype not in (torch.float32, torch.float64):
            norms = norms.float()  # half-precision norms would overflow or round
    else:
        # As torch does: per-group norms are combined in the widest dtype among them
        # (float64 when any gradient is float64), never narrowed to float32, so a float64
        # gradient beyond float32's range keeps a finite total.
        device = groups[0][0].device
        per_group = [torch.stack(torch._foreach_norm(group, norm_type)) for group in groups]
        dtype = torch.float32
        for n in per_group:
            dtype = torch.promote_types(dtype, n.dtype)
        norms = torch.cat([n.to(device, dtype) for n in per_group])
    total: torch.Tensor = torch.linalg.vector_norm(norms, norm_type)
    return total


def grad_norm(parameters: Parameters, *, norm_type: float = 2.0) -> torch.Tensor:
    """Return the total norm of the gradients, as if they were one concatenated vector.

    Nothing is changed and nothing is synchronised with the host: the result stays a
    0-d tensor on the gradients' device (float32 unless all gradients are float64),
    ready to be accumulated and logged later. Parameters without a gradient are
    skipped; with none at all the norm is 0.

    Args:
        parameters: A tensor or an iterable of tensors (e.g. ``model.parameters()``).
        norm_type: The order ``p`` of the norm; ``float("inf")`` for the max-norm.

    Returns:
        The total norm, a 0-d tensor.

    Raises:
        ValueError: If ``norm_type`` is not positive.
        TypeError: If ``parameters`` holds something other than tensors.

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> (w * torch.tensor([3.0, 4.0])).sum().backward()
        >>> tk.grad_norm([w])
        tensor(5.)
        >>> tk.grad_norm([w], norm_type=float("inf"))
        tensor(4.)
    """
    norm_type = check_norm_type(norm_type)
    grads = _grads(parameters)
    if not grads:
        return torch.tensor(0.0)
    return _total_norm(group_by_device_and_dtype(grads), norm_type)


def clip_grad_norm(
    parameters: Parameters,
    max_norm: float,
    *,
    norm_type: float = 2.0,
    scaler: GradScaler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale gradients down so their total norm is at most ``max_norm``; return the norm before.

    Semantics match :func:`torch.nn.utils.clip_grad_norm_` (the same ``1e-6`` guard), but
    the common single-device case skips torch's generic grouping, and AMP is handled:
    with ``scaler`` and ``optimizer`` the gradients are first unscaled through
    ``scaler.unscale_(optimizer)`` — exactly once per step, so calling this twice, or
    after your own ``unscale_``, is safe and a later ``scaler.step(optimizer)`` works.

    Args:
        parameters: A tensor or an iterable of tensors whose ``.grad`` is clipped in place.
        max_norm: The largest allowed total norm; must be positive.
        norm_type: The order ``p`` of the norm; ``float("inf")`` for the max-norm.
        scaler: A :class:`torch.amp.GradScaler` whose scaled gradients are unscaled first.
        optimizer: The optimizer that owns the parameters; required with ``scaler``.
        error_if_nonfinite: Raise if the total norm is nan or inf (this reads the norm on
            the host, one synchronisation). Otherwise non-finite norms are returned and
            the gradients become non-finite, which a GradScaler then skips.

    Returns:
        The total norm of the (unscaled) gradients before clipping, a 0-d tensor.

    Raises:
        ValueError: If ``max_norm`` or ``norm_type`` is not positive, or only one of
            ``scaler`` / ``optimizer`` is given.
        RuntimeError: If ``error_if_nonfinite`` and the total norm is not finite.

    Example:
        >>> w = torch.zeros(2, requires_grad=True)
        >>> (w * torch.tensor([3.0, 4.0])).sum().backward()
        >>> tk.clip_grad_norm([w], max_norm=1.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    max_norm = _check_positive("max_norm", max_norm)
    norm_type = check_norm_type(norm_type)
    _check_scaler(scaler, optimizer)
    grads = _grads(parameters)
    unscale_once(scaler, optimizer)
    if not grads:
        return torch.tensor(0.0)
    groups = group_by_device_and_dtype(grads)
    total = _total_norm(groups, norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is {total.item()}, so they "
            "cannot be clipped; pass error_if_nonfinite=False to clip anyway"
        )
    # Multiplying by a clamped coefficient, instead of branching on the norm, keeps this
    # free of host synchronisation.
    coef = torch.clamp(max_norm / (total + _EPS), max=1.0)
    for group in groups:
        torch._foreach_mul_(group, coef.to(device=group[0].device, dtype=group[0].dtype))
    return total


def clip_grad_value(
    parameters: Parameters,
    clip_value: float,
    *,
    scaler: GradScaler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place.

    Args:
        parameters: A tensor or an iterable of tensors whose ``.grad`` is clamped.
        clip_value: The largest allowed absolute value; must be positive.
        scaler: A :class:`torch.amp.GradScaler` whose scaled gradients are unscaled first
            (once per step, as in :func:`clip_grad_norm`).
        optimizer: The optimizer that owns the parameters; required with ``scaler``.

    Raises:
        ValueError: If ``clip_value`` is not positive, or only one of ``scaler`` /
            ``optimizer`` is given.

    Example:
        >>> w = torch.zeros(3, requires_grad=True)
        >>> (w * torch.tensor([-2.0, 0.5, 3.0])).sum().backward()
        >>> tk.clip_grad_value([w], 1.0)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    clip_value = _check_positive("clip_value", clip_value)
    _check_scaler(scaler, optimizer)
    grads = _grads(parameters)
    unscale_once(scaler, optimizer)
    for group in group_by_device_and_dtype(grads) if grads else []:
        torch._foreach_clamp_min_(group, -clip_value)
        torch._foreach_clamp_max_(group, clip_value)


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    # One "unit" is one output row (Linear) or one output filter (Conv): every dim but 0.
    dims = tuple(range(1, x.ndim)) if x.ndim > 1 else None
    norm: torch.Tensor = torch.linalg.vector_norm(x, dim=dims, keepdim=x.ndim > 1)
    return norm


def clip_grad_adaptive(
    parameters: Parameters,
    clip_factor: float = 0.01,
    *,
    eps: float = 1e-3,
    scaler: GradScaler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Clip gradients unit-wise relative to the weights' norms (AGC, Brock et al. 2021).

    For every unit (an output row of a Linear weight, an output filter of a Conv weight,
    a whole bias vector), the gradient ``G`` is rescaled to norm
    ``clip_factor * max(||W||, eps)`` whenever it is larger, where ``W`` is that unit's
    weight. Following the paper, leave the final classifier out of ``parameters``.

    Args:
        parameters: A tensor or an iterable of tensors whose ``.grad`` is clipped in place.
        clip_factor: The largest allowed ratio of gradient norm to weight norm.
        eps: The weight norm floor, so zero-initialised units can still move.
        scaler: A :class:`torch.amp.GradScaler` whose scaled gradients are unscaled first
            (once per step, as in :func:`clip_grad_norm`).
        optimizer: The optimizer that owns the parameters; required with ``scaler``.

    Raises:
        ValueError: If ``clip_factor`` is not positive, ``eps`` is negative, or only one
            of ``scaler`` / ``optimizer`` is given.

    Example:
        >>> w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
        >>> tk.clip_grad_adaptive([w], clip_factor=0.1)
        >>> w.grad  # row 0 cut to norm 0.1 * 5; row 1 is already small enough
        tensor([[0.5000, 0.0000],
                [0.0000, 0.0010]])
    """
    clip_factor = _check_positive("clip_factor", clip_factor)
    eps = _check_positive("eps", eps, allow_zero=True)
    _check_scaler(scaler, optimizer)
    params = _params(parameters)
    _grads(params)  # type check
    unscale_once(scaler, optimizer)
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                continue
            max_norm = _unitwise_norm(p.detach()).clamp(min=eps).mul(clip_factor)
            g_norm = _unitwise_norm(p.grad)
            # Units are small, so an additive epsilon would visibly bias them; clamping the
            # denominator only guards all-zero gradients, which are then left unchanged.
            scale = torch.clamp(max_norm / g_norm.clamp(min=_EPS), max=1.0)
            p.grad.mul_(scale.to(p.grad.dtype))

