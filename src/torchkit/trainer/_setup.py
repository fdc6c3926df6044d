"""Private helpers for Trainer: option checks, device, metric names, hparams, hook dispatch.

Also what ``fit`` decides once per call: its argument checks, whether to log the graph,
whether window ends take the short way, and what is logged at the end of the run.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkit._utils import check_module
from torchkit.callbacks import HOOKS, Callback
from torchkit.checkpoint import CheckpointManager
from torchkit.distributed import is_main_process
from torchkit.trainer._compile import check_compile
from torchkit.trainer._evaluation import scalars
from torchkit.trainer._recipes import check_max_steps
from torchkit.trainer._scheduler import steps_per_optimizer_step

__all__ = [
    "Metric",
    "as_callbacks",
    "autocast",
    "check_fit",
    "check_more_options",
    "check_options",
    "check_precision",
    "check_sharding",
    "graph_on_fit",
    "hook_table",
    "log_run",
    "named_metrics",
    "plain_windows",
    "resolve_device",
    "run_hparams",
]

Metric = Callable[[Any, Any], Any] | Any  # a callable, or an object with update/compute/reset

_LOGGER_METHODS = ("log_metrics", "log_hparams", "flush")  # what fit calls on every logger


def check_options(*, model: Any, optimizer: Any, loss_fn: Any, scheduler: Any,
                  precision: Any, accumulate: Any, max_grad_norm: Any, callbacks: list[Any],
                  logger: Any, progress: Any, checkpoint: Any, checkpoint_every: Any,
                  scheduler_interval: Any, scheduler_monitor: Any,
                  nonfinite: Any, compile: Any = False) -> None:
    """Check every Trainer option, naming each by its own name.

    A wrong ``model``, ``optimizer`` or callback raises ``TypeError`` at once; every
    other problem is collected into one ``ValueError``. ``device``, ``metrics`` and
    ``seed`` are checked where they are used (:func:`resolve_device`,
    :func:`named_metrics`, :func:`~torchkit.seed_everything`), under their own names.
    """
    check_module(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    for i, cb in enumerate(callbacks):
        if not all(callable(getattr(cb, name, None)) for name in ("state_dict",
                                                                  "load_state_dict")):
            raise TypeError(
                f"callbacks[{i}] ({type(cb).__name__}) is not a callback: subclass "
                "torchkit.Callback"
            )
    errors = []
    if loss_fn is not None and not callable(loss_fn):
        errors.append(f"loss_fn must be a callable loss_fn(outputs, targets) or None, "
                      f"got {loss_fn!r}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        errors.append(f"scheduler must be an LR scheduler (with step()) or None, got "
                      f"{scheduler!r}")
    if precision not in ("32", "bf16", "16"):
        errors.append(f"precision must be '32', 'bf16' or '16', got {precision!r}")
    if not _is_int(accumulate) or accumulate < 1:
        errors.append(f"accumulate must be an int >= 1, got {accumulate!r}")
    if max_grad_norm is not None and not (
        isinstance(max_grad_norm, numbers.Real) and not isinstance(max_grad_norm, bool)
        and float(max_grad_norm) > 0
    ):
        errors.append(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    if logger is not None and not all(callable(getattr(logger, m, None))
                                      for m in _LOGGER_METHODS):
        errors.append(f"logger must be a torchkit Logger (with {', '.join(_LOGGER_METHODS)}) "
                      f"or None, got {logger!r}")
    if not isinstance(progress, bool):
        errors.append(f"progress must be True or False, got {progress!r}")
    compile_error = check_compile(compile)
    if compile_error is not None:
        errors.append(compile_error)
    if checkpoint is not None and not isinstance(checkpoint, CheckpointManager):
        errors.append(f"checkpoint must be a CheckpointManager or None, got {checkpoint!r}")
    if checkpoint_every is not None and (not _is_int(checkpoint_every) or checkpoint_every < 1):
        errors.append(f"checkpoint_every must be an int >= 1 or None, got {checkpoint_every!r}")
    if checkpoint_every is not None and checkpoint is None:
        errors.append("checkpoint_every needs checkpoint=CheckpointManager(...)")
    if scheduler_interval not in ("epoch", "step"):
        errors.append(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
    if not isinstance(scheduler_monitor, str) or not scheduler_monitor:
        errors.append(f"scheduler_monitor must be a metric name (a non-empty str), got "
                      f"{scheduler_monitor!r}")
    if nonfinite not in ("raise", "skip"):
        errors.append(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    if errors:
        raise ValueError("; ".join(errors))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_HPARAM_TYPES = (bool, int, float, str)


def check_more_options(*, clip_value: Any, train_metrics: Any, log_every_n_steps: Any,
                       hparams: Any, logger: Any) -> None:
    """Check ``clip_value``, ``train_metrics``, ``log_every_n_steps`` and ``hparams``.

    Each by its own name, collected into one ``ValueError`` (``train_metrics`` entries
    are checked by :func:`named_metrics`, as ``metrics`` are).

    Example:
        >>> check_more_options(clip_value=None, train_metrics=None, log_every_n_steps=0,
        ...                    hparams=None, logger=None)
        Traceback (most recent call last):
        ValueError: log_every_n_steps must be an int >= 1 or None, got 0
    """
    errors = []
    if clip_value is not None and not (
        isinstance(clip_value, numbers.Real) and not isinstance(clip_value, bool)
        and float(clip_value) > 0
    ):
        errors.append(f"clip_value must be a positive number or None, got {clip_value!r}")
    if log_every_n_steps is not None and (not _is_int(log_every_n_steps)
                                          or log_every_n_steps < 1):
        errors.append(f"log_every_n_steps must be an int >= 1 or None, got "
                      f"{log_every_n_steps!r}")
    if hparams is not None:
        if not isinstance(hparams, Mapping):
            errors.append(f"hparams must be a dict of name -> bool/int/float/str or None, "
                          f"got {type(hparams).__name__}")
        else:
            for key, value in hparams.items():
                if not isinstance(key, str) or not key:
                    errors.append(f"hparams keys must be non-empty strings, got {key!r}")
                elif not isinstance(value, _HPARAM_TYPES) and value is not None:
                    errors.append(f"hparams[{key!r}] must be a bool, int, float, str or "
                                  f"None, got {type(value).__name__}")
    if train_metrics is not None and (not isinstance(train_metrics, Mapping | Sequence)
                                      or isinstance(train_metrics, str)):
        errors.append(f"train_metrics must be a dict of name -> metric, a sequence of "
                      f"metrics or None, got {type(train_metrics).__name__}")
    if errors:
        raise ValueError("; ".join(errors))


def as_callbacks(callbacks: Any) -> list[Any]:
    """``Trainer(callbacks=...)`` as a list, or a ``TypeError`` naming the option.

    Example:
        >>> as_callbacks(3)
        Traceback (most recent call last):
        TypeError: callbacks must be an iterable of torchkit.Callback objects, got int
    """
    if isinstance(callbacks, Callback) or (hasattr(callbacks, "on_epoch_end")
                                           and hasattr(callbacks, "state_dict")):
        raise TypeError(f"callbacks must be an iterable of torchkit.Callback objects, got "
                        f"one {type(callbacks).__name__}; wrap it in a list: callbacks=[...]")
    if isinstance(callbacks, str | bytes | Mapping) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be an iterable of torchkit.Callback objects, got "
                        f"{type(callbacks).__name__}")
    return list(callbacks)


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn ``"auto"`` into CUDA, then MPS, then CPU; pass any other device through."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto' or a torch device, got {device!r}") from None


def named_metrics(metrics: Mapping[str, Metric] | Sequence[Metric] | None, *,
                  option: str = "metrics") -> dict[str, Any]:
    """Give every metric a name: mapping keys, or the callables' ``__name__``.

    ``option`` is the Trainer option the metrics came from, named in errors.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) and (
        callable(metrics) or hasattr(metrics, "update") or isinstance(metrics, str)
        or not isinstance(metrics, Sequence)
    ):
        raise TypeError(
            f"{option} must be a dict of name -> metric (e.g. {{'acc': tk.accuracy}}), a "
            f"list of metrics or None, got {type(metrics).__name__}"
            + ("; wrap it: {'name': metric}" if callable(metrics) or hasattr(metrics, "update")
               else "")
        )
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        items = [(getattr(m, "__name__", type(m).__name__.lower()), m) for m in metrics]
    named = {}
    for name, metric in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{option} names must be non-empty strings, got {name!r}")
        stateful = all(callable(getattr(metric, a, None)) for a in ("update", "compute", "reset"))
        if not stateful and not callable(metric):
            raise TypeError(
                f"{'metric' if option == 'metrics' else option + ' entry'} {name!r} must be "
                f"a callable fn(outputs, targets) or have "
                f"update/compute/reset, got {type(metric).__name__}"
            )
        if name in named:
            raise ValueError(f"two {option} are named {name!r}; pass a dict to name them")
        named[name] = metric
    return named


def run_hparams(trainer: Any, epochs: int) -> dict[str, Any]:
    """The hyper-parameters ``fit`` hands the logger at its end."""
    group = trainer.optimizer.param_groups[0]
    hparams: dict[str, Any] = {
        "model": type(trainer.model).__name__, "optimizer": type(trainer.optimizer).__name__,
        "epochs": epochs, "precision": trainer.precision,
        "accumulate": trainer.accumulator.steps,
        "max_grad_norm": trainer.accumulator.max_norm or 0.0,
    }
    for key in ("lr", "weight_decay", "momentum"):
        if isinstance(group.get(key), int | float):
            hparams[key] = group["initial_lr"] if key == "lr" and "initial_lr" in group \
                else group[key]
    if trainer.accumulator.clip_value is not None:
        hparams["clip_value"] = trainer.accumulator.clip_value
    hparams.update(getattr(trainer, "hparams", None) or {})  # the user's, merged last
    return hparams


def hook_table(callbacks: Sequence[Any]) -> dict[str, list[Any]]:
    """For each hook of :class:`~torchkit.Callback`, the callbacks that do something in it."""
    return {name: [cb for cb in callbacks if overrides(cb, name)] for name in HOOKS}


def overrides(callback: Any, hook: str) -> bool:
    """Whether ``callback`` does something in ``hook`` (so the loop can skip no-op calls)."""
    method = getattr(type(callback), hook, None)
    if method is None:
        return False
    return not isinstance(callback, Callback) or method is not getattr(Callback, hook)


def check_fit(*, epochs: Any, resume: Any, max_steps: object, model: nn.Module) -> int | None:
    """Check ``fit``'s arguments, each under its own name; return ``max_steps``."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    max_steps = check_max_steps(max_steps)
    if resume is not None and not isinstance(resume, str | Path):
        raise TypeError(f"resume must be 'latest', 'best', a checkpoint path or None, got "
                        f"{type(resume).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameters (none has requires_grad=True), so "
            "fit cannot train it: unfreeze some (tk.unfreeze) or only evaluate/predict"
        )
    return max_steps


def graph_on_fit(logger: Any) -> bool:
    """Whether ``fit`` logs the model graph: only a logger that asks for it does.

    (``TensorBoardLogger(log_graph=True)``; an explicit ``logger.log_graph`` call always
    writes, so calling it is the decision.)
    """
    return logger is not None and is_main_process() and bool(
        getattr(logger, "graph_on_fit", False))


def plain_windows(trainer: Any) -> bool:
    """Whether a window end needs only the ledger, the bulk check and signals.

    True without a step log, a per-step scheduler, an ``on_optimizer_step`` hook, a step
    budget, step checkpoints and other ranks: the trainer then skips the rest per step.
    """
    return trainer._world == 1 and not (
        trainer._step_log.every or trainer._hooks["on_optimizer_step"]
        or trainer.checkpoint_every or trainer._max_steps is not None
        or steps_per_optimizer_step(trainer.scheduler, trainer.scheduler_interval))


def log_run(trainer: Any, epochs: int) -> None:
    """At the end of ``fit`` (rank 0): the run's hyper-parameters and final metrics."""
    logger, records = trainer.logger, trainer.history.records
    if logger is None or not is_main_process() or not records:
        return
    final = {k: float(v) for k, v in scalars(records[-1]).items() if k not in ("epoch", "lr")}
    logger.log_hparams(run_hparams(trainer, epochs), final)
    logger.flush()


_NOTHING = contextlib.nullcontext()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The forward's context for ``precision``: nothing for ``"32"``, else ``torch.autocast``."""
    if precision == "32":
        return _NOTHING
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def check_precision(precision: str, device: torch.device) -> None:
    """``precision="16"`` needs CUDA (float16 with a GradScaler); say what to use instead."""
    if precision == "16" and device.type != "cuda":
        raise ValueError(
            f"precision='16' needs a CUDA device (float16 with a GradScaler), but the "
            f"device is {device}; use precision='bf16' on CPU"
        )


def check_sharding(*, parallelize: Any, mesh: Any, checkpoint: Any) -> None:
    """Check ``parallelize`` and ``mesh`` (issue 15's options), each under its own name."""
    if parallelize is not None and not callable(parallelize):
        raise TypeError(f"parallelize must be a callable parallelize(model, mesh) -> model "
                        f"or None, got {parallelize!r}")
    if mesh is not None:
        if parallelize is None:
            raise ValueError("mesh= is handed to parallelize; pass parallelize= too")
        if type(mesh).__name__ != "DeviceMesh":
            raise TypeError(f"mesh must be a torch.distributed DeviceMesh or None, got "
                            f"{type(mesh).__name__}")
    if parallelize is not None and isinstance(checkpoint, CheckpointManager) \
            and checkpoint.format == "file":
        raise ValueError("parallelize= shards the model, which a single file cannot hold: "
                         "use checkpoint=CheckpointManager(..., format='dcp' or 'auto')")
