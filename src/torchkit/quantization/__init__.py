"""Int8 quantization helpers: dynamic, static (post-training) and quantization-aware training.

Every function returns a **new** model and leaves the float model untouched. Two
backends do the work: ``"eager"`` (``torch.ao.quantization`` eager mode: fast on CPU
without compiling, covers LSTM/GRU; deprecated upstream) and ``"pt2e"`` (torchao's
``torch.export`` flow with the x86 inductor quantizer; ``pip install "torchkit[torchao]"``).
``backend="auto"`` picks eager while torch ships it and pt2e otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, cast

import torch
from torch import nn

from torchkit._utils import check_module
from torchkit.quantization import _backend
from torchkit.quantization._backend import Backend, Engine
from torchkit.quantization._report import model_size, quantization_report

__all__ = [
    "convert_qat",
    "model_size",
    "prepare_qat",
    "quantization_report",
    "quantize_dynamic",
    "quantize_static",
]

Fuse = Literal["auto", "none"]
_STATIC_KINDS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def quantize_dynamic(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.qint8,
    modules: Sequence[type[nn.Module]] = (nn.Linear, nn.LSTM, nn.GRU),
    backend: Backend = "auto",
    example_input: torch.Tensor | None = None,
    compile: bool | None = None,
) -> nn.Module:
    """Return a copy of ``model`` whose ``modules`` compute with int8 weights.

    Weights are quantized ahead of time; activations are quantized on the fly at each
    call, so no calibration data is needed. Best for Linear/LSTM-heavy models on CPU.
    Small layers get slower, not faster: a ``UserWarning`` says so when every quantized
    layer is an ``nn.Linear`` with fewer than 65,536 weights.

    Args:
        model: The float model; it is not changed.
        dtype: ``torch.qint8``, or ``torch.float16`` (eager backend only).
        modules: The layer types to quantize. The pt2e backend quantizes only
            ``nn.Linear`` dynamically.
        backend: ``"eager"``, ``"pt2e"`` or ``"auto"`` (eager while torch ships it).
        example_input: A batch of inputs. pt2e needs it to trace the model; eager runs
            the quantized copy on it to check that it works.
        compile: pt2e only: compile the int8 graph with inductor on first call (the
            default for pt2e; without it the graph runs slower than fp32).

    Returns:
        The quantized copy, for inference on CPU.

    Raises:
        TypeError: If ``model`` is not a module or ``modules`` not layer types.
        ValueError: If ``dtype``, ``modules`` or ``compile`` do not suit the backend,
            or pt2e gets no ``example_input``.
        ImportError: If the backend asked for is not installed.

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        >>> qmodel = tk.quantize_dynamic(model, backend="eager")
        >>> type(qmodel[0]).__name__, type(model[0]).__name__
        ('Linear', 'Linear')
        >>> qmodel[0].weight().dtype
        torch.qint8
        >>> tk.model_size(qmodel) < 0.35 * tk.model_size(model)
        True
    """
    check_module(model)
    kinds = _check_modules(modules)
    if dtype not in (torch.qint8, torch.float16):
        raise ValueError(f"dtype must be torch.qint8 or torch.float16, got {dtype!r}")
    chosen = _resolve(backend, compile, example_input, needs_example=True)
    if chosen == "pt2e":
        _check_pt2e_dynamic(model, kinds, dtype)
    if dtype == torch.qint8:
        _backend.warn_if_linears_too_small(model, kinds)
    if chosen == "pt2e":
        from torchkit.quantization import _pt2e

        example = cast(torch.Tensor, example_input)  # _resolve checked it is given
        return _pt2e.quantize_dynamic(model, example, compile=compile is not False)
    from torchkit.quantization import _eager

    quantized = _eager.quantize_dynamic(model, dtype=dtype, modules=kinds)
    if example_input is not None:
        _eager._check_runs(quantized, example_input.cpu())
    return quantized


def quantize_static(
    model: nn.Module,
    calibration_data: Iterable[Any],
    *,
    backend: Backend = "auto",
    engine: Engine = "x86",
    fuse: Fuse = "auto",
    num_batches: int | None = None,
    compile: bool | None = None,
) -> nn.Module:
    """Return an int8 copy of ``model`` calibrated on ``calibration_data``.

    Weights and activations are int8; activation ranges are observed on the calibration
    batches. The model needs no ``QuantStub`` edits: torchkit wraps it. With
    ``fuse="auto"`` (eager) it traces the model to find conv-bn(-relu), conv-relu,
    linear-relu and linear-bn runs and fuses them (no BatchNorm is left after a conv),
    and routes tensor ``+``, ``*`` and ``torch.cat`` through quantized ops, so residual
    networks work. pt2e folds BatchNorm and fuses activations itself.

    Args:
        model: The float model; it is not changed.
        calibration_data: An iterable of batches (a ``DataLoader`` or a list), each an
            input tensor, a tuple/list whose first element is the input, or a dict with
            an ``"inputs"`` entry. A few hundred samples are usually enough.
        backend: ``"eager"``, ``"pt2e"`` or ``"auto"`` (eager while torch ships it).
        engine: The quantized kernel library (eager); set only during this call.
            pt2e supports ``"x86"`` only.
        fuse: ``"auto"`` or ``"none"`` (eager only; pt2e always folds BatchNorm).
        num_batches: Calibrate on at most this many batches (all when ``None``).
        compile: pt2e only: compile the int8 graph with inductor on first call (default).

    Returns:
        The quantized copy, for inference on CPU.

    Raises:
        TypeError: If ``model`` is not a module or a batch has no input tensor.
        ValueError: If an option is invalid or ``calibration_data`` is empty.
        ImportError: If the backend asked for is not installed.
        RuntimeError: If the model cannot be quantized by the backend (the message
            says why and what to try instead).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        ...                       nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
        >>> batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
        >>> qmodel = tk.quantize_static(model, batches, backend="eager")
        >>> [type(m).__name__ for m in qmodel.module.children()]
        ['ConvReLU2d', 'Identity', 'Identity', 'Flatten', 'Linear']
        >>> qmodel(batches[0]).shape
        torch.Size([4, 10])
    """
    check_module(model)
    _check_fuse(fuse)
    inputs = _backend.calibration_inputs(calibration_data, num_batches)
    chosen = _resolve(backend, compile, None, needs_example=False)
    _backend.check_engine(engine, chosen)
    if chosen == "pt2e" and fuse != "auto":
        raise ValueError("backend='pt2e' always folds BatchNorm and fuses; use fuse='auto'")
    _backend.warn_if_linears_too_small(model, _STATIC_KINDS)
    if chosen == "pt2e":
        from torchkit.quantization import _pt2e

        return _pt2e.quantize_static(model, inputs, compile=compile is not False)
    from torchkit.quantization import _eager

    return _eager.quantize_static(model, inputs, engine=engine, fuse=fuse)


def prepare_qat(
    model: nn.Module,
    *,
    backend: Backend = "auto",
    engine: Engine = "x86",
    fuse: Fuse = "auto",
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Return a copy of ``model`` with fake quantization, ready for quantization-aware training.

    Train the returned model as usual (a few epochs at a low learning rate, starting
    from trained float weights), then call :func:`convert_qat` to get the int8 model.
    Fusion as in :func:`quantize_static`; BatchNorm keeps training until conversion.

    Args:
        model: The float model; it is not changed.
        backend: ``"eager"``, ``"pt2e"`` or ``"auto"`` (eager while torch ships it).
        engine: The quantized kernel library; pt2e supports ``"x86"`` only.
        fuse: ``"auto"`` or ``"none"`` (eager only).
        example_input: A batch of inputs. pt2e needs it to trace the model; eager uses
            it to find which ``+``/``*``/``cat`` operands are tensors.

    Returns:
        The model to train, on CPU; pass it to :func:`convert_qat` afterwards.

    Raises:
        TypeError: If ``model`` is not a module.
        ValueError: If an option is invalid or pt2e gets no ``example_input``.
        ImportError: If the backend asked for is not installed.

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
        >>> qat = tk.prepare_qat(model, backend="eager")
        >>> opt = torch.optim.SGD(qat.parameters(), lr=0.01)
        >>> loss = qat(torch.randn(8, 256)).pow(2).mean()
        >>> loss.backward(); opt.step()
        >>> int8 = tk.convert_qat(qat)
        >>> [type(m).__name__ for m in int8.module.children()]
        ['LinearReLU', 'Identity', 'Linear']
    """
    check_module(model)
    _check_fuse(fuse)
    chosen = _resolve(backend, None, example_input, needs_example=True)
    _backend.check_engine(engine, chosen)
    if chosen == "pt2e" and fuse != "auto":
        raise ValueError("backend='pt2e' always folds BatchNorm and fuses; use fuse='auto'")
    _backend.warn_if_linears_too_small(model, _STATIC_KINDS)
    if chosen == "pt2e":
        from torchkit.quantization import _pt2e

        return _pt2e.prepare_qat(model, cast(torch.Tensor, example_input))  # checked
    from torchkit.quantization import _eager

    return _eager.prepare_qat(model, engine=engine, fuse=fuse, example=example_input)


def convert_qat(model: nn.Module, *, compile: bool | None = None) -> nn.Module:
    """Return the int8 version of a model trained after :func:`prepare_qat`.

    Args:
        model: The model :func:`prepare_qat` returned, after training; it is not changed.
        compile: pt2e only: compile the int8 graph with inductor on first call (default).

    Returns:
        The quantized copy, in eval mode, for inference on CPU.

    Raises:
        TypeError: If ``model`` did not come from :func:`prepare_qat`.
        ValueError: If ``compile=True`` for an eager-backend model.

    Example:
        >>> qat = tk.prepare_qat(nn.Sequential(nn.Linear(256, 256)), backend="eager")
        >>> _ = qat(torch.randn(8, 256))  # training steps go here: observers see the data
        >>> int8 = tk.convert_qat(qat)
        >>> [type(m).__name__ for m in int8.module.children()], int8.training
        (['Linear'], False)
    """
    from torchkit.quantization import _eager

    if isinstance(model, _eager.QuantizedModel) and model.qat:
        if compile:
            raise ValueError("compile=True needs a model prepared with backend='pt2e'")
        _backend.resolve_backend("eager")
        return _eager.convert_qat(model)
    if getattr(model, "_torchkit_qat", None) == "pt2e":
        from torchkit.quantization import _pt2e

        return _pt2e.convert_qat(model, compile=compile is not False)  # type: ignore[arg-type]
    raise TypeError(
        "convert_qat expects the model returned by tk.prepare_qat (after training), got "
        f"{type(model).__name__}; call tk.prepare_qat(model) first"
    )


def _check_modules(modules: Any) -> tuple[type[nn.Module], ...]:
    if isinstance(modules, type) or not isinstance(modules, (tuple, list, set, frozenset)):
        raise TypeError(
            f"modules must be a tuple of nn.Module subclasses, got {modules!r}; "
            "e.g. modules=(nn.Linear,)"
        )
    bad = [m for m in modules if not (isinstance(m, type) and issubclass(m, nn.Module))]
    if bad or not modules:
        raise TypeError(
            f"modules must be a non-empty tuple of nn.Module subclasses, got {modules!r}"
        )
    return tuple(modules)


def _check_fuse(fuse: str) -> None:
    if fuse not in ("auto", "none"):
        raise ValueError(f"fuse must be 'auto' or 'none', got {fuse!r}")


def _resolve(
    backend: str, compile: bool | None, example: torch.Tensor | None, *, needs_example: bool
) -> Literal["eager", "pt2e"]:
    if compile is not None and not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool or None, got {compile!r}")
    if example is not None and not isinstance(example, torch.Tensor):
        raise TypeError(f"example_input must be a tensor or None, got {type(example).__name__}")
    chosen = _backend.resolve_backend(backend)
    if chosen == "eager" and compile:
        raise ValueError("compile=True applies to backend='pt2e' only; leave compile=None")
    if chosen == "pt2e" and needs_example and example is None:
        raise ValueError(
            "backend='pt2e' traces the model with torch.export and needs a batch of inputs; "
            "pass example_input=<a batch of inputs>"
        )
    return chosen


def _check_pt2e_dynamic(
    model: nn.Module, kinds: tuple[type[nn.Module], ...], dtype: torch.dtype
) -> None:
    problems = []
    if dtype != torch.qint8:
        problems.append(f"dtype must be torch.qint8, got {dtype!r}")
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, kinds) and not isinstance(m, nn.Linear)})
    if others:
        problems.append(f"the model has {', '.join(others)} layers, which pt2e cannot quantize "
                        "dynamically (use backend='eager', or modules=(nn.Linear,))")
    if nn.Linear not in kinds:
        problems.append(f"modules must include nn.Linear, got {kinds!r}")
    if problems:
        raise ValueError(
            "backend='pt2e' quantizes only nn.Linear dynamically: " + "; ".join(problems)
        )
