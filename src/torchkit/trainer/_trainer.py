"""Trainer: the everyday fit / evaluate / predict loop, composed from torchkit's pieces.

The loop only: loss bookkeeping (``_ledger``), stop signals (``_stops``), resume
(``_resume``), evaluation sums (``_evaluation``), option checks (``_setup``) and
process-group helpers (``_distributed``) live in their own private modules beside it.
Over the ~450-line budget (under ~600) because a third of it is public docstrings (every
option, ``fit``'s pseudocode) and the loop they document reads best in one place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from torch import nn

from torchkit._batches import batch_inputs, batch_size, split_batch, to_device
from torchkit._utils import check_keys, unwrap
from torchkit.accumulation import GradAccumulator
from torchkit.callbacks import Callback, TrainerView
from torchkit.checkpoint import CheckpointManager
from torchkit.distributed import barrier, get_world_size, is_main_process
from torchkit.progress import ProgressBar
from torchkit.state import seed_everything
from torchkit.trainer import _distributed as ddp
from torchkit.trainer import _resume, _sharding
from torchkit.trainer._evaluation import EvalSums, unpack_step
from torchkit.trainer._history import History
from torchkit.trainer._ledger import make_ledger
from torchkit.trainer._setup import (
    Metric,
    check_options,
    check_sharding,
    hook_table,
    named_metrics,
    resolve_device,
    run_hparams,
)
from torchkit.trainer._stops import SYNC_EVERY, StopSignals

__all__ = ["Trainer"]

_log = logging.getLogger("torchkit.trainer")

_NOTHING = contextlib.nullcontext()

_STATE_KEYS = ("epoch", "batch_idx", "should_stop", "stop_reason", "loss", "rng", "history",
               "callbacks", "logger")


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
        parallelize: ``parallelize(model, mesh) -> model`` shards the model (FSDP2's
            ``fully_shard``, tensor parallelism), called once here; the optimizer you
            passed is re-pointed at the new (DTensor) parameters, keeping its groups and
            options (it must not have stepped yet). A model whose parameters are
            DTensors already is accepted as is; neither is wrapped in DDP. Checkpoints
            then go through ``CheckpointManager(format="auto")`` (DCP, every rank
            writes); every rank evaluates all of ``val_data`` (a sharded forward is a
            collective), with the same results as a single process.
        mesh: The ``DeviceMesh`` handed to ``parallelize``; ``None`` builds a 1-D mesh
            over the process group.

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
        parallelize: Callable[[nn.Module, Any], nn.Module] | None = None,
        mesh: Any = None,
    ) -> None:
        callbacks = list(callbacks)
        check_options(model=model, optimizer=optimizer, loss_fn=loss_fn, scheduler=scheduler,
                      precision=precision, accumulate=accumulate, max_grad_norm=max_grad_norm,
                      callbacks=callbacks, logger=logger, progress=progress,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                      scheduler_interval=scheduler_interval,
                      scheduler_monitor=scheduler_monitor, nonfinite=nonfinite)
        if seed is not None:
            seed_everything(seed)
        self.device = resolve_device(device)
        if precision == "16" and self.device.type != "cuda":
            raise ValueError(
                f"precision='16' needs a CUDA device (float16 with a GradScaler), but the "
                f"device is {self.device}; use precision='bf16' on CPU"
            )
        model = model.to(self.device)
        check_sharding(parallelize=parallelize, mesh=mesh, checkpoint=checkpoint)
        model = _sharding.prepare(model, optimizer, parallelize, mesh, self.device)
        self._sharded = _sharding.is_sharded(model)  # DTensor parameters: never DDP
        self._world = get_world_size()
        if self._world > 1 and not self._sharded and not isinstance(
                model, nn.parallel.DistributedDataParallel):
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, \
            scheduler
        self.seed, self.precision = seed, precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "16" else None
        # With nonfinite="raise" losses are checked in bulk (see the ledger), so the
        # accumulator need not read its gradients' finiteness back at every step.
        self.accumulator = GradAccumulator(optimizer, accumulate, model=self.model,
                                           scaler=self.scaler, max_norm=max_grad_norm,
                                           skip_nonfinite=nonfinite == "skip")
        self.metrics = named_metrics(metrics)
        self.callbacks, self.logger, self.progress = callbacks, logger, progress
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.scheduler_interval, self.scheduler_monitor = scheduler_interval, scheduler_monitor
        self.nonfinite = nonfinite
        self.history = History()
        self.epoch, self.batch_idx, self.should_stop = 0, 0, False
        self.stop_reason: str | None = None
        self._hooks = hook_table(callbacks)
        self._ledger = make_ledger(nonfinite, device=self.device, scaled=self.scaler is not None)
        self._stops = StopSignals()
        self._resume_point = _resume.ResumePoint()
        self._graph_pending = False

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
                (under DDP: every rank learns of any rank's should_stop and signal)
                epoch += 1; checkpoint
            checkpoint.wait()                        # an async_save in flight completes
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
        if resume is not None:
            self._restore(resume)
        seed = 0 if self.seed is None else self.seed
        sharded = ddp.shard(train_data, train=True, seed=seed)
        # A DistributedSampler gives every rank the same count per batch: the weights
        # need no all-reduce of their own.
        self.accumulator.global_weights = sharded is train_data
        train_data = sharded
        val_data = val_data if self._sharded else ddp.shard(val_data, train=False, seed=seed)
        self._graph_pending = self.logger is not None and is_main_process() and \
            callable(getattr(self.logger, "log_graph", None))
        self._call("on_fit_start")
        try:
            with self._stops.installed():
                while self.epoch < epochs and not self.should_stop:
                    self._run_epoch(train_data, val_data, epochs)
        except BaseException as error:
            self._call("on_exception", error)
            raise
        if self.should_stop:
            _log.info("stopped early after epoch %d: %s", self.epoch, self.stop_reason)
        if self.checkpoint is not None:
            self.checkpoint.wait()  # an async_save in flight is on disk when fit returns
        if self.logger is not None and is_main_process() and self.history.records:
            final = {k: float(v) for k, v in self.history.records[-1].items()
                     if k not in ("epoch", "lr")}
            self.logger.log_hparams(run_hparams(self, epochs), final)
            self.logger.flush()
        self._call("on_fit_end")
        return self.history

    def _run_epoch(self, train_data: Iterable[Any], val_data: Iterable[Any] | None,
                   epochs: int) -> None:
        # Before the DataLoader draws its shuffle: record the RNG (or, resumed, replay it).
        start = self._resume_point.begin_epoch()
        if not start:
            self._ledger.open_epoch()
        lr = self.optimizer.param_groups[0]["lr"]
        self._call("on_epoch_start")
        self.model.train()
        total = len(train_data) if isinstance(train_data, Sized) else None
        with ProgressBar(total, desc=f"epoch {self.epoch + 1}/{epochs}",
                         enabled=self.progress and is_main_process()) as bar:
            for batch in self._batches(train_data, start, bar):
                self._train_batch(batch)
                bar.update(1, self._ledger.running)
            if self.accumulator.micro_step:
                self._end_window(self.accumulator.flush())  # the epoch's partial window
            self._check_losses()
            train_loss = self._ledger.close_epoch()  # over all ranks
            metrics = {} if train_loss is None else {"train_loss": train_loss}
            metrics.update(self._validate(val_data))
            metrics["lr"] = float(lr)
            self._step_scheduler(metrics)
            bar.set_metrics(metrics)
        self.history.append({"epoch": self.epoch, **metrics})
        if self.logger is not None and is_main_process():
            self.logger.log_metrics(metrics, step=self.epoch)
        self._call("on_epoch_end", metrics)
        self._sync_stops()  # every rank stops together, whoever decided
        self.epoch += 1
        self.batch_idx = 0
        self._save(metrics)
        if self._stops.signum is not None:  # it came during validation: the epoch is saved
            self._stop_on_signal(save=False)

    def _batches(self, train_data: Iterable[Any], start: int, bar: ProgressBar) -> Iterator[Any]:
        """This epoch's batches; a resumed epoch skips the ``start`` it already trained."""
        ddp.set_epoch(train_data, self.epoch)
        iterator = iter(train_data)
        for _ in range(start):
            next(iterator)  # consumed before the crash: same order, not trained again
        if start:
            bar.update(start)
        self._resume_point.picked_up()  # and the randomness continues from the save
        return iterator

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
            loss, _, _, size = unpack_step(out, batch)
        stepped = accumulator.backward(loss, batch_size=size or None)
        self._ledger.add(loss.detach(), size, self.batch_idx, accumulator.num_steps)
        self.batch_idx += 1
        if hooks["on_train_batch_end"]:
            self._call("on_train_batch_end", batch, self.batch_idx - 1)
        if accumulator.micro_step == 0:
            self._end_window(stepped)

    def _log_graph(self, batch: Any) -> None:
        self._graph_pending = False
        try:
            inputs = split_batch(batch)[0]
        except (TypeError, KeyError):
            return  # a custom batch: the user can call logger.log_graph themselves
        if self.logger is not None:
            self.logger.log_graph(self.model, inputs)

    def _end_window(self, stepped: bool) -> None:
        """After an optimizer step (or a skipped one): bookkeeping, scheduler, saves, signals."""
        self._ledger.end_window(stepped, epoch=self.epoch, batch_idx=self.batch_idx - 1,
                                step=self.global_step)
        # Under DDP at fixed steps, so ranks agree; alone, when a bulk loss check is due.
        if self.global_step % SYNC_EVERY == 0 if self._world > 1 else self._ledger.due():
            self._sync_stops()
        if stepped and self.scheduler is not None:
            self._step_scheduler(None)
        every = self.checkpoint_every
        if every and self.global_step % every == 0:
            self._save(None)
        if self._stops.ready():
            self._stop_on_signal()

    def _check_losses(self) -> None:
        """Fold the pending losses; raise if one was nan/inf (when checked in bulk)."""
        self._ledger.fold()  # on every rank, at fixed points, so the sums are exact
        if self._ledger.checks_in_bulk:
            self._sync_stops()

    def _sync_stops(self) -> None:
        """The one cross-rank stop check: should_stop, a signal and a nan loss, shared."""
        nonfinite = self._ledger.nonfinite()
        stop_any, nonfinite_any = self._stops.sync(should_stop=self.should_stop,
                                                   nonfinite=nonfinite, device=self.device)
        if stop_any and not self.should_stop:
            self.should_stop, self.stop_reason = True, "another rank decided to stop"
        if nonfinite_any:
            raise self._ledger.error(self.epoch, here=nonfinite)

    def _validate(self, val_data: Iterable[Any] | None) -> dict[str, float]:
        """Evaluate ``val_data`` (if given), then call ``on_validation_end``."""
        if val_data is None:
            return {}
        metrics = self.evaluate(val_data)
        self._call("on_validation_end", metrics)
        return metrics

    def _step_scheduler(self, metrics: Mapping[str, float] | None) -> None:
        """The scheduler rule, after an optimizer step (``metrics=None``) or an epoch.

        Interval ``"step"`` steps after each optimizer step, ``"epoch"`` after each epoch;
        ``ReduceLROnPlateau`` steps only after an epoch, with ``scheduler_monitor``.
        """
        scheduler = self.scheduler
        if scheduler is None:
            return
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if metrics is None:
            if self.scheduler_interval == "step" and not plateau:
                scheduler.step()
        elif plateau:
            if self.scheduler_monitor not in metrics:
                raise KeyError(
                    f"ReduceLROnPlateau watches scheduler_monitor={self.scheduler_monitor!r}, "
                    f"but this epoch's metrics are {sorted(metrics)}; pass val_data or "
                    "another scheduler_monitor"
                )
            scheduler.step(metrics[self.scheduler_monitor])
        elif self.scheduler_interval == "epoch":
            scheduler.step()

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
        if not self._sharded:  # a sharded model's forward is a collective: all see all
            data = ddp.shard(data, train=False, seed=0)
        was_training = self.model.training
        self.model.eval()
        sums = EvalSums(self.metrics, self.device)
        try:
            for batch in data:
                batch = to_device(batch, self.device)
                with self._autocast():
                    out = self.eval_step(batch)
                sums.add(*unpack_step(out, batch))
        finally:
            self.model.train(was_training)
        return sums.results(prefix)

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

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "32":
            return _NOTHING
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _call(self, hook: str, *args: Any) -> None:
        trainer: TrainerView = self  # mypy checks that hooks get all they may read
        for callback in self._hooks[hook]:
            getattr(callback, hook)(trainer, *args)

    # -- checkpoints, resume and signals ---------------------------------------------------

    def _save(self, metrics: Mapping[str, float] | None) -> None:
        if self.checkpoint is None:
            return
        self._check_losses()  # never save weights that a nan step has already ruined
        state = _resume.checkpoint_state(self)
        self._call("on_checkpoint_save", state)
        self._resume_point.capture(mid_epoch=self.batch_idx > 0)  # every rank's RNG
        if is_main_process() or self.checkpoint.uses_dcp(state):  # DCP: every rank writes
            self.checkpoint.save(state, step=self.global_step, epoch=self.epoch, metrics=metrics)
        barrier()  # no rank goes on (or reads it) before the file is complete

    def _restore(self, resume: str | Path) -> None:
        meta = _resume.load(resume, self.checkpoint, _resume.checkpoint_state(self),
                            self._resume_point)
        if meta is None:
            return
        _log.info("resumed from %s (epoch %d, step %d)", meta["path"], self.epoch,
                  self.global_step)
        self._resume_point.restore(batch_idx=self.batch_idx)
        self._call("on_checkpoint_load", meta)

    def _stop_on_signal(self, *, save: bool = True) -> NoReturn:
        signum = self._stops.take()
        if save:
            self._save(None)
        raise self._stops.exit_for(signum)

    def state_dict(self) -> dict[str, Any]:
        """Return the training progress, history, callbacks' and logger's state.

        The model, optimizer, scheduler, scaler and accumulator are saved beside it
        under their own names (see ``fit``'s checkpoints); ``rng`` holds one RNG record
        per rank, so each continues its own stream after a resume.
        """
        return {
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason,
            "loss": self._ledger.state_dict(),
            "rng": self._resume_point.state_dict(),
            "history": self.history.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "logger": None if self.logger is None else self.logger.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (or what torchkit 0.1.0 saved).

        Raises:
            ValueError: If the number of callbacks differs from the saved run.
        """
        state_dict = _resume.upgrade_legacy(state_dict)  # what torchkit 0.1.0 saved, too
        check_keys(state_dict, expected=_STATE_KEYS, owner=type(self).__name__)
        _resume.load_callbacks(self.callbacks, state_dict["callbacks"])
        if self.logger is not None and state_dict["logger"] is not None:
            self.logger.load_state_dict(state_dict["logger"])
        self.epoch = state_dict["epoch"]
        self.batch_idx = state_dict["batch_idx"]
        self.should_stop = state_dict["should_stop"]
        self.stop_reason = state_dict["stop_reason"]
        self._ledger.load_state_dict(state_dict["loss"])
        self._resume_point.load_state_dict(state_dict["rng"])
        self.history.load_state_dict(state_dict["history"])
