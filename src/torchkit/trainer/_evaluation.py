"""Private: Trainer.evaluate and predict: the loops, the sums they keep, step outputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from torchkit._batches import batch_size, to_device
from torchkit.distributed import get_world_size
from torchkit.trainer import _distributed as ddp
from torchkit.trainer._compile import compile_errors
from torchkit.trainer._ledger import SUM_DTYPE

__all__ = ["EvalSums", "evaluate", "predict", "reduce_metric", "scalars", "unpack_step"]


@torch.no_grad()
def evaluate(trainer: Any, data: Iterable[Any], prefix: str) -> dict[str, Any]:
    """``Trainer.evaluate``: eval mode, the trainer's precision, sums reduced over ranks."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str such as 'val' or 'test', got {prefix!r}")
    if not prefix:
        raise ValueError("prefix must be a non-empty str such as 'val' or 'test', got ''")
    if not trainer._sharded:  # a sharded model's forward is a collective: all see all
        data = ddp.shard(data, train=False, seed=0)
    model, device = trainer.model, trainer.device
    was_training = model.training
    model.eval()
    sums = EvalSums(trainer.metrics, device)
    try:
        with compile_errors(trainer._compiled.option):
            for batch in data:
                batch = to_device(batch, device)
                with trainer._autocast():
                    out = trainer.eval_step(batch)
                sums.add(*unpack_step(out, batch))
    finally:
        model.train(was_training)
    return sums.results(prefix)


@torch.no_grad()
def predict(trainer: Any, data: Iterable[Any] | torch.Tensor) -> torch.Tensor:
    """``Trainer.predict``: every batch's outputs, moved to the CPU as they come, in order."""
    if isinstance(data, torch.Tensor):
        data = [data]  # one batch: iterating a tensor would make each row a batch
    elif isinstance(data, str | bytes) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a DataLoader, an iterable of batches or a tensor, "
                        f"got {type(data).__name__}")
    model, device = trainer.model, trainer.device
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in data:
            with trainer._autocast(), compile_errors(trainer._compiled.option):
                out = trainer.predict_step(to_device(batch, device))
            out = out.detach().to("cpu")
            if out.dtype in (torch.bfloat16, torch.float16) and trainer.precision != "32":
                out = out.float()  # autocast's dtype is not the user's
            outputs.append(out)
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError("predict() got no batches: the data is empty")
    return torch.cat(outputs)


def unpack_step(out: Any, batch: Any) -> tuple[Any, Any, Any, int]:
    """Split what a step returned into ``(loss, outputs, targets, batch size)``.

    Example:
        >>> loss, outputs, targets, size = unpack_step(torch.tensor(0.5), torch.ones(4, 2))
        >>> loss, outputs, size
        (tensor(0.5000), None, 4)
    """
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


class EvalSums:
    """Sample-weighted sums of the loss and the metrics over one evaluation, on the device.

    Callable metrics are summed here; objects with ``update/compute/reset`` are reset at
    the start and computed at the end. :meth:`results` reduces the sums over ranks in
    one collective and reads them on the host once.

    Example:
        >>> sums = EvalSums({}, torch.device("cpu"))
        >>> sums.add(torch.tensor(1.0), None, None, 3)
        >>> sums.add(torch.tensor(3.0), None, None, 1)
        >>> sums.results("val")
        {'val_loss': 1.5}
    """

    def __init__(self, metrics: Mapping[str, Any], device: torch.device) -> None:
        self.metrics = metrics
        self.device = device
        self.loss = torch.zeros((), dtype=SUM_DTYPE, device=device)
        self.sums = {name: torch.zeros_like(self.loss) for name, m in metrics.items()
                     if not hasattr(m, "update")}
        for metric in metrics.values():
            if hasattr(metric, "reset"):
                metric.reset()
        self.count, self.has_loss = 0, False

    def add(self, loss: torch.Tensor | None, outputs: Any, targets: Any, size: int) -> None:
        """Add one batch: its mean loss (if any), outputs and targets, over ``size`` samples."""
        if loss is not None:
            self.loss.add_(loss.detach(), alpha=size)
            self.has_loss = True
        if self.metrics:
            if outputs is None or targets is None:
                raise ValueError(
                    "metrics need outputs and targets: return a dict with 'outputs' and "
                    "'targets' from eval_step"
                )
            for name, metric in self.metrics.items():
                if name in self.sums:
                    self.sums[name].add_(torch.as_tensor(metric(outputs, targets)).detach(),
                                         alpha=size)
                else:
                    metric.update(outputs, targets)
        self.count += size

    def results(self, prefix: str) -> dict[str, Any]:
        """The means over every rank's samples: ``{f"{prefix}_loss": ..., ...}``.

        Scalars come back as floats; a stateful metric whose value is a larger tensor
        (a :class:`~torchkit.ConfusionMatrix`) as that tensor, on the CPU. Stateful
        metrics are reduced over ranks first (:func:`reduce_metric`).
        """
        names = list(self.sums)
        totals = ddp.all_reduce_sum(torch.stack([
            self.loss, torch.tensor(float(self.count), dtype=SUM_DTYPE, device=self.device),
            torch.tensor(float(self.has_loss), dtype=SUM_DTYPE, device=self.device),
            *[self.sums[name] for name in names],
        ])).tolist()
        count, has_loss = int(totals[1]), totals[2] > 0
        if count == 0:
            raise ValueError("evaluate() got no samples: the data is empty")
        reduced = dict(zip(names, totals[3:]))
        results = {f"{prefix}_loss": totals[0] / count} if has_loss else {}
        for name, metric in self.metrics.items():
            if name in reduced:
                value = reduced[name] / count
            else:
                reduce_metric(name, metric)
                value = metric.compute()
            results[f"{prefix}_{name}"] = _value(name, value)
        return results


def _value(name: str, value: Any) -> Any:
    """A metric's value as a float, or a larger tensor on the CPU; never dropped."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return float(value.item())
        return value.detach().to("cpu")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return float(value.item())
    raise TypeError(
        f"metric {name!r} computed a {type(value).__name__} ({value!r}); a metric must "
        "give a number or a tensor"
    )


def reduce_metric(name: str, metric: Any) -> None:
    """Reduce a stateful metric's state over ranks before ``compute`` (nothing alone).

    A metric reduces itself through its ``all_reduce()`` method (as
    :class:`~torchkit.ConfusionMatrix` does); torchmetrics metrics synchronise in
    ``compute`` themselves. Any other stateful metric under a process group would
    compute on its own rank's share only, so it is refused, naming it.

    Raises:
        TypeError: Under a process group, for a stateful metric that cannot be reduced.

    Example:
        >>> cm = tk.ConfusionMatrix(2)
        >>> reduce_metric("cm", cm)  # one process: nothing to reduce
    """
    if get_world_size() == 1:
        return
    all_reduce = getattr(metric, "all_reduce", None)
    if callable(all_reduce):
        all_reduce()
        return
    if getattr(metric, "sync_on_compute", False):  # torchmetrics syncs in compute()
        return
    raise TypeError(
        f"metric {name!r} ({type(metric).__name__}) has update/compute/reset but no "
        "all_reduce(), so under a process group each rank would compute it on its own "
        "share of the data only; give it an all_reduce() method that sums its state over "
        "ranks (as tk.ConfusionMatrix has), or use a torchmetrics metric"
    )


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (what loggers and the progress bar take).

    Example:
        >>> scalars({"val_loss": 0.5, "val_cm": torch.eye(2)})
        {'val_loss': 0.5}
    """
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}
