"""What quantization gained: serialized size, CPU latency and accuracy, float vs int8."""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchkit._utils import check_module
from torchkit.quantization._backend import batch_input

__all__ = ["model_size", "quantization_report"]


def model_size(model: nn.Module) -> int:
    """Return the size in bytes of ``model``'s serialized ``state_dict``.

    This is what a checkpoint of the weights takes on disk (``torch.save``). A
    ``torch.compile`` wrapper is looked through.

    Args:
        model: Any module, float or quantized.

    Returns:
        The number of bytes.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.

    Example:
        >>> tk.model_size(nn.Linear(1000, 1000)) > 4_000_000  # one million float32 weights
        True
    """
    check_module(model)
    model = getattr(model, "_orig_mod", model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def quantization_report(
    float_model: nn.Module,
    quantized_model: nn.Module,
    data: Iterable[Any] | None = None,
    *,
    example_input: torch.Tensor | None = None,
    num_repeats: int = 20,
) -> dict[str, float]:
    """Compare a float model and its quantized copy: size, CPU latency and accuracy.

    Latency is the median over ``num_repeats`` calls of each model, interleaved (the
    order alternates) so that a slow moment of the machine hits both alike, after one
    warm-up call each (which also compiles a pt2e model), under ``torch.no_grad()`` in
    eval mode, with the current ``torch.get_num_threads()``. Accuracy is top-1 over
    ``data``; models are put in eval mode for the measurement and restored after.

    Args:
        float_model: The float model, on CPU.
        quantized_model: Its quantized copy.
        data: Optional batches of ``(inputs, targets)`` (or dicts with ``"inputs"`` and
            ``"targets"``) for accuracy; its first batch's inputs time the models.
        example_input: The input to time the models on, instead of ``data``'s first batch.
        num_repeats: Timed calls per model.

    Returns:
        ``float_bytes``, ``quantized_bytes`` and ``size_ratio`` (quantized / float);
        with an input, ``float_latency_ms``, ``quantized_latency_ms`` and
        ``latency_ratio`` (below 1: int8 is faster); with ``data``,
        ``float_accuracy``, ``quantized_accuracy`` (fractions) and ``accuracy_change``
        (quantized - float; -0.01 is one percentage point lost).

    Raises:
        TypeError: If a model is not a module, or a batch has no inputs/targets.
        ValueError: If ``num_repeats`` is not positive, ``data`` is empty, or the float
            model is not on CPU.

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        >>> qmodel = tk.quantize_dynamic(model, backend="eager")
        >>> data = [(torch.randn(8, 256), torch.randint(0, 256, (8,)))]
        >>> report = tk.quantization_report(model, qmodel, data, num_repeats=3)
        >>> sorted(report)  # doctest: +NORMALIZE_WHITESPACE
        ['accuracy_change', 'float_accuracy', 'float_bytes', 'float_latency_ms',
         'latency_ratio', 'quantized_accuracy', 'quantized_bytes', 'quantized_latency_ms',
         'size_ratio']
        >>> report["size_ratio"] < 0.35
        True
    """
    check_module(float_model, arg="float_model")
    check_module(quantized_model, arg="quantized_model")
    if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive int, got {num_repeats!r}")
    devices = {p.device.type for p in float_model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(
            f"quantization_report measures on CPU, but float_model is on {sorted(devices)}; "
            "pass a CPU copy: copy.deepcopy(model).cpu()"
        )
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    batches = None if data is None else list(data)
    if batches is not None and not batches:
        raise ValueError("data yielded no batches; pass at least one (inputs, targets) batch")
    report = {"float_bytes": float(model_size(float_model)),
              "quantized_bytes": float(model_size(quantized_model))}
    report["size_ratio"] = report["quantized_bytes"] / report["float_bytes"]
    x = example_input if example_input is not None or not batches else batch_input(batches[0])
    with _eval(float_model), _eval(quantized_model), torch.no_grad():
        if x is not None:
            fp32, int8 = _interleaved(float_model, quantized_model, x, num_repeats)
            report.update(float_latency_ms=fp32 * 1e3, quantized_latency_ms=int8 * 1e3,
                          latency_ratio=int8 / fp32)
        if batches is not None:
            report["float_accuracy"] = _accuracy(float_model, batches)
            report["quantized_accuracy"] = _accuracy(quantized_model, batches)
            report["accuracy_change"] = report["quantized_accuracy"] - report["float_accuracy"]
    return report


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _interleaved(
    a: Callable[[torch.Tensor], Any], b: Callable[[torch.Tensor], Any], x: torch.Tensor,
    repeats: int,
) -> tuple[float, float]:
    a(x), b(x)  # warm-up (and compilation)
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(repeats):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            fn = a if which == 0 else b
            start = time.perf_counter()
            fn(x)
            times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _accuracy(model: nn.Module, batches: list[Any]) -> float:
    correct = total = 0
    for batch in batches:
        inputs, targets = batch_input(batch), _targets(batch)
        correct += int((model(inputs).argmax(dim=-1) == targets).sum())
        total += targets.numel()
    return correct / total


def _targets(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, Mapping) and isinstance(batch.get("targets"), torch.Tensor):
        return batch["targets"]  # type: ignore[no-any-return]
    raise TypeError(
        "accuracy needs batches of (inputs, targets) or dicts with 'inputs' and 'targets'; "
        f"got a {type(batch).__name__}"
    )
