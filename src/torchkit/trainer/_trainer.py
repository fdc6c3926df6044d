"""Trainer: the everyday fit / evaluate / predict loop, composed from torchkit's pieces.

The loop only (options, fit / run epoch / train batch / end window, evaluate, predict,
state). Beside it, each in its own private module: loss bookkeeping and the non-finite
policy (``_ledger``), stop signals and the cross-rank stop check (``_stops``), resume
and checkpoints (``_resume``), the evaluate / predict loops (``_evaluation``), the
scheduler rule (``_scheduler``), option checks (``_setup``), process groups
(``_distributed``), sharding (``_sharding``), ``torch.compile`` (``_compile``), the
recipes' planned stops (``_recipes``) and the weights guard, training metrics and step
log (``_guards``). Over the ~450-line budget because half of it is public docstrings
(every option, ``fit``'s pseudocode), which belong with the loop they document.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from torch import nn

from torchkit._batches import batch_inputs, batch_size, check_not_empty, split_batch, to_device
from torchkit._fsdp import has_dtensor_params
from torchkit._utils import unwrap
from torchkit.accumulation import GradAccumulator
from torchkit.callbacks import Callback, TrainerView
from torchkit.checkpoint import CheckpointManager
from torchkit.distributed import get_world_size, is_main_process
from torchkit.progress import ProgressBar
from torchkit.state import seed_everything
from torchkit.trainer import _distributed as ddp
from torchkit.trainer import _evaluation, _recipes, _resume, _sharding
from torchkit.trainer._compile import CompiledModels, compile_errors
from torchkit.trainer._evaluation import scalars, unpack_step
from torchkit.trainer._guards import StepLog, TrainSums, WeightsGuard, log_graph
from torchkit.trainer._history import History
from torchkit.trainer._ledger import make_ledger
from torchkit.trainer._scheduler import step_scheduler
from torchkit.trainer._setup import (
    Metric,
    as_callbacks,
    autocast,
    check_fit,
    check_more_options,
    check_options,
    check_precision,
    check_sharding,
    graph_on_fit,
    hook_table,
    log_run,
    named_metrics,
    plain_windows,
    resolve_device,
)
from torchkit.trainer._stops import SYNC_EVERY, StopSignals, sync_stops

__all__ = ["Trainer"]

_log = logging.getLogger("torchkit.trainer")


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
        compile: ``True`` or a dict of :func:`torch.compile` options (``{"mode":
            "max-autotune"}``) compiles the model after any DDP wrap; ``evaluate`` and
            ``predict`` run the compiled module too (without DDP). Checkpoints hold the
            plain model, so they load into an uncompiled one. A failure of torch.compile
            raises a ``RuntimeError`` naming this option. Off by default.
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
        clip_value: Clamp every gradient element into ``[-clip_value, clip_value]``
            after unscaling, before the step (with ``max_grad_norm`` too: value first,
            then norm; see ``GradAccumulator(clip_value=)``).
        train_metrics: Metrics of the training batches, as ``metrics`` (callables or
            objects with ``update/compute/reset``), accumulated on the device during
            the epoch and reported as ``train_<name>``. The default ``train_step`` then
            returns its outputs too; an overridden one must return a dict with
            ``"loss"``, ``"outputs"`` and ``"targets"``. A run resumed mid-epoch counts
            them from the resumed batch on.
        log_every_n_steps: Also log ``train_loss_step`` (the mean loss of the batches
            since the previous log, this rank's) and ``lr_step`` every this many
            optimizer steps, with the optimizer step as ``step``; read on the host only
            then.
        hparams: Your hyper-parameters (``{"batch_size": 64, "augment": "flip"}``:
            bool, int, float, str or None values), merged over the trainer's own into
            what ``logger.log_hparams`` records at the end of ``fit``.

    **Epoch numbers** are one convention, counted from 0: ``History["epoch"]``,
    ``trainer.epoch`` during an epoch, ``EarlyStopping``'s ``best_step`` (one observation
    per epoch), the ``epoch`` in the metadata of the checkpoint saved at the end of that
    epoch (a mid-epoch checkpoint carries the epoch it was taken in) and the progress
    bar's ``epoch 0 (1/5)``. So ``history.best_epoch("val_loss")`` names the checkpoint
    ``CheckpointManager.best()`` holds when both watch ``val_loss``.

    Attributes:
        model, optimizer, scheduler, scaler, accumulator, callbacks, logger, history:
            The pieces in use (``scaler`` is ``None`` unless ``precision="16"``).
        epoch: The current epoch, counted from 0 (after ``fit``: the epochs done).
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
        clip_value: float | None = None,
        train_metrics: Mapping[str, Metric] | Sequence[Metric] | None = None,
        log_every_n_steps: int | None = None,
        hparams: Mapping[str, Any] | None = None,
        parallelize: Callable[[nn.Module, Any], nn.Module] | None = None,
        mesh: Any = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        callbacks = as_callbacks(callbacks)
        check_more_options(clip_value=clip_value, train_metrics=train_metrics,
                           log_every_n_steps=log_every_n_steps, hparams=hparams,
                           logger=logger)
        check_options(model=model, optimizer=optimizer, loss_fn=loss_fn, scheduler=scheduler,
                      precision=precision, accumulate=accumulate, max_grad_norm=max_grad_norm,
                      callbacks=callbacks, logger=logger, progress=progress,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                      scheduler_interval=scheduler_interval,
                      scheduler_monitor=scheduler_monitor, nonfinite=nonfinite,
                      compile=compile)
        check_sharding(parallelize=parallelize, mesh=mesh, checkpoint=checkpoint)
        if seed is not None:
            seed_everything(seed)
        self.device = resolve_device(device)
        check_precision(precision, self.device)
        model = _sharding.prepare(model.to(self.device), optimizer, parallelize, mesh,
                                  self.device)
        self._sharded = has_dtensor_params(model)  # DTensor parameters: never DDP
        self._world = get_world_size()
        self._ddp_own = not isinstance(model, nn.parallel.DistributedDataParallel)
        if not self._sharded:
            model = ddp.wrap_ddp(model, self.device)
        self._trainable = ddp.trainable_ids(unwrap(model))  # what a DDP wrap reduces
        self.model, self.optimizer, self.loss_fn, self.scheduler = model, optimizer, loss_fn, \
            scheduler
        self.seed, self.precision = seed, precision
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "16" else None
        # With nonfinite="raise" losses are checked in bulk (see the ledger), so the
        # accumulator need not read its gradients' finiteness back at every step.
        self.accumulator = GradAccumulator(optimizer, accumulate, model=self.model,
                                           scaler=self.scaler, max_norm=max_grad_norm,
                                           skip_nonfinite=nonfinite == "skip",
                                           clip_value=clip_value,
                                           # the "skip" ledger books each skip as it happens
                                           skip_on_device=False)
        self._compiled = CompiledModels(self.model, compile)  # after DDP and accumulator
        self.model = self._compiled.train
        self.metrics = named_metrics(metrics)
        self.train_metrics = named_metrics(train_metrics, option="train_metrics")
        self.log_every_n_steps, self.hparams = log_every_n_steps, dict(hparams or {})
        self._train_sums = TrainSums(self.train_metrics, self.device) if self.train_metrics \
            else None
        self._step_log = StepLog(log_every_n_steps)
        self._weights_guard = WeightsGuard()
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
        self._max_steps: int | None = None
        self._plain_forward = precision == "32" and isinstance(  # no DDP/FSDP window context
            self.accumulator.accumulate(), contextlib.nullcontext)
        self._plain_windows = False  # set by fit: whether a window end does anything more

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
        out = self._default_step(batch)
        if self._train_sums is not None:  # train_metrics need the outputs too
            return out
        return out["loss"]  # type: ignore[no-any-return]

    def eval_step(self, batch: Any) -> torch.Tensor | Mapping[str, Any]:
        """Compute one evaluation batch's loss and outputs; same return as :meth:`train_step`.

        Under DDP, run ``self.module`` (as the default does), not the DDP wrapper: ranks
        may see different numbers of batches, and DDP's forward talks to the others.
        """
        return self._default_step(batch, self._compiled.eval)  # self.module, compiled

    def predict_step(self, batch: Any) -> torch.Tensor:
        """Return the model's outputs for one batch (its inputs, or the whole batch)."""
        return self._compiled.eval(batch_inputs(batch))  # type: ignore[no-any-return]

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
            epochs: int, resume: str | Path | None = None,
            max_steps: int | None = None) -> History:
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
                        on_optimizer_step; if it set should_stop (TimeLimit) or
                        max_steps is reached: save, return (a planned stop; under DDP
                        TimeLimit's at the next cross-rank check, every 64 steps);
                        checkpoint every checkpoint_every steps, and on SIGTERM/SIGINT:
                        save, then raise SystemExit / KeyboardInterrupt
                accumulator.flush()                  # the epoch's partial window, as above
                evaluate(val_data) (averaged weights of ModelEMA/SWA(evaluate=True)),
                    then on_validation_end
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
            max_steps: Also end after this many optimizer steps in total (a planned
                stop at that step: saved first when there is a ``checkpoint``).

        Returns:
            The :class:`History`, one record per epoch.

        Raises:
            ValueError: If ``epochs`` is not a positive int, ``resume`` needs a
                ``checkpoint`` manager that is missing, the model has no trainable
                parameters, ``train_data`` yields no batches or a batch has 0 samples.
            TypeError: If ``resume`` is not a str, a path or None.
            FloatingPointError: On a nan/inf loss with ``nonfinite="raise"``, or weights
                made nan/inf by a nan/inf gradient (found with the bulk loss check, so
                before any checkpoint is written).
        """
        self._max_steps = check_fit(epochs=epochs, resume=resume, max_steps=max_steps,
                                    model=self.model)
        if resume is not None:
            _resume.restore(self, resume)
        seed = 0 if self.seed is None else self.seed
        sharded = ddp.shard(train_data, train=True, seed=seed)
        # A DistributedSampler gives every rank the same count per batch: the weights
        # need no all-reduce of their own.
        self.accumulator.global_weights = sharded is train_data
        train_data = sharded
        val_data = val_data if self._sharded else ddp.shard(val_data, train=False, seed=seed)
        self._graph_pending = graph_on_fit(self.logger)
        self._plain_windows = plain_windows(self)
        self._stops.forget_plan()  # a planned stop belongs to the fit that made it
        self._call("on_fit_start")
        try:
            with self._stops.installed(), compile_errors(self._compiled.option):
                while self.epoch < epochs and not self.should_stop \
                        and not _recipes.budget_spent(self):
                    self._run_epoch(train_data, val_data, epochs)
        except _recipes.PlannedStop:
            pass  # TimeLimit or max_steps, at an optimizer-step boundary: already saved
        except BaseException as error:
            self._call("on_exception", error)
            raise
        if self.should_stop:
            _log.info("stopped early after epoch %d: %s", self.epoch, self.stop_reason)
        if self.checkpoint is not None:
            self.checkpoint.wait()  # an async_save in flight is on disk when fit returns
        log_run(self, epochs)  # hyper-parameters and final metrics, flushed
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
        ddp.rewrap_if_thawed(self)  # UnfreezeSchedule: DDP reduces what trained when built
        self.model.train()
        total = len(train_data) if isinstance(train_data, Sized) else None
        if not start:
            self._step_log.open_epoch()
            if self._train_sums is not None:
                self._train_sums.open()
        trained = self.batch_idx
        # The epoch number is History's and the checkpoint's (from 0); then the progress.
        with ProgressBar(total, desc=f"epoch {self.epoch} ({self.epoch + 1}/{epochs})",
                         enabled=self.progress and is_main_process()) as bar:
            running = self._ledger.running  # bound once, not once per batch
            ddp.set_epoch(train_data, self.epoch)
            for batch in self._resume_point.skip(iter(train_data), start, bar):
                self._train_batch(batch)
                bar.update(1, running)
            if self.batch_idx == trained == 0:
                raise ValueError(
                    f"train_data yielded no batches in epoch {self.epoch}: it is empty (an "
                    "empty dataset, or drop_last=True with fewer samples than batch_size), "
                    "so nothing would be trained"
                )
            if self.accumulator.micro_step:
                self._end_window(self.accumulator.flush())  # the epoch's partial window
            self._check_losses()
            train_loss = self._ledger.close_epoch()  # over all ranks
            metrics: dict[str, Any] = {} if train_loss is None else {"train_loss": train_loss}
            if self._train_sums is not None:
                metrics.update(self._train_sums.results())  # train_<name>, over all ranks
            metrics.update(self._validate(val_data))
            metrics["lr"] = float(lr)
            self._step_scheduler(metrics)
            bar.set_metrics(metrics)
        self.history.append({"epoch": self.epoch, **metrics})
        if self.logger is not None and is_main_process():
            self.logger.log_metrics(scalars(metrics), step=self.epoch)
        self._call("on_epoch_end", metrics)
        self._sync_stops()  # every rank stops together, whoever decided
        self.epoch += 1
        self.batch_idx = 0
        self._save(metrics)
        if self._stops.signum is not None:  # it came during validation: the epoch is saved
            self._stop_on_signal(save=False)

    def _train_batch(self, batch: Any) -> None:
        # The hot path: every line here runs once per batch, so hooks nobody overrides
        # are skipped and the default step's plain loss tensor takes the short way.
        hooks = self._hooks  # called here, not through _call: one frame less per hook
        trainer: TrainerView = self  # as in _call: mypy checks what hooks may read
        for callback in hooks["on_train_batch_start"]:
            callback.on_train_batch_start(trainer, batch, self.batch_idx)
        batch = to_device(batch, self.device)
        if self._graph_pending:
            self._graph_pending = False
            log_graph(self.logger, self.model, batch)
        accumulator = self.accumulator
        if self._plain_forward:  # no DDP/FSDP context, no autocast: nothing to enter
            out = self.train_step(batch)
        else:
            with accumulator.accumulate(), self._autocast():
                out = self.train_step(batch)
        if isinstance(out, torch.Tensor):
            loss, size = out, batch_size(batch)
        else:
            loss, outputs, targets, size = unpack_step(out, batch)
            if self._train_sums is not None:
                self._train_sums.add(outputs, targets, size)
        if not size:
            check_not_empty(batch, self.epoch, self.batch_idx)
        stepped = accumulator.backward(loss, batch_size=size or None)
        self._ledger.add(loss.detach(), size, self.batch_idx, accumulator.num_steps)
        self.batch_idx += 1
        for callback in hooks["on_train_batch_end"]:
            callback.on_train_batch_end(trainer, batch, self.batch_idx - 1)
        if accumulator.micro_step == 0:
            self._end_window(stepped)

    def _end_window(self, stepped: bool) -> None:
        """After an optimizer step (or a skipped one): bookkeeping, scheduler, saves, signals."""
        ledger = self._ledger
        ledger.end_window(stepped, epoch=self.epoch, batch_idx=self.batch_idx - 1,
                          step=self.accumulator.num_steps)
        if self._plain_windows:  # (see fit) only the bulk loss check and signals can act
            if ledger.due():
                self._sync_stops()
            if self._stops.ready():
                self._stop_on_signal()
            return
        if self._step_log.every and self._step_log.due(self.global_step):
            self._step_log.log(self)
        if stepped and self.scheduler is not None:
            self._step_scheduler(None)
        _recipes.plan_stop(self)  # on_optimizer_step (TimeLimit) and max_steps, this rank
        # Under DDP at fixed steps, so ranks agree; alone, when a bulk loss check is due.
        if self.global_step % SYNC_EVERY == 0 if self._world > 1 else ledger.due():
            self._sync_stops()
        if self._stops.plan_ready() and not self._stops.ready():
            _recipes.planned_stop(self)  # on every rank at this step
        every = self.checkpoint_every
        if every and self.global_step % every == 0:
            self._save(None)
        if self._stops.ready():
            self._stop_on_signal()

    def _check_losses(self) -> None:
        """Fold the pending losses; raise if one was nan/inf (when checked in bulk)."""
        self._ledger.fold()  # on every rank, at fixed points, so the sums are exact
        if self._ledger.checks_in_bulk:
            self._sync_stops(weights=True)

    def _sync_stops(self, *, weights: bool = False) -> None:
        """The one cross-rank stop check (``_stops.sync_stops``): stop, signal, nan loss."""
        sync_stops(self, weights=weights)

    def _validate(self, val_data: Iterable[Any] | None) -> dict[str, Any]:
        """Evaluate ``val_data`` (if given), then call ``on_validation_end``."""
        if val_data is None:
            return {}
        with _recipes.averaged_weights(self):
            metrics = self.evaluate(val_data)
        self._call("on_validation_end", metrics)
        return metrics

    def _step_scheduler(self, metrics: Mapping[str, float] | None) -> None:
        """The scheduler rule (``_scheduler``): after an optimizer step or an epoch."""
        step_scheduler(self.scheduler, metrics, interval=self.scheduler_interval,
                       monitor=self.scheduler_monitor)

    # -- evaluate and predict -------------------------------------------------------------

    def evaluate(self, data: Iterable[Any], *, prefix: str = "val") -> dict[str, Any]:
        """Return the sample-weighted mean loss and every metric over ``data``.

        Args:
            data: A DataLoader or any iterable of batches.
            prefix: The key prefix: ``val_loss``, ``val_acc``, ... by default.

        Returns:
            ``{f"{prefix}_loss": ..., f"{prefix}_<metric>": ...}`` as Python floats; a
            metric whose value is a larger tensor (``tk.ConfusionMatrix``) is reported
            under its own name as that tensor, on the CPU (never dropped; loggers get
            the scalars).

        Raises:
            ValueError: If ``data`` has no samples or ``prefix`` is empty.
            TypeError: If ``prefix`` is not a str, a metric computes something that is
                not a number or tensor, or (under a process group) a stateful metric
                cannot be reduced over ranks (see :func:`~torchkit.Metric`).

        Under a process group every rank evaluates its share of a DataLoader (each sample
        exactly once, no padding) and the sums are reduced, so the results equal a single
        process's; objects with ``update/compute/reset`` are reduced over ranks before
        ``compute`` through their ``all_reduce()`` (``tk.ConfusionMatrix`` has one, so its
        ``precision()``/``recall()``/``f1()`` cover all ranks too), or synchronise
        themselves (torchmetrics).
        """
        return _evaluation.evaluate(self, data, prefix)

    def predict(self, data: Iterable[Any]) -> torch.Tensor:
        """Return :meth:`predict_step`'s outputs for every batch, concatenated in order.

        The model runs in eval mode under the trainer's precision; outputs are moved to
        the CPU batch by batch so large predictions do not fill the GPU. Outputs of a
        lower precision (``precision="bf16"``/``"16"``) come back as float32. A bare
        tensor is one batch of inputs (``predict(x)`` is ``predict([x])``), never
        iterated row by row.

        Raises:
            ValueError: If ``data`` yields no batches.
            TypeError: If ``data`` is not a tensor or an iterable of batches.
        """
        return _evaluation.predict(self, data)

    # -- helpers ------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.precision, self.device)

    def _call(self, hook: str, *args: Any) -> None:
        trainer: TrainerView = self  # mypy checks that hooks get all they may read
        for callback in self._hooks[hook]:
            getattr(callback, hook)(trainer, *args)

    # -- checkpoints, resume and signals ---------------------------------------------------

    def _save(self, metrics: Mapping[str, float] | None) -> None:
        """Checkpoint the full training state (``_resume.save``), on every rank's behalf."""
        _resume.save(self, metrics)

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
        return _resume.trainer_state(self)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (or what torchkit 0.1.0 saved).

        Raises:
            ValueError: If the number of callbacks differs from the saved run.
        """
        _resume.load_trainer_state(self, state_dict)
