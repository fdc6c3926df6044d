"""Private: ``Trainer(compile=...)``, torch.compile of the (DDP-wrapped) model."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from torchkit._utils import unwrap

__all__ = ["CompiledModels", "check_compile", "compile_errors"]


def check_compile(compile: Any) -> str | None:
    """The error for a bad ``Trainer(compile=...)``, or ``None`` when it is fine.

    Example:
        >>> check_compile(True) is None, check_compile({"mode": "reduce-overhead"}) is None
        (True, True)
        >>> print(check_compile({"fullgraf": True}))  # doctest: +ELLIPSIS
        compile must be ... got unknown option(s) ['fullgraf']
    """
    if isinstance(compile, bool):
        return None
    allowed = [name for name in inspect.signature(torch.compile).parameters if name != "model"]
    if isinstance(compile, Mapping):
        unknown = sorted(str(k) for k in compile if k not in allowed)
        if not unknown:
            return None
        got = f"unknown option(s) {unknown}"
    else:
        got = repr(compile)
    return (f"compile must be False, True or a dict of torch.compile options "
            f"({', '.join(allowed)}), got {got}")


class CompiledModels:
    """What the trainer runs: ``train`` (compiled after any DDP wrap) and ``eval``.

    ``eval`` is the compiled module without the DDP wrapper (evaluation must not talk to
    other ranks); without DDP it is the very same compiled object as ``train``. With
    ``compile=False`` both are the modules given. The modules inside are not copied, so
    checkpoints (which unwrap) hold the plain model and load into an uncompiled one.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> models = CompiledModels(model, False)
        >>> models.train is model and models.eval is model
        True
    """

    def __init__(self, model: nn.Module, compile: bool | Mapping[str, Any]) -> None:
        self.option = compile
        options = dict(compile) if isinstance(compile, Mapping) else {}
        if compile is False:
            self.train: nn.Module = model
            self.eval: nn.Module = unwrap(model)
            return
        try:
            self.train = _compiled(model, options)
            inner = unwrap(model)
            self.eval = self.train if inner is model else _compiled(inner, options)
        except Exception as error:  # a bad mode/backend is refused here, at once
            raise _error(compile, error) from error


def _compiled(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    compiled = torch.compile(model, **options)
    if not isinstance(compiled, nn.Module):  # pragma: no cover - torch returns a module
        raise TypeError(f"torch.compile returned a {type(compiled).__name__}")
    return compiled


def _error(option: Any, error: BaseException) -> RuntimeError:
    return RuntimeError(
        f"Trainer(compile={option!r}): torch.compile failed ({type(error).__name__}: "
        f"{error}). Pass compile=False to train eagerly, or other torch.compile options"
    )


@contextlib.contextmanager
def compile_errors(option: bool | Mapping[str, Any]) -> Iterator[None]:
    """Re-raise a failure of torch.compile as an error naming the ``compile`` option.

    torch.compile compiles lazily, at the first call. This context is entered once per
    ``fit``/``evaluate``/``predict`` call, so it costs nothing per step.

    Example:
        >>> with compile_errors(False):
        ...     pass
    """
    if option is False:
        yield
        return
    try:
        yield
    except Exception as error:
        if _is_compile_failure(error):
            raise _error(option, error) from error
        raise


def _is_compile_failure(error: BaseException) -> bool:
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - depends on the torch version
        return False
    return isinstance(error, TorchDynamoException)
