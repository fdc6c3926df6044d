"""Backend choice, warnings, engine scoping and input handling shared by the quantizers."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from torchkit._utils import require

__all__: list[str] = []

Backend = Literal["auto", "eager", "pt2e"]
Engine = Literal["x86", "fbgemm", "qnnpack", "onednn"]

BACKENDS = ("auto", "eager", "pt2e")
ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")

# Below this many weights (256 x 256) an int8 Linear is slower than fp32 on CPU at every
# batch size measured (benchmarks/RESULTS.md): quantize/dequantize costs more than it saves.
MIN_FAST_LINEAR_WEIGHTS = 256 * 256

EAGER_NOTICE = (
    "torchkit's 'eager' quantization backend runs on torch.ao.quantization eager mode, "
    "which PyTorch has deprecated (its functions raise DeprecationWarning) and will remove. "
    'Switch to the torchao backend: pip install "torchkit[torchao]" and pass '
    'backend="pt2e". torchkit shows this notice once per process.'
)

# The one upstream warning torchkit filters, by its exact text and only inside its own
# calls: every observer repeats it many times per prepare, and the user cannot act on it.
_REDUCE_RANGE = (
    re.escape("Please use quant_min and quant_max to specify the range for observers.")
    + r"\s+"
    + re.escape("reduce_range will be deprecated in a future release of PyTorch.")
    + r"\Z"
)

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_eager_notice_shown = False


def eager_available() -> bool:
    """Whether this torch still ships torch.ao.quantization's eager-mode API."""
    try:
        tq = importlib.import_module("torch.ao.quantization")
    except ImportError:
        return False
    return all(hasattr(tq, name) for name in ("quantize_dynamic", "prepare", "convert"))


def pt2e_available() -> bool:
    """Whether torchao (the pt2e backend) is installed; it is not imported here (~3 s)."""
    return importlib.util.find_spec("torchao") is not None


def resolve_backend(backend: str) -> Literal["eager", "pt2e"]:
    """Turn ``backend`` into the backend to use, or say what to install."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pt2e" or (backend == "auto" and not eager_available()):
        if backend == "auto" and not pt2e_available():
            raise ImportError(
                f"no quantization backend is available: torch {torch.__version__} no longer "
                "ships torch.ao.quantization eager mode and torchao is not installed; "
                'install it with: pip install "torchkit[torchao]"'
            )
        require("torchao", extra="torchao")
        return "pt2e"
    if not eager_available():
        raise ImportError(
            f"backend='eager' needs torch.ao.quantization eager mode, which torch "
            f'{torch.__version__} no longer ships; use backend="pt2e" (or "auto") after: '
            'pip install "torchkit[torchao]"'
        )
    _notify_eager()
    return "eager"


def _notify_eager() -> None:
    global _eager_notice_shown
    if _eager_notice_shown:
        return
    _eager_notice_shown = True
    warnings.warn(EAGER_NOTICE, FutureWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """Return the stacklevel that points at the first frame outside torchkit's files."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


@contextlib.contextmanager
def quiet_observers() -> Iterator[None]:
    """Hide torch's repeated observer ``reduce_range`` warning, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_REDUCE_RANGE, category=UserWarning)
        yield


@contextlib.contextmanager
def engine_scope(engine: str) -> Iterator[None]:
    """Use quantized ``engine`` inside the block, then restore the previous one."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def check_engine(engine: str, backend: str) -> None:
    """Raise unless ``engine`` is known, supported here and usable with ``backend``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if backend == "pt2e" and engine != "x86":
        raise ValueError(
            f"backend='pt2e' uses torchao's X86InductorQuantizer, so engine must be 'x86', "
            f"got {engine!r}; use backend='eager' for {engine!r}"
        )
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ValueError(
            f"quantized engine {engine!r} is not supported by this torch build on this "
            f"machine; supported engines: {supported}"
        )


def batch_input(batch: Any) -> torch.Tensor:
    """Return the input tensor of one batch: itself, its first element or ``"inputs"``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, Mapping) and isinstance(batch.get("inputs"), torch.Tensor):
        return batch["inputs"]  # type: ignore[no-any-return]
    raise TypeError(
        "each batch must be an input tensor, a tuple/list whose first element is the "
        f"input tensor, or a dict with an 'inputs' tensor; got {_describe(batch)}"
    )


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {[type(b).__name__ for b in batch]}"
    return f"a {type(batch).__name__}"


def calibration_inputs(data: Any, num_batches: int | None) -> list[torch.Tensor]:
    """Collect the input tensors of up to ``num_batches`` batches of ``data``."""
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if isinstance(data, (torch.Tensor, Mapping)) or not hasattr(data, "__iter__"):
        raise TypeError(
            "calibration_data must be an iterable of batches (a DataLoader or a list), got "
            f"{type(data).__name__}; wrap a single batch in a list: [batch]"
        )
    inputs: list[torch.Tensor] = []
    for batch in data:
        if num_batches is not None and len(inputs) >= num_batches:
            break
        inputs.append(batch_input(batch))
    if not inputs:
        raise ValueError("calibration_data yielded no batches; pass at least one batch")
    return inputs


def warn_if_linears_too_small(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> None:
    """Warn when the model's only quantizable layers are Linears too small to speed up."""
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if not layers or len(linears) < len(layers):
        return
    if all(m.in_features * m.out_features < MIN_FAST_LINEAR_WEIGHTS for m in linears):
        biggest = max(m.in_features * m.out_features for m in linears)
        warnings.warn(
            f"every quantized nn.Linear is small (the biggest has {biggest} weights, under "
            f"{MIN_FAST_LINEAR_WEIGHTS}): int8 will likely run slower than fp32 on CPU, "
            "though the model still gets smaller; measure with tk.quantization_report",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )
