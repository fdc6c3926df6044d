"""Exact gradient accumulation: the one place where torchkit steps an optimizer.

Over the ~450-line budget on purpose: :class:`GradAccumulator` is one state machine (the
window, its weights, the DDP/FSDP2 sync, the scaler, the non-finite skip, its state) whose
step order is the contract; half of the module is its public docstrings. The gradient
kernels it calls live in ``_grads``.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler
from torch.nn.parallel import DistributedDataParallel

from torchkit import _fsdp
from torchkit._grads import (
    NonFiniteFlag,
    check_norm_type,
    group_by_device,
    group_by_device_and_dtype,
    unscale_once,
    zero_grad,
)
from torchkit._utils import check_keys
from torchkit.clipping import clip_grad_norm, clip_grad_value

__all__ = ["GradAccumulator"]

_log = logging.getLogger(__name__)

_STATE_KEYS = (
    "micro_step",
    "weight_sum",
    "ref_size",
    "weighted",
    "num_steps",
    "skipped_steps",
    "grads",
)


class GradAccumulator:
    """Accumulate gradients over ``steps`` micro-batches, then step the optimizer once.

    Run each micro-batch's forward pass inside :meth:`accumulate` and hand its loss to
    :meth:`backward`. At the end of each window of ``steps`` micro-batches (or on
    :meth:`flush`, for a last partial window) ``backward`` does, in this order::

        scaler.unscale_(optimizer)        # with a GradScaler
        grads /= sum of micro-batch weights   # and check they are finite
        clip_grad_value(params, clip_value)  # with clip_value
        clip_grad_norm(params, max_norm)  # with max_norm
        optimizer.step()                  # skipped if a gradient is nan/inf
        scaler.update()                   # with a GradScaler
        optimizer.zero_grad(set_to_none=True)

    **Exactness.** Pass each micro-batch's *mean* loss and its sample count as
    ``batch_size``: the gradient the optimizer sees is then exactly the gradient of the
    sample-weighted mean loss over the window, as if the window were one big batch —
    also for a short last window and for micro-batches of different sizes (a plain
    ``loss / steps`` is wrong for both). Without ``batch_size`` every micro-batch
    weighs the same. With ``steps=1`` a window is one micro-batch and no weighting is
    applied at all, so the result is bitwise that of the plain loop
    ``zero_grad(); loss.backward(); step()`` (``batch_size`` is then only checked; under
    DDP with ``global_weights`` it still weighs ranks by their counts).
    Under DDP (pass the wrapped ``model``) gradients are all-reduced
    once per window instead of once per micro-batch, and the weights are summed over
    all ranks so the result is the global big-batch gradient.

    A window whose gradients are not finite is not applied: it is counted in
    :attr:`skipped_steps` and its gradients are dropped, never leaking into the next
    window. The check is one fused kernel per optimizer step (not per micro-batch), and
    what it costs to act on it depends on the optimizer:

    * a fused optimizer (``fused=True``: SGD, Adam, AdamW, ...) gets the flag on the
      device, the way a GradScaler hands it over, and skips the update itself: no host
      read at all. ``backward`` then returns ``True`` at every window end (the step was
      issued) and :attr:`skipped_steps` reads the device-side count when you ask for it
      (``skip_on_device=False`` reads the flag at each step instead, as below).
    * any other optimizer: one host read of a one-element flag per optimizer step. On
      the CPU that is no synchronisation (about a microsecond); on a GPU it waits for the
      queued backward to finish, once per optimizer step. A GradScaler reads its own
      flag anyway, so with one it adds nothing.

    ``skip_nonfinite=False`` drops the check (without a scaler nothing is read).

    Args:
        optimizer: The optimizer to step.
        steps: Micro-batches per optimizer step (``1`` disables accumulation).
        model: The DDP-wrapped model, so non-final micro-batches skip the gradient
            all-reduce (``no_sync``), or an FSDP2 (``fully_shard``) model, so they skip
            the reduce-scatter (``set_requires_gradient_sync``; :meth:`flush` reduces
            a partial window's gradients itself). Any other module is accepted and
            ignored. The attribute may be set again between windows (a re-wrapped model).
        scaler: A :class:`torch.amp.GradScaler` for float16 mixed precision.
        max_norm: Clip the total gradient norm to this value before stepping.
        norm_type: The order of the norm used with ``max_norm``.
        clip_value: Clamp every gradient element into ``[-clip_value, clip_value]``
            after unscaling and normalising, before the step (and before ``max_norm``
            clipping when both are given: value first, then norm).
        skip_nonfinite: Skip (and count) steps with nan/inf gradients when no enabled
            scaler does so already.
        skip_on_device: With a fused optimizer, hand it the non-finite flag on the
            device so that it skips the update itself (no host read, see above).
            ``False`` reads the flag at every optimizer step instead, like any other
            optimizer, so that :meth:`backward`'s result and :attr:`skipped_steps` are
            exact at once, at the price of one host read (a GPU sync) per step.
        global_weights: Under DDP with ``batch_size`` given, sum the micro-batch weights
            over all ranks (one small all-reduce per optimizer step), so ranks that see
            different sample counts still give the exact global gradient. Turn it off
            when every rank always sees the same count per micro-batch, as with a
            ``DistributedSampler`` (``Trainer`` does so for the loaders it shards).

    Attributes:
        num_steps: Windows completed (optimizer steps taken or skipped).
        micro_step: Micro-batches accumulated in the pending window.
        last_grad_norm: The total gradient norm before clipping at the latest window
            (a tensor, only with ``max_norm``), for logging without a host read.

    Raises:
        TypeError: If ``optimizer``, ``model`` or ``scaler`` has the wrong type, or
            ``skip_nonfinite``, ``global_weights`` or ``skip_on_device`` is not a bool.
        ValueError: If ``steps``, ``max_norm``, ``norm_type`` or ``clip_value`` is out
            of range.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> accum = tk.GradAccumulator(opt, steps=2, max_norm=1.0)
        >>> stepped = []
        >>> for size in [8, 8, 8, 3]:          # the last window is short and uneven
        ...     x, y = torch.randn(size, 4), torch.randn(size, 1)
        ...     with accum.accumulate():
        ...         loss = nn.functional.mse_loss(model(x), y)
        ...     stepped.append(accum.backward(loss, batch_size=size))
        >>> stepped
        [False, True, False, True]
        >>> accum.flush()  # nothing pending: no step
        False
        >>> accum.num_steps
        2
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int,
        *,
        model: nn.Module | None = None,
        scaler: GradScaler | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        skip_nonfinite: bool = True,
        global_weights: bool = True,
        clip_value: float | None = None,
        skip_on_device: bool = True,
    ) -> None:
        errors = []
        for name, flag in (("skip_nonfinite", skip_nonfinite), ("global_weights", global_weights),
                           ("skip_on_device", skip_on_device)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        if scaler is not None and not isinstance(scaler, GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {scaler!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            errors.append(f"steps must be an int >= 1, got {steps!r}")
        for name, value in (("max_norm", max_norm), ("clip_value", clip_value)):
            if value is not None and not (isinstance(value, numbers.Real) and not isinstance(
                    value, bool) and value > 0):
                errors.append(f"{name} must be a positive number or None, got {value!r}")
        try:
            check_norm_type(norm_type)
        except (TypeError, ValueError) as error:
            errors.append(str(error))
        if errors:
            raise ValueError("; ".join(errors))
        self.optimizer = optimizer
        self.steps = steps
        self.micro_step = 0
        self.model = model  # (checked by the property's setter)
        self.scaler = scaler
        self.max_norm = max_norm
        self.clip_value = clip_value
        self.norm_type = float(norm_type)
        self.skip_nonfinite = skip_nonfinite
        self.global_weights = global_weights
        self.num_steps = 0
        self.last_grad_norm: torch.Tensor | None = None
        self._skipped = 0
        self._weight_sum = 0.0
        self._ref_size: float | None = None  # weights are sample counts relative to this
        self._weighted: bool | None = None  # whether this window's micro-batches gave sizes
        self._forward_unsynced = False  # the latest forward ran under DDP no_sync
        self._window_unsynced = False  # the latest backward was not all-reduced
        self._inverse_cache: dict[tuple[torch.device, float], torch.Tensor] = {}
        self._flag = NonFiniteFlag()  # the reused nan/inf flag and its cheap host read
        self._skips_on_device: torch.Tensor | None = None  # fused path: read when asked
        self.skip_on_device = skip_on_device  # Trainer(nonfinite="skip") books each skip

    @property
    def model(self) -> nn.Module | None:
        """The model given: its DDP or FSDP2 wrapper decides how windows skip the all-reduce.

        Settable between windows, for a model wrapped again (as ``Trainer`` does when an
        epoch start changes which parameters train under DDP).

        Raises:
            TypeError: If set to something other than an ``nn.Module`` or ``None``.
            RuntimeError: If set inside a window (micro-batches since the last step).
        """
        return self._model

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        if self.micro_step:
            raise RuntimeError(f"model set inside a window ({self.micro_step} micro-batches "
                               "since the last optimizer step); set it after a step or flush()")
        self._model = model
        self._ddp = model if isinstance(model, DistributedDataParallel) else None
        self._fsdp = _fsdp.fsdp_modules(model)  # FSDP2: set_requires_gradient_sync

    @property
    def skipped_steps(self) -> int:
        """Windows whose gradients were nan/inf and so were not applied.

        With a fused optimizer the skips are counted on the device: reading this
        property is then one host read.
        """
        if self._skips_on_device is not None:
            pending, self._skips_on_device = self._skips_on_device, None
            self._skipped += int(pending.item())
        return self._skipped

    def accumulate(self) -> contextlib.AbstractContextManager[None]:
        """Run the forward pass of one micro-batch inside this context.

        For a DDP ``model`` it disables the gradient all-reduce (``no_sync``) unless the
        micro-batch closes the window. A short last window is all-reduced by
        :meth:`flush` instead. Without DDP it does nothing.

        Example:
            >>> model = nn.Linear(2, 1)
            >>> accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 1)
            >>> with accum.accumulate():
            ...     loss = model(torch.ones(3, 2)).mean()
            >>> accum.backward(loss)
            True
        """
        if self._fsdp:
            return self._fsdp_accumulate()
        if self._ddp is None:
            return _NOTHING  # the hot path of every non-DDP step: no generator to build
        return self._ddp_accumulate(self._ddp)

    @contextlib.contextmanager
    def _ddp_accumulate(self, ddp: DistributedDataParallel) -> Iterator[None]:
        if self.micro_step + 1 < self.steps:
            self._forward_unsynced = True
            with ddp.no_sync():
                yield
        else:
            self._forward_unsynced = False
            yield

    @contextlib.contextmanager
    def _fsdp_accumulate(self) -> Iterator[None]:
        # The flag holds for the backward after the forward: FSDP2 reads it then.
        unsynced = self.micro_step + 1 < self.steps
        _fsdp.set_gradient_sync(self._fsdp, not unsynced)
        self._forward_unsynced = unsynced
        yield

    def backward(self, loss: torch.Tensor, batch_size: int | None = None) -> bool:
        """Back-propagate one micro-batch's loss; step the optimizer if the window is full.

        Args:
            loss: The micro-batch's mean loss, a scalar tensor. Do not divide it by
                ``steps``: the accumulator weighs and normalises it.
            batch_size: The micro-batch's sample count, so uneven micro-batches weigh
                in proportion. Give it for every micro-batch of a window or for none.

        Returns:
            ``True`` when this call ended a window and the optimizer stepped; ``False``
            inside a window or when the step was skipped for nan/inf gradients. With a
            fused optimizer the skip happens on the device and is not known here:
            ``True`` at every window end then (see :attr:`skipped_steps`).

        Raises:
            TypeError: If ``loss`` is not a tensor or ``batch_size`` not an int.
            ValueError: If ``loss`` has more than one element, ``batch_size`` is not
                positive, or a window mixes given and missing batch sizes.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"loss must be a scalar (one element), got shape {tuple(loss.shape)}; "
                "reduce it, e.g. loss.mean()"
            )
        weight = self._weight(batch_size)
        if weight != 1.0:
            loss = loss * weight
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        torch.autograd.backward(loss)
        self._window_unsynced = self._forward_unsynced
        self._forward_unsynced = False
        self.micro_step += 1
        self._weight_sum += weight
        if self.micro_step >= self.steps:
            return self._boundary_step()
        return False

    def flush(self) -> bool:
        """Step on a pending partial window (call it at the end of an epoch).

        Returns:
            ``True`` if a step was taken; ``False`` if nothing was pending or the step
            was skipped for nan/inf gradients.
        """
        if self.micro_step == 0:
            return False
        if self._fsdp and self._window_unsynced:  # FSDP2 left the window unreduced
            _fsdp.reduce_pending(self._fsdp)
            self._window_unsynced = False
        return self._boundary_step()

    def _weight(self, batch_size: int | None) -> float:
        weighted = batch_size is not None
        if self._weighted is not None and weighted != self._weighted:
            raise ValueError(
                "batch_size must be given for every micro-batch of a window or for none; "
                f"this window {'had' if self._weighted else 'had no'} batch sizes and now "
                f"got batch_size={batch_size!r}"
            )
        self._weighted = weighted
        if batch_size is None:
            return 1.0
        if type(batch_size) is not int and (  # the exact-type test is the hot path's
            isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
        ):
            raise TypeError(f"batch_size must be an int or None, got {batch_size!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if self.steps == 1 and ((self._ddp is None and not self._fsdp)
                                or not self.global_weights):
            # A window of one micro-batch needs no weighting: bitwise the plain loop. (Under
            # DDP with global weights, ranks' counts may differ and still need it.)
            return 1.0
        if self._ref_size is None:
            self._ref_size = float(self._global_max(int(batch_size)))
        return int(batch_size) / self._ref_size

    def _global_max(self, value: int) -> int:
        # Every rank must weigh relative to the same size, or DDP's average mixes scales.
        if self._ddp is None and not self._fsdp:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _grads(self) -> list[torch.Tensor]:
        grads = [
            p.grad for group in self.optimizer.param_groups for p in group["params"]
            if p.grad is not None
        ]
        if self._fsdp:  # FSDP2: each rank's shards, which the fused kernels take as they are
            return _fsdp.local_tensors(grads)
        return grads

    def _boundary_step(self) -> bool:
        scaler_enabled = self.scaler is not None and self.scaler.is_enabled()
        check = scaler_enabled or self.skip_nonfinite
        needs_grads = check or self._window_unsynced or self._weight_sum != 1.0 or (
            (self._ddp is not None or self._fsdp) and self._weighted and self.global_weights)
        grads = self._grads() if needs_grads else []
        if self._window_unsynced and grads:
            self._all_reduce_mean(grads)
        if scaler_enabled:
            unscale_once(self.scaler, self.optimizer)
        found_inf = self._normalise(grads, check=check) if grads else None
        if self.clip_value is not None:  # after unscale and normalise, before the norm clip
            clip_grad_value([p for group in self.optimizer.param_groups
                             for p in group["params"]], self.clip_value)
        if self.max_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            self.last_grad_norm = clip_grad_norm(params, self.max_norm, norm_type=self.norm_type)
        skipped = False
        if self.scaler is not None and scaler_enabled:
            # The scaler reads its own found_inf in step(), so this read adds no sync.
            skipped = found_inf is not None and self._flag.read(found_inf)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not check or found_inf is None:
            self.optimizer.step()
        elif self._can_skip_on_device():
            self._step_on_device(found_inf)  # the fused kernel skips: no host read
        else:
            skipped = self._flag.read(found_inf)  # the one host read (no sync on the CPU)
            if not skipped:
                self.optimizer.step()
        zero_grad(self.optimizer)
        if skipped:
            self._skipped += 1
            _log.debug("skipped optimizer step %d: non-finite gradients", self.num_steps)
        self.num_steps += 1
        self.micro_step, self._weight_sum, self._weighted = 0, 0.0, None
        self._window_unsynced = False
        return not skipped

    def _can_skip_on_device(self) -> bool:
        opt = self.optimizer
        if not (self.skip_on_device and getattr(opt, "_step_supports_amp_scaling", False)):
            return False
        # torch's fused SGD leaves its momentum buffers uninitialised (torch.empty) when its
        # very first step is skipped: read the flag until it has taken a step.
        return bool(opt.state) or not isinstance(opt, torch.optim.SGD) or all(
            group["momentum"] == 0 for group in opt.param_groups)

    def _step_on_device(self, found_inf: torch.Tensor) -> None:
        """Step a fused optimizer that skips the update itself where ``found_inf`` is set."""
        optimizer: Any = self.optimizer  # the attributes GradScaler hands fused optimizers
        optimizer.grad_scale, optimizer.found_inf = None, found_inf.view(())  # as GradScaler
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        if self._skips_on_device is None:
            self._skips_on_device = found_inf.clone()
        else:
            self._skips_on_device.add_(found_inf.to(self._skips_on_device.device))

    def _normalise(self, grads: list[torch.Tensor], *, check: bool) -> torch.Tensor | None:
        """Divide by the summed weights and, if ``check``, return 1.0 if any grad is nan/inf."""
        divisor: float | torch.Tensor = self._weight_sum
        if (self._ddp is not None or self._fsdp) and self._weighted and self.global_weights:
            # Ranks may have seen different sample counts: use the global sum. DDP already
            # averaged over ranks, hence the extra world-size factor.
            total = torch.tensor([self._weight_sum], device=self._comm_device())
            dist.all_reduce(total)
            divisor = total / dist.get_world_size()
        if not grads or (not check and isinstance(divisor, float) and divisor == 1.0):
            return None
        found: torch.Tensor | None = None
        for group in group_by_device(grads):
            inv_divisor = divisor
            if isinstance(divisor, float) and divisor != 1.0 and any(
                g.dtype == torch.float64 for g in group
            ):
                # The fused kernel takes a float32 scale: divide float64 exactly instead.
                torch._foreach_div_(group, divisor)
                inv_divisor = 1.0
            f = self._flag.check(group, self._inverse(inv_divisor, group[0].device))
            found = f if found is None else torch.maximum(found, f.to(found.device))
        if self._fsdp and found is not None and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)  # a shard's nan/inf: all ranks skip
        return found

    def _inverse(self, divisor: float | torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(divisor, torch.Tensor):
            return (1.0 / divisor).to(device=device, dtype=torch.float32)
        # A window's divisor takes few distinct values: keep their tensors, not remake them.
        key = (device, divisor)
        inv = self._inverse_cache.get(key)
        if inv is None:
            if len(self._inverse_cache) > 64:
                self._inverse_cache.clear()
            inv = torch.full((1,), 1.0 / divisor, dtype=torch.float32, device=device)
            self._inverse_cache[key] = inv
        return inv

    def _all_reduce_mean(self, grads: list[torch.Tensor]) -> None:
        world = dist.get_world_size()
        for group in group_by_device_and_dtype(grads):
            flat = torch.cat([g.reshape(-1) for g in group])  # one collective, not one each
            dist.all_reduce(flat)
            flat.div_(world)
            for g, synced in zip(group, torch.split(flat, [g.numel() for g in group])):
                g.copy_(synced.view_as(g))

    def state_dict(self) -> dict[str, Any]:
        """Return the progress, including the position and gradients of a pending window.

        The gradients of a partial window are included (as references, not copies) so a
        checkpoint taken mid-window resumes exactly; at a window boundary they are
        ``None``.
        """
        grads = None
        if self.micro_step > 0:
            grads = [
                None if p.grad is None else p.grad.detach()
                for group in self.optimizer.param_groups for p in group["params"]
            ]
        return {
            "micro_step": self.micro_step,
            "weight_sum": self._weight_sum,
            "ref_size": self._ref_size,
            "weighted": self._weighted,
            "num_steps": self.num_steps,
            "skipped_steps": self.skipped_steps,  # folds a device-side count in
            "grads": grads,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the progress returned by :meth:`state_dict`, gradients included."""
        check_keys(state_dict, expected=_STATE_KEYS, owner=type(self).__name__)
        grads = state_dict["grads"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if grads is not None:
            if len(grads) != len(params):
                raise ValueError(
                    f"the state holds gradients for {len(grads)} parameters but the optimizer "
                    f"has {len(params)}; load it into an optimizer built the same way"
                )
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is not None and g.shape != p.shape:
                    raise ValueError(
                        f"gradient {i} in the state has shape {tuple(g.shape)}, but the "
                        f"optimizer's parameter {i} has shape {tuple(p.shape)}"
                    )
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.detach().to(p.device, p.dtype, copy=True)
        self.micro_step = state_dict["micro_step"]
        self._weight_sum = state_dict["weight_sum"]
        self._ref_size = state_dict["ref_size"]
        self._weighted = state_dict["weighted"]
        self.num_steps = state_dict["num_steps"]
        self._skipped = state_dict["skipped_steps"]
        self._skips_on_device = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, max_norm={self.max_norm}, "
            f"num_steps={self.num_steps}, micro_step={self.micro_step})"
        )


_NOTHING = contextlib.nullcontext()

