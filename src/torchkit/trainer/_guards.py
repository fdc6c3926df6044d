"""Private: Trainer's finite-weights guard, training-set metrics and per-step scalars.

Each runs off the hot path: the weights are checked with the bulk loss check (about once
a second, at each epoch end and before every checkpoint), training metrics accumulate on
the device, and per-step scalars are read only when they are logged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchkit._batches import split_batch
from torchkit._grads import group_by_device_and_dtype
from torchkit.distributed import is_main_process
from torchkit.trainer._evaluation import EvalSums

__all__ = ["StepLog", "TrainSums", "WeightsGuard", "log_graph"]


class WeightsGuard:
    """Notice non-finite weights: an infinite gradient with a finite loss ruins them too.

    :meth:`bad` reads one flag for all parameters (one L1-norm kernel per device and
    dtype, then one host read); it runs only where the losses are checked in bulk, so
    the cost is per check, not per step. It remembers where the last check passed, so
    the error names the span of batches and optimizer steps the bad one lies in.

    Example:
        >>> guard = WeightsGuard()
        >>> net = nn.Linear(2, 1)
        >>> guard.bad(net, epoch=0, batch_idx=3, step=4)
        False
        >>> _ = net.weight.data.fill_(float("inf"))
        >>> guard.bad(net, epoch=0, batch_idx=9, step=10)
        True
        >>> print(guard.error())
        the weights became nan/inf at epoch 0, between batch 4 and batch 9 (optimizer steps
        5 to 10), although every loss was finite: a nan/inf gradient was applied. ...
    """

    #: A timed check is skipped until this many times its own cost has passed, so it
    #: takes at most ~2 % of the run; checks at epoch ends and saves always run.
    BUDGET = 50.0

    def __init__(self) -> None:
        self._passed: tuple[int, int, int] = (0, -1, 0)  # (epoch, batch_idx, step) checked
        self._at: tuple[int, int, int] = (0, 0, 0)
        self._next = 0.0

    def bad(self, model: nn.Module, *, epoch: int, batch_idx: int, step: int,
            force: bool = True) -> bool:
        """Whether a floating-point parameter of ``model`` is nan/inf (one host read).

        With ``force=False`` (the timed bulk checks) it may skip the check and answer
        ``False`` to stay within :attr:`BUDGET`.
        """
        start = time.monotonic()
        if not force and start < self._next:
            return False
        params = [p.detach() for p in model.parameters() if p.is_floating_point()]
        finite = True
        if params:
            # One L1 norm per tensor (a single foreach kernel per device and dtype): nan
            # or inf in any weight makes it non-finite. It is several times faster than
            # the max-abs norm on CPU; finite weights so large that their L1 norm
            # overflows are told apart exactly, on that rare path only.
            flags = [torch.stack(torch._foreach_norm(group, 1)).isfinite().all()
                     .to(params[0].device) for group in group_by_device_and_dtype(params)]
            finite = bool(torch.stack(flags).all()) or all(
                bool(torch.isfinite(p).all()) for p in params)
        self._next = time.monotonic() + self.BUDGET * (time.monotonic() - start)
        if epoch != self._passed[0]:
            self._passed = (epoch, -1, self._passed[2])  # a new epoch starts at batch 0
        if finite:
            self._passed = (epoch, batch_idx, step)
        else:
            self._at = (epoch, batch_idx, step)
        return not finite

    def error(self) -> FloatingPointError:
        """The error for the non-finite weights :meth:`bad` found."""
        epoch, batch_idx, step = self._at
        first_batch, first_step = self._passed[1] + 1, self._passed[2] + 1
        return FloatingPointError(
            f"the weights became nan/inf at epoch {epoch}, between batch {first_batch} and "
            f"batch {batch_idx} (optimizer steps {first_step} to {step}), although every "
            "loss was finite: a nan/inf gradient was applied. No checkpoint holds these "
            "weights. Lower the learning rate, clip gradients (max_grad_norm=..., "
            "clip_value=...), or pass nonfinite='skip' to skip such steps"
        )


class TrainSums:
    """``Trainer(train_metrics=...)``: one epoch's training-set metrics, on the device.

    Example:
        >>> sums = TrainSums({"acc": tk.accuracy}, torch.device("cpu"))
        >>> sums.open()
        >>> sums.add(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), 2)
        >>> sums.results()
        {'train_acc': 0.5}
    """

    def __init__(self, metrics: Mapping[str, Any], device: torch.device) -> None:
        self.metrics, self.device = metrics, device
        self._sums: EvalSums | None = None

    def open(self) -> None:
        """Start the epoch's sums (stateful metrics are reset)."""
        self._sums = EvalSums(self.metrics, self.device)

    def add(self, outputs: Any, targets: Any, size: int) -> None:
        """Add one training batch's (detached) outputs and targets."""
        if outputs is None or targets is None:
            raise ValueError(
                "train_metrics need the outputs and targets of each batch: return a dict "
                "with 'loss', 'outputs' and 'targets' from train_step"
            )
        if self._sums is None:
            self.open()
        assert self._sums is not None
        with torch.no_grad():
            detached = outputs.detach() if isinstance(outputs, torch.Tensor) else outputs
            self._sums.add(None, detached, targets, size)

    def results(self) -> dict[str, Any]:
        """``{"train_<name>": value}`` over the epoch's batches (all ranks), or ``{}``."""
        if self._sums is None or self._sums.count == 0:
            return {}
        return self._sums.results("train")


class StepLog:
    """``Trainer(log_every_n_steps=n)``: the running loss and LR every ``n`` optimizer steps.

    The loss logged is the sample-weighted mean over the batches since the previous
    log (within the epoch); it is read on the host only when logged.

    Example:
        >>> log = StepLog(2)
        >>> log.due(3), log.due(4)
        (False, True)
        >>> log.values({"loss": 2.0}, 4, lr=0.1), log.values({"loss": 1.5}, 8, lr=0.1)
        ({'train_loss_step': 2.0, 'lr_step': 0.1}, {'train_loss_step': 1.0, 'lr_step': 0.1})
    """

    def __init__(self, every: int | None) -> None:
        self.every = every
        self._sum, self._count = 0.0, 0

    def due(self, step: int) -> bool:
        """Whether to log at optimizer step ``step``."""
        return bool(self.every) and step % self.every == 0  # type: ignore[operator]

    def open_epoch(self) -> None:
        """The loss ledger starts a new epoch's sums: so does this."""
        self._sum, self._count = 0.0, 0

    def log(self, trainer: Any) -> None:
        """Log ``train_loss_step`` and ``lr_step`` at this optimizer step (one host read)."""
        logger = trainer.logger
        if logger is None or not is_main_process():
            return
        ledger = trainer._ledger
        values = self.values(ledger.running(), ledger.epoch_count + ledger.window_size,
                             lr=trainer.optimizer.param_groups[0]["lr"])
        logger.log_metrics(values, step=trainer.global_step)

    def values(self, running: Mapping[str, float], count: int, *, lr: float) -> dict[str, float]:
        """The scalars to log, from the ledger's running mean over ``count`` samples."""
        out = {"lr_step": float(lr)}
        if running and count > self._count:
            total = running["loss"] * count
            out = {"train_loss_step": (total - self._sum) / (count - self._count), **out}
            self._sum, self._count = total, count
        return out


def log_graph(logger: Any, model: nn.Module, batch: Any) -> None:
    """``TensorBoardLogger(log_graph=True)``: the graph, traced on the first batch's inputs."""
    try:
        inputs = split_batch(batch)[0]
    except (TypeError, KeyError):
        return  # a custom batch: the user can call logger.log_graph themselves
    if logger is not None:
        logger.log_graph(model, inputs)
