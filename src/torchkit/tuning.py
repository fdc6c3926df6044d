"""The learning-rate range test: ``find_lr`` and its ``LRFinderResult`` (suggestion, plot).

The LR grows exponentially from ``start_lr`` to ``end_lr`` over ``num_steps`` optimizer
steps taken through :class:`~torchkit.GradAccumulator` (so accumulation, AMP and
clipping behave as in training); the loss is smoothed and debiased, the test stops when
it diverges, and the model, optimizer and RNG states are put back bitwise afterwards.
The suggestion skips a burn-in and takes the steepest descent of the loss against
``log(lr)`` (the LR axis is logarithmic, so a slope against the LR itself would favour
the largest LRs).
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from torchkit._batches import batch_size, split_batch, to_device
from torchkit._utils import check_module, require
from torchkit.accumulation import GradAccumulator
from torchkit.state import get_rng_state, set_rng_state

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LRFinderResult", "find_lr"]


@dataclass
class LRFinderResult:
    """What :func:`find_lr` measured: one LR and smoothed loss per optimizer step.

    Attributes:
        lrs: The first parameter group's LR at each step.
        losses: The smoothed, debiased loss at each step.
        raw_losses: The window's sample-weighted mean loss at each step.
        diverged: Whether the test stopped early because the loss blew up.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float] = field(default_factory=list)
    diverged: bool = False

    def slopes(self) -> list[float]:
        """The loss's derivative against ``log(lr)`` at each point (central differences)."""
        x = [math.log(lr) for lr in self.lrs]
        y = self.losses
        n = len(x)
        if n < 2:
            return [0.0] * n
        out = []
        for i in range(n):
            lo, hi = max(i - 1, 0), min(i + 1, n - 1)
            out.append((y[hi] - y[lo]) / (x[hi] - x[lo]))
        return out

    def suggestion(self, method: Literal["steepest", "minimum"] = "steepest", *,
                   burn_in: int | None = None) -> float:
        """Suggest an LR: the steepest descent, or a tenth of the LR at the minimum loss.

        Args:
            method: ``"steepest"`` (most negative slope against ``log(lr)``) or
                ``"minimum"`` (the LR of the lowest loss, divided by 10).
            burn_in: Points skipped at the start (early losses are noisy spikes);
                default a tenth of them. The last point (where it diverged) is skipped too.

        Raises:
            ValueError: If ``method`` is unknown or too few points remain.
        """
        if method not in ("steepest", "minimum"):
            raise ValueError(f"method must be 'steepest' or 'minimum', got {method!r}")
        n = len(self.lrs)
        skip = n // 10 if burn_in is None else burn_in
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"burn_in must be an int >= 0 or None, got {burn_in!r}")
        end = n - 1 if self.diverged else n
        if end - skip < 2:
            raise ValueError(f"too few points to suggest an LR: {n} measured, burn_in={skip}; "
                             "run more num_steps or lower burn_in")
        window = range(skip, end)
        if method == "minimum":
            best = min(window, key=lambda i: self.losses[i])
            return self.lrs[best] / 10.0
        slopes = self.slopes()
        return self.lrs[min(window, key=lambda i: slopes[i])]

    def plot(self, path: str | os.PathLike[str] | None = None) -> Figure:
        """Draw loss against LR (log axis) with the suggestion marked; save to ``path``.

        Needs matplotlib (``pip install "torchkit[plot]"``).
        """
        figure_module = require("matplotlib.figure", extra="plot")
        fig = figure_module.Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(self.lrs, self.losses, label="smoothed loss")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        with contextlib.suppress(ValueError):
            lr = self.suggestion()
            ax.axvline(lr, color="tab:red", linestyle="--", label=f"suggestion {lr:.2e}")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(os.fspath(path))
        return fig  # type: ignore[no-any-return]


def _check(start_lr: float, end_lr: float, num_steps: int, smooth: float,
           diverge: float) -> None:
    errors = []
    if not (isinstance(start_lr, numbers.Real) and 0 < start_lr < math.inf):
        errors.append(f"start_lr must be a positive number, got {start_lr!r}")
    elif not (isinstance(end_lr, numbers.Real) and start_lr < end_lr < math.inf):
        errors.append(f"end_lr must be a number above start_lr={start_lr}, got {end_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        errors.append(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not (isinstance(smooth, numbers.Real) and 0 <= smooth < 1):
        errors.append(f"smooth must be a number in [0, 1), got {smooth!r}")
    if not (isinstance(diverge, numbers.Real) and diverge > 1):
        errors.append(f"diverge must be a number > 1, got {diverge!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("find_lr got no batches: the data is empty")


@contextlib.contextmanager
def _restored(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Put the model, optimizer, RNG and training mode back bitwise on exit."""
    weights = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng, training = get_rng_state(), model.training
    try:
        yield
    finally:
        model.load_state_dict(weights)
        optimizer.load_state_dict(opt_state)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        set_rng_state(rng)
        model.train(training)


def find_lr(model: nn.Module, optimizer: torch.optim.Optimizer,
            loss_fn: Callable[[Any, Any], torch.Tensor], data: Iterable[Any], *,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            accumulate: int = 1, smooth: float = 0.98, diverge: float = 4.0,
            precision: Literal["32", "bf16", "16"] = "32", max_norm: float | None = None
            ) -> LRFinderResult:
    """Run an exponential LR range test and return the losses it measured.

    Step ``i`` (of ``num_steps`` optimizer steps, each a window of ``accumulate``
    micro-batches from ``data``, re-iterated as needed) uses ``start_lr * (end_lr /
    start_lr) ** (i / (num_steps - 1))`` (other groups keep their ratio to the first).
    The loss is smoothed exponentially (``smooth``) and debiased; the test stops once it
    exceeds ``diverge`` times the best so far or is not finite. One host read per step.

    Args:
        model: The model (on its device; batches are moved there).
        optimizer: Its optimizer.
        loss_fn: ``loss_fn(model(inputs), targets)``.
        data: Batches ``(inputs, targets)`` or dicts.
        start_lr: The first LR.
        end_lr: The last LR.
        num_steps: Optimizer steps to run at most.
        accumulate: Micro-batches per optimizer step.
        smooth: The loss smoothing factor.
        diverge: Stop when the smoothed loss exceeds this multiple of the best.
        precision: ``"32"``, ``"bf16"`` (autocast) or ``"16"`` (autocast + GradScaler,
            CUDA).
        max_norm: Clip the gradient norm, as in training.

    Returns:
        An :class:`LRFinderResult`; ``model``, ``optimizer`` and the RNGs are as before.

    Raises:
        ValueError: If an option is out of range or ``data`` is empty.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> x = torch.randn(64, 4)
        >>> data = [(x, (x.sum(1) > 0).long())]
        >>> net = nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> result = tk.find_lr(net, opt, nn.functional.cross_entropy, data, num_steps=30)
        >>> len(result.lrs), 1e-7 <= result.suggestion() <= 10
        (30, True)
        >>> opt.param_groups[0]["lr"]
        0.1
    """
    check_module(model)
    _check(start_lr, end_lr, num_steps, smooth, diverge)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    scaler = torch.amp.GradScaler(device.type) if precision == "16" else None
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    accumulator = GradAccumulator(optimizer, accumulate, model=model, scaler=scaler,
                                  max_norm=max_norm)
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] if optimizer.param_groups[0]["lr"]
              else 1.0 for g in optimizer.param_groups]
    result = LRFinderResult([], [])
    batches = _cycle(data)
    avg, best = 0.0, math.inf
    with _restored(model, optimizer):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for i in range(num_steps):
            lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
            for group, ratio in zip(optimizer.param_groups, ratios):
                group["lr"] = lr * ratio
            total = torch.zeros((), device=device)
            count = 0
            for _ in range(accumulate):
                inputs, targets = split_batch(to_device(next(batches), device))
                autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None \
                    else contextlib.nullcontext()
                with accumulator.accumulate(), autocast:
                    loss = loss_fn(model(inputs), targets)
                size = batch_size(inputs)
                accumulator.backward(loss, batch_size=size)
                total += loss.detach().float() * size
                count += size
            raw = float(total) / count  # the one host read of the step
            avg = smooth * avg + (1 - smooth) * raw
            smoothed = avg / (1 - smooth ** (i + 1))
            result.lrs.append(lr)
            result.losses.append(smoothed)
            result.raw_losses.append(raw)
            if not math.isfinite(smoothed) or smoothed > diverge * best:
                result.diverged = True
                break
            best = min(best, smoothed)
    return result
