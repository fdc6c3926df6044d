"""Trainer: the everyday fit / evaluate / predict loop, composed from torchkit's pieces."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkit._batches import batch_inputs, batch_size, split_batch, to_device
from torchkit._utils import check_keys
from torchkit.accumulation import GradAccumulator
from torchkit.callbacks import Callback
from torchkit.checkpoint import CheckpointManager, load_checkpoint
from torchkit.checkpoint._files import unwrap
from torchkit.progress import ProgressBar
from torchkit.state import get_rng_state, seed_everything, set_rng_state
from torchkit.trainer import _distributed as ddp
from torchkit.trainer._history import History
from torchkit.trainer._setup import (
    HOOKS,
    Metric,
    check_config,
    is_main_process,
    named_metrics,
    overrides,
    resolve_device,
)

__all__ = ["Trainer"]

_log = logging.getLogger("torchkit.trainer")

_CHECK_INTERVAL_S = 1.0
_FOLD_EVERY = 64
_SYNC_EVERY = 64  # under DDP, ranks share nan losses and signals every this many steps
_NOTHING = contextlib.nullcontext()

_STATE_KEYS = ("epoch", "batch_idx", "should_stop", "stop_reason", "epoch_rng", "epoch_loss",
               "epoch_count", "history", "callbacks", "logger", "rank_rngs")


class Trainer:
    """Train, evaluate and predict with your own model, optimizer and data.

    ``Trainer`` only composes torchkit's pieces: the optimizer is stepped by a
    :class:`~torchkit.GradAccumulator` (which also clips and handles the GradScaler),
    checkpoints go through a :class:`~torchkit.CheckpointManager`, early stopping is the
    :class:`~torchkit.EarlyStopping` callback. Anything it does, you can do by hand with
    the same pieces; to change one step, subclass and override :meth:`train_step`,
    :meth:`eval_step` or :meth:`predict_step`.

    Under an initialised process group (``tk.launch``, torchrun) it wraps the model in
    DDP, gives each rank its share of a DataLoader (a ``DistributedSampler`` for
    training, ``set_epoch`` each epoch; an unpadded stride for evaluation), reduces the
    loss and metrics over ranks, logs, shows progress and writes checkpoints on rank 0
    only, and makes every rank stop together (early stopping, signals, nan losses).

    A batch is ``(inputs, targets)`` or a dict with ``"inputs"`` and ``"targets"``; the
    default step computes ``loss_fn(model(inputs), targets)``. Losses are averaged over
    samples (weighted by batch size) and metrics accumulated on the device; the host
    reads them once per epoch, plus a bounded number of times per second for the
    progress bar, so the loop adds no per-step synchronisation.

    Args:
        model: The model; moved to ``device``.
        optimizer: Its optimizer.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; optional if you override the
            steps.
        scheduler: An LR scheduler, stepped after each epoch (or optimizer step, see
            ``scheduler_interval``); ``ReduceLROnPlateau`` is stepped with
            ``scheduler_monitor`` after each evaluation.
        device: ``"auto"`` (CUDA, then MPS, then CPU), or any torch device.
        precision: ``"32"``; ``"bf16"`` (autocast, CPU or GPU); ``"16"`` (autocast and a
            GradScaler, CUDA only).
        accumulate: Micro-batches per optimizer step (exact, see ``GradAccumulator``).
        max_grad_norm: Clip the total gradient norm to this before each step.
        metrics: Named metrics: ``{"acc": tk.accuracy}``. Each is a callable
            ``fn(outputs, targets) -> batch mean`` or an object with
            ``update/compute/reset``; reported as ``val_<name>``. A sequence uses the
            callables' ``__name__``.
        callbacks: :class:`~torchkit.Callback` objects, e.g. ``EarlyStopping``.
        logger: A torchkit logger (``TensorBoardLogger``, ``CSVLogger``); epoch metrics
            are logged with the epoch as step, hyper-parameters at the end. ``fit``
            flushes it but does not close it: close it yourself (or use it as a context
            manager), so one logger can span several ``fit`` calls.
        progress: Show a tqdm bar per epoch.
        checkpoint: A :class:`~torchkit.CheckpointManager`: full training state is
            saved after each epoch, every ``checkpoint_every`` optimizer steps, and on
            SIGTERM/SIGINT.
        checkpoint_every: Also save every this many optimizer steps.
        seed: Call :func:`~torchkit.seed_everything` with it first (the model already
            exists by then: for reproducible initial weights, call it yourself before
            building the model). Also seeds the DistributedSampler's shuffle under DDP.
        scheduler_interval: Step the scheduler per ``"epoch"`` or per optimizer
            ``"step"``.
        scheduler_monitor: The metric ``ReduceLROnPlateau`` watches.
        nonfinite: On a nan/inf loss, ``"raise"`` a ``FloatingPointError`` naming the
            epoch, batch and optimizer step where it first happened, or ``"skip"`` such
            optimizer steps and leave them out of the epoch's loss. ``"raise"`` checks the
            losses in bulk about once a second, at each epoch end and before every
            checkpoint (so no checkpoint holds weights after a bad step); ``"skip"`` reads
            the gradients' finiteness at every optimizer step, one host sync each.

    Attributes:
        model, optimizer, scheduler, scaler, accumulator, callbacks, logger, history:
            The pieces in use (``scaler`` is ``None`` unless ``precision="16"``).
        epoch: The current epoch, counted from 0.
        batch_idx: Batches consumed in the current epoch.
        should_stop: Set it to ``True`` from a callback to end ``fit`` after the epoch.
        stop_reason: Why ``fit`` stopped early, or ``None``.

    Raises:
        ValueError: If an option is out of range, or ``precision="16"`` off CUDA.
        TypeError: If ``model``, ``optimizer`` or a callback has the wrong type.

    Example:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> x = torch.randn(64, 4)
        >>> data = [(x[i:i + 16], (x[i:i + 16].sum(1) > 0).long()) for i in range(0, 64, 16)]
        >>> model = nn.Linear(4, 2)
        >>> trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5),
        ...                      nn.functional.cross_entropy, metrics={"acc": tk.accuracy},
        ...                      progress=False)
        >>> history = trainer.fit(data, data, epochs=5)
        >>> history.keys()
        ['epoch', 'train_loss', 'val_loss', 'val_acc', 'lr']
        >>> history["val_acc"][-1] > history["val_acc"][0]
        True
        >>> trainer.predict(data).shape
        torch.Size([64, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        scheduler: Any = None,
        device: str | torch.device = "auto",
        precision: Literal["32", "bf16", "16"] = "32",
        accumulate: int = 1,
        max_grad_norm: float | None = None,
        metrics: Mapping[str, Metric] | Sequence[Metric] | None = None,
        callbacks: Iterable[Callback] = (),
        logger: Any = None,
        progress: bool = True,
        checkpoint: CheckpointManager | None = None,
        checkpoint_every: int | None = None,
        seed: int | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val_loss",
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> None:
        callbacks = list(callbacks)
        check_config(model=model, optimizer=optimizer, precision=precision,
                     checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                     scheduler_interval=scheduler_interval, nonfinite=nonfinite,
                     callbacks=callbacks)
        if seed is not None:
            seed_everything(seed)
        self.device = resolve_device(device)
        if precision == "16" and self.device.type != "cuda":
            raise ValueError(
                f"precision='16' needs a CUDA device (float16 with a GradScaler), but the "
                f"device is {self.device}; use precision='bf16' on CPU"
            )
        model = model.to(self.device)
        if ddp.world_size() > 1 and not isinstance(model, nn.parallel.DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.seed = seed
        self._world = ddp.world_size()
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scheduler = scheduler
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "16" else None
        # With nonfinite="raise" losses are checked in bulk (see _check_finite), so the
        # accumulator need not read its gradients' finiteness back at every step.
        self.accumulator = GradAccumulator(optimizer, accumulate, model=self.model,
                                           scaler=self.scaler, max_norm=max_grad_norm,
                                           skip_nonfinite=nonfinite == "skip")
        self.metrics = named_metrics(metrics)
        self.callbacks = callbacks
        self.logger = logger
        self.progress = progress
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.nonfinite = nonfinite
        self.history = History()
        self.epoch = 0
        self.batch_idx = 0
        self.should_stop = False
        self.stop_reason: str | None = None
        self._hooks = {name: [cb for cb in callbacks if overrides(cb, name)] for name in HOOKS}
        self._epoch_rng: dict[str, Any] | None = None
        # float32, like the losses themselves: a float64 sum would add a cast to every step.
        self._sum_dtype = torch.float32
        self._epoch_loss = torch.zeros((), dtype=self._sum_dtype, device=self.device)
        self._epoch_count = 0
        self._signal: int | None = None
        self._rank_rngs: list[Any] | None = None
        self._signal_shared = False
        self._pending: list[tuple[torch.Tensor, int, int, int]] = []
        self._unchecked: list[tuple[torch.Tensor, int, int, int]] = []
        self._next_check = 0.0

    @property
    def module(self) -> nn.Module:
        """The model without its DDP / ``torch.compile`` wrapper (what evaluation runs)."""
        return unwrap(self.model)

    @property
    def global_step(self) -> int:
        """Optimizer steps so far (windows completed by the accumulator)."""
        return self.accumulator.num_steps

    # -- the steps users override ------------------------------------------------------

    def train_step(self, batch: Any) -> torch.Tensor | Mapping[str, Any]:
        """Compute one training batch's loss (forward only; backward is the trainer's).

        Returns:
            The mean loss, or a dict with ``"loss"`` and optionally ``"outputs"``,
            ``"targets"`` and ``"batch_size"``.
        """
        return self._default_step(batch)["loss"]  # type: ignore[no-any-return]

    def eval_step(self, batch: Any) -> torch.Tensor | Mapping[str, Any]:
        """Compute one evaluation batch's loss and outputs; same return as :meth:`train_step`.

        Under DDP, run ``self.module`` (as the default does), not the DDP wrapper: ranks
        may see different numbers of batches, and DDP's forward talks to the others.
        """
        return self._default_step(batch, self.module)

    def predict_step(self, batch: Any) -> torch.Tensor:
        """Return the model's outputs for one batch (its inputs, or the whole batch)."""
        return self.module(batch_inputs(batch))  # type: ignore[no-any-return]

    def _default_step(self, batch: Any, model: nn.Module | None = None) -> dict[str, Any]:
        if self.loss_fn is None:
            raise TypeError(
                "Trainer(loss_fn=None) cannot run the default step: pass loss_fn, or "
                "subclass Trainer and override train_step/eval_step"
            )
        inputs, targets = split_batch(batch)
        outputs = (model or self.model)(inputs)
        return {"loss": self.loss_fn(outputs, targets), "outputs": outputs, "targets": targets}

    # -- fit -----------------------------------------------------------------------------

    def fit(self, train_data: Iterable[Any], val_data: Iterable[Any] | None = None, *,
            epochs: int, resume: str | Path | None = None) -> History:
        """Train for ``epochs`` epochs (in total, counting resumed ones) and return the history.

        The order of operations and hooks, exactly::

            resume (if asked): load state, then on_checkpoint_load
            on_fit_start
            while epoch < epochs and not should_stop:
                on_epoch_start
                for each batch:                      # skipping those done before a resume
                    on_train_batch_start
                    forward (train_step) inside accumulator.accumulate() and autocast
                    accumulator.backward(loss)       # steps at window ends: unscale,
                                                     #   normalise, clip, step, update, zero
                    on_train_batch_end
                    at a window end: scheduler.step() (interval "step"),
                        checkpoint every checkpoint_every steps, and on SIGTERM/SIGINT:
                        save, then raise SystemExit / KeyboardInterrupt
                accumulator.flush()                  # the epoch's partial window
                evaluate(val_data), then on_validation_end
                scheduler.step() (interval "epoch"; ReduceLROnPlateau with its metric)
                history.append(record); logger.log_metrics(record, step=epoch)
                on_epoch_end                         # EarlyStopping may set should_stop
                epoch += 1; checkpoint
            logger.log_hparams; on_fit_end
            (on any exception: on_exception, then it propagates)

        Args:
            train_data: A DataLoader, or any iterable of batches (re-iterated each epoch).
            val_data: Evaluated after each epoch, if given.
            epochs: The total number of epochs.
            resume: ``"latest"`` or ``"best"`` (from ``checkpoint``; starting fresh if
                there is none yet) or a checkpoint path. On CPU with deterministic ops
                the result is bitwise identical to an uninterrupted run, also when the
                checkpoint was taken mid-epoch.

        Returns:
            The :class:`History`, one record per epoch.

        Raises:
            ValueError: If ``epochs`` is not a positive int or ``resume`` needs a
                ``checkpoint`` manager that is missing.
            FloatingPointError: On a nan/inf loss with ``nonfinite="raise"``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        resume_rng = self._resume(resume) if resume is not None else None
        seed = 0 if self.seed is None else self.seed
        sharded = ddp.shard(train_data, train=True, seed=seed)
        # A DistributedSampler gives every rank the same count per batch: the weights
        # need no all-reduce of their own.
        self.accumulator.global_weights = sharded is train_data
        train_data = sharded
        val_data = ddp.shard(val_data, train=False, seed=seed)
        self._graph_pending = self.logger is not None and is_main_process() and \
            callable(getattr(self.logger, "log_graph", None))
        self._call("on_fit_start")
        try:
            with self._signal_handlers():
                while self.epoch < epochs and not self.should_stop:
                    self._run_epoch(train_data, val_data, epochs, resume_rng)
                    resume_rng = None
        except BaseException as error:
            self._call("on_exception", error)
            raise
        if self.should_stop:
            _log.info("stopped early after epoch %d: %s", self.epoch, self.stop_reason)
        if self.logger is not None and is_main_process() and self.history.records:
            self.logger.log_hparams(self._hparams(epochs), self._final_metrics())
            self.logger.flush()
        self._call("on_fit_end")
        return self.history

    def _run_epoch(self, train_data: Iterable[Any], val_data: Iterable[Any] | None,
                   epochs: int, resume_rng: dict[str, Any] | None) -> None:
        start = self.batch_idx if resume_rng is not None else 0
        if resume_rng is None:
            # Capture the RNG before the DataLoader draws its shuffle, so a mid-epoch
            # resume can replay the same order.
            self._epoch_rng = get_rng_state()
            self._epoch_loss.zero_()
            self._epoch_count = 0
            self._pending, self._unchecked = [], []
        elif self._epoch_rng is not None:
            set_rng_state(self._epoch_rng)
        lr = self.optimizer.param_groups[0]["lr"]
        self._call("on_epoch_start")
        self.model.train()
        total = len(train_data) if isinstance(train_data, Sized) else None
        with ProgressBar(total, desc=f"epoch {self.epoch + 1}/{epochs}",
                         enabled=self.progress and is_main_process()) as bar:
            ddp.set_epoch(train_data, self.epoch)
            iterator = iter(train_data)
            for _ in range(start):
                next(iterator)  # consumed before the crash: same order, not trained again
            if start:
                bar.update(start)
            if resume_rng is not None:
                set_rng_state(resume_rng)  # and the randomness continues from the save
            for batch in iterator:
                self._train_batch(batch)
                bar.update(1, self._running_metrics)
            if self.accumulator.micro_step:
                self._end_window(self.accumulator.flush())
            self._fold()
            if self.nonfinite == "raise":
                self._check_finite()
            metrics = self._epoch_metrics(val_data, lr)
            bar.set_metrics(metrics)
        self.history.append({"epoch": self.epoch, **metrics})
        if self.logger is not None and is_main_process():
            self.logger.log_metrics(metrics, step=self.epoch)
        self._call("on_epoch_end", metrics)
        if self._world > 1:  # every rank stops together, whoever decided
            stop_any, signal_any = ddp.any_ranks([self.should_stop, self._signal is not None],
                                                 self.device)
            if stop_any and not self.should_stop:
                self.should_stop, self.stop_reason = True, "another rank decided to stop"
            if signal_any:
                self._signal, self._signal_shared = self._signal or signal.SIGTERM, True
        self.epoch += 1
        self.batch_idx = 0
        if self.checkpoint is not None:
            self._save(metrics)
        if self._signal is not None:  # it came during validation: the epoch is saved
            self._stop_on_signal(save=False)

    def _train_batch(self, batch: Any) -> None:
        # The hot path: every line here runs once per batch, so hooks nobody overrides
        # are skipped and the default step's plain loss tensor takes the short way.
        hooks = self._hooks
        if hooks["on_train_batch_start"]:
            self._call("on_train_batch_start", batch, self.batch_idx)
        batch = to_device(batch, self.device)
        if self._graph_pending:
            self._log_graph(batch)
        accumulator = self.accumulator
        with accumulator.accumulate(), self._autocast():
            out = self.train_step(batch)
        if isinstance(out, torch.Tensor):
            loss, size = out, batch_size(batch)
        else:
            loss, _, _, size = self._unpack(out, batch)
        stepped = accumulator.backward(loss, batch_size=size or None)
        loss = loss.detach()
        if self.nonfinite == "skip":
            self._window_loss().add_(loss, alpha=size)
        else:
            # Kept, not summed, per step: summing in chunks saves a kernel per step.
            self._pending.append((loss, size, self.batch_idx, accumulator.num_steps))
            if len(self._pending) >= _FOLD_EVERY:
                self._fold()
        self._window_size += size
        self.batch_idx += 1
        if hooks["on_train_batch_end"]:
            self._call("on_train_batch_end", batch, self.batch_idx - 1)
        if accumulator.micro_step == 0:
            self._end_window(stepped)

    _window_size = 0
    _window: torch.Tensor | None = None
    _graph_pending = False

    def _log_graph(self, batch: Any) -> None:
        self._graph_pending = False
        try:
            inputs = split_batch(batch)[0]
        except (TypeError, KeyError):
            return  # a custom batch: the user can call logger.log_graph themselves
        if self.logger is not None:
            self.logger.log_graph(self.model, inputs)

    def _window_loss(self) -> torch.Tensor:
        if self._window is None:
            self._window = torch.zeros((), dtype=self._sum_dtype, device=self.device)
        return self._window

    def _end_window(self, stepped: bool) -> None:
        """After an optimizer step (or a skipped one): bookkeeping, scheduler, saves, signals."""
        size, self._window_size = self._window_size, 0
        self._epoch_count += size
        if self.nonfinite == "skip":
            if stepped:
                self._epoch_loss.add_(self._window_loss())
            else:
                self._epoch_count -= size
                self._on_skipped()
            self._window_loss().zero_()
        if self._world > 1:
            if self.global_step % _SYNC_EVERY == 0:
                self._check_finite()  # at fixed steps, so ranks agree; shares signals too
        elif self.nonfinite == "raise" and time.monotonic() >= self._next_check:
            self._check_finite()
        if stepped and self.scheduler_interval == "step" and self.scheduler is not None \
                and not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step()
        every = self.checkpoint_every
        if self.checkpoint is not None and every and self.global_step % every == 0:
            self._save(None)
        if self._signal is not None and (self._world == 1 or self._signal_shared):
            self._stop_on_signal()

    def _fold(self) -> None:
        """Add the pending losses to the epoch's sum (at fixed points, so sums are exact)."""
        if not self._pending:
            return
        self._epoch_loss.add_(self._pending_sum())
        self._unchecked.extend(self._pending)
        self._pending = []

    def _check_finite(self) -> None:
        """Raise if a loss since the last check was nan/inf (nonfinite="raise").

        Losses are checked in bulk about once a second, before every checkpoint and at
        the end of each epoch, not at every step: one host read instead of one per step.
        """
        self._next_check = time.monotonic() + _CHECK_INTERVAL_S
        entries, self._unchecked = self._unchecked + self._pending, []
        finite = torch.isfinite(torch.stack([e[0] for e in entries])) if entries else None
        bad_here = finite is not None and not bool(finite.all())
        if self._world > 1:  # one collective shares both a nan loss and a pending signal
            bad_any, signal_any = ddp.any_ranks([bad_here, self._signal is not None],
                                                self.device)
            if signal_any:
                self._signal, self._signal_shared = self._signal or signal.SIGTERM, True
        else:
            bad_any = bad_here
        if not bad_any:
            return
        if finite is None or not bad_here:
            raise FloatingPointError(f"the loss became nan/inf on another rank in epoch "
                                     f"{self.epoch}; see that rank's error")
        _, _, batch_idx, step = entries[int(torch.nonzero(~finite)[0])]
        raise FloatingPointError(
            f"the loss became nan/inf at epoch {self.epoch}, batch {batch_idx}, optimizer "
            f"step {step}. Lower the learning rate, clip gradients (max_grad_norm=...), or "
            "pass nonfinite='skip' to skip such steps"
        )

    def _on_skipped(self) -> None:
        window = self._window_loss()
        if self.scaler is not None and bool(torch.isfinite(window)):
            return  # a GradScaler overflow: the scaler lowers its scale and goes on
        _log.warning("skipped the optimizer step at epoch %d, batch %d, optimizer step %d: "
                     "nan/inf loss or gradients", self.epoch, self.batch_idx - 1,
                     self.global_step)

    def _running_metrics(self) -> dict[str, float]:
        count = self._epoch_count + self._window_size
        if not count:
            return {}
        total = self._epoch_loss
        if self._pending:  # one host read for the whole chunk, not one per pending loss
            total = total + self._pending_sum()
        return {"loss": float(total) / count}

    def _pending_sum(self) -> torch.Tensor:
        """The sample-weighted sum of the pending losses, on the device."""
        losses = torch.stack([p[0] for p in self._pending]).to(self._sum_dtype)
        sizes = torch.tensor([p[1] for p in self._pending], dtype=self._sum_dtype,
                             device=losses.device)
        return torch.dot(losses, sizes)

    def _epoch_metrics(self, val_data: Iterable[Any] | None, lr: float) -> dict[str, float]:
        metrics: dict[str, float] = {}
        totals = ddp.all_reduce_sum(torch.stack([
            self._epoch_loss.detach().clone(),
            torch.tensor(float(self._epoch_count), dtype=self._sum_dtype, device=self.device),
        ]))  # over all ranks' samples (DistributedSampler's padding included, as trained)
        if totals[1] > 0:
            metrics["train_loss"] = float(totals[0] / totals[1])
        if val_data is not None:
            val = self.evaluate(val_data)
            metrics.update(val)
            self._call("on_validation_end", val)
        metrics["lr"] = float(lr)
        if self.scheduler is not None:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if self.scheduler_monitor not in metrics:
                    raise KeyError(
                        f"ReduceLROnPlateau watches scheduler_monitor="
                        f"{self.scheduler_monitor!r}, but this epoch's metrics are "
                        f"{sorted(metrics)}; pass val_data or another scheduler_monitor"
                    )
                self.scheduler.step(metrics[self.scheduler_monitor])
            elif self.scheduler_interval == "epoch":
                self.scheduler.step()
        return metrics

    # -- evaluate and predict -------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Iterable[Any], *, prefix: str = "val") -> dict[str, float]:
        """Return the sample-weighted mean loss and every metric over ``data``.

        Args:
            data: A DataLoader or any iterable of batches.
            prefix: The key prefix: ``val_loss``, ``val_acc``, ... by default.

        Returns:
            ``{f"{prefix}_loss": ..., f"{prefix}_<metric>": ...}`` as Python floats.

        Raises:
            ValueError: If ``data`` has no samples.

        Under a process group every rank evaluates its share of a DataLoader (each sample
        exactly once, no padding) and the sums are reduced, so the results equal a single
        process's; objects with ``update/compute/reset`` see only their rank's share
        unless they synchronise themselves (as torchmetrics does).
        """
        data = ddp.shard(data, train=False, seed=0)
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=self._sum_dtype, device=self.device)
        sums = {name: torch.zeros_like(loss_sum) for name, m in self.metrics.items()
                if not hasattr(m, "update")}
        for metric in self.metrics.values():
            if hasattr(metric, "reset"):
                metric.reset()
        count, has_loss = 0, False
        try:
            for batch in data:
                batch = to_device(batch, self.device)
                with self._autocast():
                    out = self.eval_step(batch)
                loss, outputs, targets, size = self._unpack(out, batch)
                if loss is not None:
                    loss_sum.add_(loss.detach(), alpha=size)
                    has_loss = True
                self._update_metrics(sums, outputs, targets, size)
                count += size
        finally:
            self.model.train(was_training)
        names = list(sums)
        totals = ddp.all_reduce_sum(torch.stack([
            loss_sum, torch.tensor(float(count), dtype=loss_sum.dtype, device=self.device),
            torch.tensor(float(has_loss), dtype=loss_sum.dtype, device=self.device),
            *[sums[name] for name in names],
        ])).tolist()
        count, has_loss = int(totals[1]), totals[2] > 0
        if count == 0:
            raise ValueError("evaluate() got no samples: the data is empty")
        reduced = dict(zip(names, totals[3:]))
        results = {f"{prefix}_loss": totals[0] / count} if has_loss else {}
        for name, metric in self.metrics.items():
            value = reduced[name] / count if name in reduced else metric.compute()
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, int | float):
                results[f"{prefix}_{name}"] = float(value)
        return results

    def _update_metrics(self, sums: dict[str, torch.Tensor], outputs: Any, targets: Any,
                        size: int) -> None:
        if not self.metrics:
            return
        if outputs is None or targets is None:
            raise ValueError(
                "metrics need outputs and targets: return a dict with 'outputs' and "
                "'targets' from eval_step"
            )
        for name, metric in self.metrics.items():
            if name in sums:
                sums[name].add_(torch.as_tensor(metric(outputs, targets)).detach(), alpha=size)
            else:
                metric.update(outputs, targets)

    @torch.no_grad()
    def predict(self, data: Iterable[Any]) -> torch.Tensor:
        """Return :meth:`predict_step`'s outputs for every batch, concatenated in order.

        The model runs in eval mode under the trainer's precision; outputs are moved to
        the CPU batch by batch so large predictions do not fill the GPU.
        """
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            for batch in data:
                with self._autocast():
                    out = self.predict_step(to_device(batch, self.device))
                outputs.append(out.detach().to("cpu"))
        finally:
            self.model.train(was_training)
        if not outputs:
            raise ValueError("predict() got no batches: the data is empty")
        return torch.cat(outputs)

    # -- helpers ------------------------------------------------------------------------

    def _unpack(self, out: Any, batch: Any) -> tuple[Any, Any, Any, int]:
        if type(out) is dict and "loss" in out and "batch_size" not in out:  # the default step
            return out["loss"], out.get("outputs"), out.get("targets"), batch_size(batch)
        if isinstance(out, torch.Tensor):
            return out, None, None, batch_size(batch)
        if not isinstance(out, Mapping) or "loss" not in out:
            raise TypeError(
                f"a step must return the loss tensor or a dict with 'loss', got "
                f"{type(out).__name__}"
            )
        size = out.get("batch_size") or batch_size(batch)
        return out["loss"], out.get("outputs"), out.get("targets"), int(size)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "32":
            return _NOTHING
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self._hooks[hook]:
            getattr(callback, hook)(self, *args)

    def _hparams(self, epochs: int) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        hparams: dict[str, Any] = {
            "model": type(self.model).__name__, "optimizer": type(self.optimizer).__name__,
            "epochs": epochs, "precision": self.precision,
            "accumulate": self.accumulator.steps,
            "max_grad_norm": self.accumulator.max_norm or 0.0,
        }
        for key in ("lr", "weight_decay", "momentum"):
            if isinstance(group.get(key), int | float):
                hparams[key] = group["initial_lr"] if key == "lr" and "initial_lr" in group \
                    else group[key]
        return hparams

    def _final_metrics(self) -> dict[str, float]:
        last = self.history.records[-1]
        return {k: float(v) for k, v in last.items() if k not in ("epoch", "lr")}

    # -- checkpoints, resume and signals ---------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.scaler is not None:
            state["scaler"] = self.scaler
        state["accumulator"] = self.accumulator
        state["trainer"] = self
        return state

    def _save(self, metrics: Mapping[str, float] | None) -> None:
        if self.checkpoint is None:
            return
        self._fold()  # on every rank, so the saved sums are complete
        if self.nonfinite == "raise":
            self._check_finite()  # never save weights that a nan step has already ruined
        state = self._checkpoint_state()
        self._call("on_checkpoint_save", state)
        # Every rank's RNG, so each continues its own stream after a resume.
        self._rank_rngs = ddp.gather((get_rng_state(), self._epoch_rng))
        if is_main_process():
            self.checkpoint.save(state, step=self.global_step, epoch=self.epoch, metrics=metrics)
        ddp.barrier()  # no rank goes on (or reads it) before the file is complete

    def _resume(self, resume: str | Path) -> dict[str, Any] | None:
        state = self._checkpoint_state()
        if resume in ("latest", "best"):
            if self.checkpoint is None:
                raise ValueError(
                    f"resume={resume!r} needs Trainer(checkpoint=CheckpointManager(...)); "
                    "or pass the path of a checkpoint file"
                )
            self.checkpoint.refresh()  # under DDP only rank 0 saved: see what it wrote
            if self.checkpoint.latest() is None:
                _log.info("no checkpoint in %s yet: starting from scratch",
                          self.checkpoint.directory)
                return None
            meta = self.checkpoint.load(str(resume), state, restore_rng=True)
        else:
            meta = load_checkpoint(resume, state, restore_rng=True)
        _log.info("resumed from %s (epoch %d, step %d)", meta["path"], self.epoch,
                  self.global_step)
        if self._rank_rngs is not None and len(self._rank_rngs) == self._world:
            rng, self._epoch_rng = self._rank_rngs[ddp.rank()]
            set_rng_state(rng)
        self._call("on_checkpoint_load", meta)
        return get_rng_state() if self.batch_idx else None

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop right now
            self._signal = signum
            _log.warning("received %s: finishing the optimizer step, then saving and "
                         "stopping", signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, old in previous.items():
                signal.signal(s, old)

    def _stop_on_signal(self, *, save: bool = True) -> None:
        signum, self._signal, self._signal_shared = self._signal, None, False
        if save and self.checkpoint is not None:
            self._save(None)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(signum or signal.SIGTERM))

    def state_dict(self) -> dict[str, Any]:
        """Return the training progress, history, callbacks' and logger's state.

        The model, optimizer, scheduler, scaler and accumulator are saved beside it
        under their own names (see ``fit``'s checkpoints).
        """
        self._fold()
        return {
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason,
            "epoch_rng": self._epoch_rng,
            "epoch_loss": self._epoch_loss.detach().to("cpu", copy=True),
            "epoch_count": self._epoch_count,
            "history": self.history.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "logger": None if self.logger is None else self.logger.state_dict(),
            "rank_rngs": self._rank_rngs,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: If the number of callbacks differs from the saved run.
        """
        check_keys(state_dict, expected=_STATE_KEYS, owner=type(self).__name__)
        saved_callbacks = state_dict["callbacks"]
        if len(saved_callbacks) != len(self.callbacks) and not any(saved_callbacks):
            saved_callbacks = [{} for _ in self.callbacks]  # none had state: nothing to lose
        if len(saved_callbacks) != len(self.callbacks):
            raise ValueError(
                f"the checkpoint has state for {len(saved_callbacks)} callbacks but this "
                f"Trainer has {len(self.callbacks)}; pass the same callbacks, in order"
            )
        for callback, cb_state in zip(self.callbacks, saved_callbacks):
            callback.load_state_dict(cb_state)
        if self.logger is not None and state_dict["logger"] is not None:
            self.logger.load_state_dict(state_dict["logger"])
        self.epoch = state_dict["epoch"]
        self.batch_idx = state_dict["batch_idx"]
        self.should_stop = state_dict["should_stop"]
        self.stop_reason = state_dict["stop_reason"]
        self._epoch_rng = state_dict["epoch_rng"]
        self._epoch_loss = state_dict["epoch_loss"].to(self.device, self._sum_dtype)
        self._epoch_count = state_dict["epoch_count"]
        self._rank_rngs = state_dict["rank_rngs"]
        self.history.load_state_dict(state_dict["history"])
