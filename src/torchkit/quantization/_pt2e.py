"""The "pt2e" backend: torch.export + torchao's X86InductorQuantizer, compiled by inductor."""

from __future__ import annotations

import copy
import importlib
from types import ModuleType
from typing import Any

import torch
from torch import fx, nn

__all__: list[str] = []


def _torchao() -> tuple[ModuleType, ModuleType, ModuleType]:
    # Imported here, not at module level: importing torchao takes ~3 s.
    return (
        importlib.import_module("torchao.quantization.pt2e"),
        importlib.import_module("torchao.quantization.pt2e.quantize_pt2e"),
        importlib.import_module("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"),
    )


class Int8Graph(nn.Module):
    """A converted pt2e graph; compiled with inductor freezing on first call when asked.

    Inference only: it always runs under ``torch.no_grad()``. Exported graphs cannot
    switch train/eval behaviour, so ``train()`` changes only this wrapper's flag.
    """

    def __init__(self, module: fx.GraphModule, *, compile: bool) -> None:
        super().__init__()
        self.module = module
        self.use_compile = compile
        self.training = False

    def forward(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            if not self.use_compile:
                return self.module(x)
            compiled = self.__dict__.get("_compiled")
            if compiled is None:
                # dynamic=False: inductor's dynamic-shape int8 conv lowering fails on the
                # second batch size (torch 2.14); one static graph per batch size works.
                compiled = torch.compile(self.module, dynamic=False)
                self.__dict__["_compiled"] = compiled  # not a submodule: no state_dict copy
            inductor_config = importlib.import_module("torch._inductor.config")
            with inductor_config.patch(freezing=True):  # int8 kernels need frozen weights
                return compiled(x)

    def train(self, mode: bool = True) -> Int8Graph:
        self.training = mode
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_compiled", None)  # recompiled lazily after a copy or unpickling
        return state


def _export(model: nn.Module, example: torch.Tensor, *, train: bool) -> fx.GraphModule:
    module = copy.deepcopy(model).cpu().train(train)
    try:
        exported = torch.export.export(
            module, (example.cpu(),), strict=True, dynamic_shapes=({0: torch.export.Dim.AUTO},)
        )
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(
            f"backend='pt2e' could not capture the model with torch.export(strict=True): "
            f"{first}. Make its forward exportable, or use backend='eager'"
        ) from error
    return exported.module()


def _quantizer(*, qat: bool = False, dynamic: bool = False) -> Any:
    xiq = _torchao()[2]
    quantizer = xiq.X86InductorQuantizer()
    config = xiq.get_default_x86_inductor_quantization_config(is_qat=qat, is_dynamic=dynamic)
    quantizer.set_global(config)
    return quantizer


def _strip_unused(graph: fx.GraphModule) -> fx.GraphModule:
    """Delete the fp32 weights that conversion leaves behind but the graph never reads."""
    used = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    called = [str(n.target) + "." for n in graph.graph.nodes if n.op == "call_module"]
    tensors = [*graph.named_parameters(), *graph.named_buffers()]
    for name, _ in tensors:
        if name in used or any(name.startswith(prefix) for prefix in called):
            continue
        owner, _, leaf = name.rpartition(".")
        delattr(graph.get_submodule(owner) if owner else graph, leaf)
    return graph


def _convert(prepared: fx.GraphModule, *, compile: bool) -> Int8Graph:
    converted = _torchao()[1].convert_pt2e(prepared)
    return Int8Graph(_strip_unused(converted), compile=compile)


def quantize_dynamic(model: nn.Module, example: torch.Tensor, *, compile: bool) -> nn.Module:
    """Quantize the Linear layers of a copy of ``model`` with dynamic int8 activations."""
    prepared = _torchao()[1].prepare_pt2e(
        _export(model, example, train=False), _quantizer(dynamic=True)
    )
    with torch.no_grad():
        prepared(example.cpu())
    return _convert(prepared, compile=compile)


def quantize_static(model: nn.Module, inputs: list[torch.Tensor], *, compile: bool) -> nn.Module:
    """Export a copy of ``model``, observe ``inputs`` and convert it to int8."""
    prepared = _torchao()[1].prepare_pt2e(_export(model, inputs[0], train=False), _quantizer())
    with torch.no_grad():
        for x in inputs:
            prepared(x.cpu())
    return _convert(prepared, compile=compile)


def prepare_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Export a copy of ``model`` in training mode with fake quantization inserted."""
    pt2e, quantize_pt2e, _ = _torchao()
    prepared = quantize_pt2e.prepare_qat_pt2e(
        _export(model, example, train=True), _quantizer(qat=True)
    )
    pt2e.allow_exported_model_train_eval(prepared)  # so model.train()/.eval() keep working
    prepared._torchkit_qat = "pt2e"
    return prepared  # type: ignore[no-any-return]


def convert_qat(model: fx.GraphModule, *, compile: bool) -> nn.Module:
    """Convert a copy of a model from :func:`prepare_qat` to int8."""
    converted = copy.deepcopy(model)
    _torchao()[0].move_exported_model_to_eval(converted)
    return _convert(converted, compile=compile)
