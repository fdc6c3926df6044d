"""Weight averaging: an exponential moving average (ModelEMA), SWA, and BatchNorm re-estimation.

Both averages keep a copy of the model (``module``) whose floating-point parameters are
updated in place with one ``torch._foreach_*`` call per update, on the device of the
copy, with the decay computed on the host: no host-device synchronisation. Each works in
a hand-written loop (call :meth:`~ModelEMA.update` after ``optimizer.step()``) and as a
:class:`~torchkit.Callback` in :class:`~torchkit.Trainer`.

Under DDP every rank averages its own (identical) replica; on an FSDP2 model (whose
parameters are DTensors) each rank averages its local shards, so no communication
is added. FSDP2 modules cannot be deep-copied, so there ``module`` is ``None``: use
``swapped``, ``copy_to`` or ``state_dict`` (the local averaged shards by name).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchkit._batches import batch_inputs, to_device
from torchkit._utils import check_keys, check_module, unwrap
from torchkit.callbacks import Callback, TrainerView

__all__ = ["SWA", "ModelEMA", "update_bn"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, or the tensor itself.

    Callers work under ``torch.no_grad()``, so parameters are used as they are.
    """
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _tensors(model: nn.Module, *, buffers: bool) -> dict[str, torch.Tensor]:
    """Parameters (and buffers) by qualified name, as the local tensors they are stored in."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    if buffers:
        named.update(model.named_buffers())
    return named


def _check_device(device: object) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)  # type: ignore[call-overload, no-any-return]
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device or None, got {device!r}") from None


class _Average(Callback):
    """What ModelEMA and SWA share: the averaged copy, swapping, copying and state."""

    evaluate: bool
    include_buffers: bool

    def __init__(self, model: nn.Module, *, device: str | torch.device | None,
                 evaluate: bool, include_buffers: bool) -> None:
        model = unwrap(check_module(model))
        if not isinstance(evaluate, bool):
            raise TypeError(f"evaluate must be True or False, got {evaluate!r}")
        self.device = _check_device(device)
        self.evaluate, self.include_buffers = evaluate, include_buffers
        self._params = set(dict(model.named_parameters()))
        self.module: nn.Module | None = None
        if any(callable(getattr(p, "to_local", None)) for p in model.parameters()):
            # FSDP2 cannot be deep-copied: keep this rank's shards only, no module.
            with torch.no_grad():
                mine = {n: self._to_mine([_local(t)])[0].clone()
                        for n, t in _tensors(model, buffers=True).items()}
        else:
            module = copy.deepcopy(model)
            if self.device is not None:
                module = module.to(self.device)
            self.module = module.requires_grad_(False).eval()
            mine = _tensors(self.module, buffers=True)
        self.num_updates = 0
        self._cache: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None
        mine = {n: _local(t) for n, t in mine.items()}
        self._averaged = [t for n, t in mine.items() if self._averages(n, t)]
        self._copied = [t for n, t in mine.items() if not self._averages(n, t)]
        self._names = [n for n, t in mine.items() if self._averages(n, t)]
        self._copied_names = [n for n, t in mine.items() if not self._averages(n, t)]

    def _averages(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether ``name`` is averaged (float parameters, float buffers if included)."""
        if not tensor.is_floating_point():
            return False
        return name in self._params or self.include_buffers

    def _live(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``model``'s tensors that match the averaged and the copied ones, in order.

        Looked up by name once per model (the lookup costs as much as the update), so
        build a new average after replacing a layer of the model.
        """
        model = unwrap(model)
        if self._cache is None or self._cache[0] != id(model):
            live = _tensors(model, buffers=True)
            missing = [n for n in self._names + self._copied_names if n not in live]
            if missing:
                raise KeyError(
                    f"model has no {', '.join(missing[:5])} (and {max(len(missing) - 5, 0)} "
                    f"more): pass the model this {type(self).__name__} was built from"
                )
            self._cache = (id(model), [live[n] for n in self._names],
                           [live[n] for n in self._copied_names])
        return [_local(t) for t in self._cache[1]], [_local(t) for t in self._cache[2]]

    def _to_mine(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device is None:
            return tensors
        return [t.to(self.device, non_blocking=True) for t in tensors]

    def _blend(self, model: nn.Module, weight: float) -> None:
        """``averaged += weight * (live - averaged)`` (copy when ``weight == 1``)."""
        averaged, copied = self._live(model)
        with torch.no_grad():
            if self._averaged:
                if weight == 1.0:
                    torch._foreach_copy_(self._averaged, self._to_mine(averaged))
                else:
                    torch._foreach_lerp_(self._averaged, self._to_mine(averaged), weight)
            if self._copied:
                torch._foreach_copy_(self._copied, self._to_mine(copied))
        self.num_updates += 1

    def _swap_names(self) -> tuple[list[torch.Tensor], list[str]]:
        names = [n for n in self._names if self.include_buffers or n in self._params]
        mine = dict(zip(self._names, self._averaged))
        return [mine[n] for n in names], names

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the averaged weights into ``model`` for the block; restore the live ones after.

        The live values are restored bitwise on exit, also when the block raises.
        """
        mine, names = self._swap_names()
        live_all = _tensors(unwrap(model), buffers=True)
        live = [_local(live_all[n]) for n in names]
        with torch.no_grad():
            saved = [t.clone() for t in live]
            torch._foreach_copy_(live, [t.to(d.device) for t, d in zip(mine, live)])
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Copy the averaged weights into ``model`` (for good) and return it."""
        mine, names = self._swap_names()
        live_all = _tensors(unwrap(model), buffers=True)
        live = [_local(live_all[n]) for n in names]
        with torch.no_grad():
            torch._foreach_copy_(live, [t.to(d.device) for t, d in zip(mine, live)])
        return model

    def eval_weights(self, trainer: TrainerView) -> contextlib.AbstractContextManager[Any]:
        """What ``Trainer`` validates under: the averaged weights with ``evaluate=True``."""
        return self.swapped(trainer.model) if self.evaluate else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """Return the number of updates and the averaged (local) tensors, by name."""
        names = self._names + self._copied_names
        tensors = self._averaged + self._copied
        return {"num_updates": self.num_updates,
                "averaged": {n: t.clone() for n, t in zip(names, tensors)}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        check_keys(state_dict, expected=self._state_keys(), owner=type(self).__name__)
        saved = state_dict["averaged"]
        names = self._names + self._copied_names
        if set(saved) != set(names):
            raise ValueError(
                f"{type(self).__name__} state holds tensors for {sorted(saved)[:5]}..., "
                f"but this model has {names[:5]}...: build it from the same model"
            )
        with torch.no_grad():
            for name, tensor in zip(names, self._averaged + self._copied):
                tensor.copy_(saved[name])
        self._load_counters(state_dict)

    def _state_keys(self) -> tuple[str, ...]:
        return ("num_updates", "averaged")

    def _load_counters(self, state_dict: Mapping[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])


class ModelEMA(_Average):
    """An exponential moving average of a model's weights, updated after optimizer steps.

    ``module`` starts as a copy of ``model``. The update that follows ``n`` earlier ones
    sets ``averaged = d * averaged + (1 - d) * live`` (one ``_foreach_lerp_``) with
    ``d = min(decay, (1 + n) / (10 + n))`` while ``n < warmup_steps`` and ``decay``
    after; non-float buffers (``num_batches_tracked``) are copied. As a callback it
    updates after every optimizer step (so once per accumulation window, flushed
    partial windows included) and, with ``evaluate=True``, the trainer validates with
    the averaged weights.

    Args:
        model: The model to average (a DDP/compile wrapper is unwrapped).
        decay: The decay per update, in ``[0, 1)``.
        warmup_steps: Updates that use the smaller warm-up decay.
        update_every: Average on every this many calls of :meth:`update`.
        include_buffers: Average floating-point buffers too (BatchNorm statistics) and
            swap them in :meth:`swapped`; otherwise they are copied from the model.
        device: Where the copy lives (default: beside ``model``), e.g. ``"cpu"``.
        evaluate: In ``Trainer``, validate with the averaged weights.

    Raises:
        ValueError: If ``decay``, ``warmup_steps`` or ``update_every`` is out of range.
        TypeError: If ``model`` is not an ``nn.Module``.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> ema = tk.ModelEMA(net, decay=0.5)
        >>> with torch.no_grad():
        ...     net.weight.fill_(1.0)
        Parameter containing:
        tensor([[1., 1.]], requires_grad=True)
        >>> before = ema.module.weight.clone()
        >>> ema.update(net)
        >>> torch.allclose(ema.module.weight, (before + 1) / 2)
        True
        >>> with ema.swapped(net):
        ...     torch.equal(net.weight, ema.module.weight)
        True
        >>> net.weight
        Parameter containing:
        tensor([[1., 1.]], requires_grad=True)
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.9999, warmup_steps: int = 0,
                 update_every: int = 1, include_buffers: bool = True,
                 device: str | torch.device | None = None, evaluate: bool = False) -> None:
        errors = []
        if not (isinstance(decay, numbers.Real) and not isinstance(decay, bool)
                and 0.0 <= float(decay) < 1.0):
            errors.append(f"decay must be a number in [0, 1), got {decay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
                or warmup_steps < 0:
            errors.append(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) \
                or update_every < 1:
            errors.append(f"update_every must be an int >= 1, got {update_every!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.decay, self.warmup_steps, self.update_every = float(decay), warmup_steps, \
            update_every
        self.num_calls = 0
        super().__init__(model, device=device, evaluate=evaluate,
                         include_buffers=include_buffers)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates
        if n < self.warmup_steps:
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (every ``update_every`` calls)."""
        self.num_calls += 1
        if self.num_calls % self.update_every:
            return
        self._blend(model, 1.0 - self.current_decay())

    def on_optimizer_step(self, trainer: TrainerView) -> None:
        """Update from the trainer's model after each optimizer step."""
        self.update(trainer.model)

    def _state_keys(self) -> tuple[str, ...]:
        return ("num_updates", "num_calls", "averaged")

    def state_dict(self) -> dict[str, Any]:
        """Return the update counters and the averaged tensors."""
        return {**super().state_dict(), "num_calls": self.num_calls}

    def _load_counters(self, state_dict: Mapping[str, Any]) -> None:
        super()._load_counters(state_dict)
        self.num_calls = int(state_dict["num_calls"])

    def __repr__(self) -> str:
        return (f"ModelEMA(decay={self.decay}, warmup_steps={self.warmup_steps}, "
                f"num_updates={self.num_updates})")


class SWA(_Average):
    """Stochastic weight averaging: the equal-weight mean of the weights from an epoch on.

    ``update(model)`` folds the current weights in with weight ``1 / (n + 1)`` (the
    first update copies them). As a callback it updates at the end of epochs
    ``start_epoch``, ``start_epoch + update_every_epochs``, ... (0-based, like
    ``Trainer.epoch``); with ``evaluate=True`` that epoch's validation already uses the
    average including it. Buffers are copied from the model, not averaged: recompute
    BatchNorm statistics for the averaged weights with :func:`update_bn` before using
    ``module``.

    Args:
        model: The model to average.
        start_epoch: The first epoch whose weights join the average.
        update_every_epochs: Join every this many epochs from ``start_epoch``.
        device: Where the copy lives (default: beside ``model``).
        evaluate: In ``Trainer``, validate with the averaged weights.

    Raises:
        ValueError: If ``start_epoch`` or ``update_every_epochs`` is out of range.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> swa = tk.SWA(net, start_epoch=0)
        >>> for value in (1.0, 2.0, 6.0):
        ...     with torch.no_grad():
        ...         _ = net.weight.fill_(value)
        ...     swa.update(net)
        >>> swa.module.weight.tolist(), swa.num_updates
        ([[3.0, 3.0]], 3)
    """

    def __init__(self, model: nn.Module, *, start_epoch: int, update_every_epochs: int = 1,
                 device: str | torch.device | None = None, evaluate: bool = False) -> None:
        errors = []
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            errors.append(f"start_epoch must be an int >= 0, got {start_epoch!r}")
        if isinstance(update_every_epochs, bool) or not isinstance(update_every_epochs, int) \
                or update_every_epochs < 1:
            errors.append(f"update_every_epochs must be an int >= 1, got "
                          f"{update_every_epochs!r}")
        if errors:
            raise ValueError("; ".join(errors))
        self.start_epoch, self.update_every_epochs = start_epoch, update_every_epochs
        self.last_epoch = -1  # the last epoch folded in by the callback
        super().__init__(model, device=device, evaluate=evaluate, include_buffers=False)

    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the equal-weight average."""
        self._blend(model, 1.0 / (self.num_updates + 1))

    def _due(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and epoch != self.last_epoch and \
            (epoch - self.start_epoch) % self.update_every_epochs == 0

    def _update_for(self, trainer: TrainerView) -> None:
        if self._due(trainer.epoch):
            self.update(trainer.model)
            self.last_epoch = trainer.epoch

    def eval_weights(self, trainer: TrainerView) -> contextlib.AbstractContextManager[Any]:
        """With ``evaluate=True``: fold in a due epoch, then swap the average in (if any)."""
        if not self.evaluate:
            return contextlib.nullcontext()
        self._update_for(trainer)
        if self.num_updates == 0:
            return contextlib.nullcontext()
        return self.swapped(trainer.model)

    def on_epoch_end(self, trainer: TrainerView, metrics: Mapping[str, float]) -> None:
        """Fold in this epoch's weights if it is due (and was not already)."""
        self._update_for(trainer)

    def _state_keys(self) -> tuple[str, ...]:
        return ("num_updates", "last_epoch", "averaged")

    def state_dict(self) -> dict[str, Any]:
        """Return the update count, the last epoch folded in and the averaged tensors."""
        return {**super().state_dict(), "last_epoch": self.last_epoch}

    def _load_counters(self, state_dict: Mapping[str, Any]) -> None:
        super()._load_counters(state_dict)
        self.last_epoch = int(state_dict["last_epoch"])

    def __repr__(self) -> str:
        return f"SWA(start_epoch={self.start_epoch}, num_updates={self.num_updates})"


@torch.no_grad()
def update_bn(model: nn.Module, data: Iterable[Any], *,
              device: str | torch.device | None = None) -> nn.Module:
    """Recompute the BatchNorm running statistics of ``model`` with one pass over ``data``.

    As :func:`torch.optim.swa_utils.update_bn`: each BatchNorm's statistics are reset
    and its ``momentum`` set to ``None`` (a cumulative average over every batch, not an
    exponential one), the model runs in training mode, and afterwards each layer's
    momentum and the model's mode are restored. Without BatchNorm layers it does nothing.

    Args:
        model: The model (e.g. ``swa.module``); changed in place and returned.
        data: Batches in torchkit's convention (``(inputs, targets)``, a dict, or inputs).
        device: Move each batch here first (default: leave it where it is).

    Returns:
        ``model``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> data = [torch.randn(8, 2) + 3 for _ in range(4)]
        >>> _ = tk.update_bn(net, data)
        >>> bool((net[1].running_mean.abs() > 0.1).any())
        True
    """
    check_module(model)
    target = _check_device(device)
    momenta = {m: m.momentum for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not momenta:
        return model
    was_training = model.training
    for bn in momenta:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        for batch in data:
            if target is not None:
                batch = to_device(batch, target)
            inputs = batch if isinstance(batch, torch.Tensor) else batch_inputs(batch)
            model(inputs)
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        model.train(was_training)
    return model
