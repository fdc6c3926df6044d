"""The "eager" backend: torch.ao.quantization eager mode, with fusion found by tracing."""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.ao.quantization
from torch import fx, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.fx.passes.shape_prop import ShapeProp

from torchkit.quantization._backend import engine_scope, quiet_observers

__all__: list[str] = []

tq: Any = torch.ao.quantization  # untyped: keep mypy's no-untyped-call out of every line

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class QuantizedModel(nn.Module):
    """The user's model between a QuantStub and a DeQuantStub, remembering its engine."""

    def __init__(self, module: nn.Module, *, engine: str, qat: bool) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.module = module
        self.dequant = tq.DeQuantStub()
        self.engine = engine
        self.qat = qat
        self.train(module.training)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.module(self.quant(x))
        if isinstance(out, (tuple, list)):
            return type(out)(self.dequant(o) if isinstance(o, torch.Tensor) else o for o in out)
        return self.dequant(out)


class _Functional(nn.Module):
    """``a + b``, ``a * b`` or ``torch.cat``: float ops that need observers to run in int8."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.functional = FloatFunctional()

    def forward(self, *args: Any) -> torch.Tensor:
        return getattr(self.functional, self.op)(*args)  # type: ignore[no-any-return]


_FUNCTIONALS = {operator.add: "add", torch.add: "add", operator.iadd: "add",
                operator.mul: "mul", torch.mul: "mul", operator.imul: "mul", torch.cat: "cat"}


def quantize_dynamic(
    model: nn.Module, *, dtype: torch.dtype, modules: Sequence[type[nn.Module]]
) -> nn.Module:
    """Swap ``modules`` for dynamically quantized versions in a copy of ``model``."""
    holder = nn.Sequential(model)  # torch swaps children only: make a bare layer a child
    with quiet_observers():
        quantized = tq.quantize_dynamic(holder, qconfig_spec=set(modules), dtype=dtype)
    return quantized[0]  # type: ignore[no-any-return]


def quantize_static(
    model: nn.Module, inputs: list[torch.Tensor], *, engine: str, fuse: str
) -> nn.Module:
    """Fuse, observe ``inputs`` and convert a copy of ``model`` to int8."""
    graph = _prepare_graph(model, fuse=fuse, qat=False, example=inputs[0])
    wrapped = QuantizedModel(graph, engine=engine, qat=False)
    wrapped.qconfig = tq.get_default_qconfig(engine)
    with engine_scope(engine), quiet_observers(), torch.no_grad():
        tq.prepare(wrapped, inplace=True)
        for x in inputs:
            wrapped(x.cpu())
        tq.convert(wrapped, inplace=True)
        _check_runs(wrapped, inputs[0].cpu())
    return wrapped


def prepare_qat(
    model: nn.Module, *, engine: str, fuse: str, example: torch.Tensor | None
) -> nn.Module:
    """Fuse a copy of ``model`` and insert fake quantization for training."""
    graph = _prepare_graph(model, fuse=fuse, qat=True, example=example)
    wrapped = QuantizedModel(graph, engine=engine, qat=True)
    wrapped.qconfig = tq.get_default_qat_qconfig(engine)
    with engine_scope(engine), quiet_observers():
        tq.prepare_qat(wrapped, inplace=True)
    return wrapped


def convert_qat(model: QuantizedModel) -> nn.Module:
    """Convert a copy of a model from :func:`prepare_qat` to int8."""
    converted = copy.deepcopy(model).cpu().eval()
    with engine_scope(model.engine), quiet_observers():
        tq.convert(converted, inplace=True)
    converted.qat = False
    return converted


def _prepare_graph(
    model: nn.Module, *, fuse: str, qat: bool, example: torch.Tensor | None
) -> nn.Module:
    module = copy.deepcopy(model).cpu().train(qat)
    try:
        if not any(True for _ in module.children()):
            raise TypeError("a single layer: tracing would turn it into functional calls")
        graph: nn.Module = fx.symbolic_trace(module)
    except Exception:
        graph = module
        groups = _sequential_fusions(graph)
    else:
        groups = _graph_fusions(graph)  # type: ignore[arg-type]
        _route_functionals(graph, example)  # type: ignore[arg-type]
    if fuse == "auto" and groups:
        fuser = tq.fuse_modules_qat if qat else tq.fuse_modules
        fuser(graph, groups, inplace=True)
    return graph


def find_fusions(model: nn.Module) -> list[list[str]]:
    """Return the conv-bn(-relu) and linear(-bn)/(-relu) runs of ``model`` by name."""
    try:
        return _graph_fusions(fx.symbolic_trace(model))
    except Exception:
        return _sequential_fusions(model)


def _fusable(kinds: list[type[nn.Module]]) -> bool:
    first, rest = kinds[0], kinds[1:]
    if first in _CONV_BN:
        return rest in ([_CONV_BN[first]], [_CONV_BN[first], nn.ReLU], [nn.ReLU])
    return first is nn.Linear and rest in ([nn.ReLU], [nn.BatchNorm1d])


def _graph_fusions(graph: fx.GraphModule) -> list[list[str]]:
    modules = dict(graph.named_modules())
    calls = Counter(n.target for n in graph.graph.nodes if n.op == "call_module")
    groups: list[list[str]] = []
    for node in graph.graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in (*_CONV_BN, nn.Linear):
            continue
        run, kinds = [node], [type(modules[node.target])]
        while len(run) < 3 and len(run[-1].users) == 1:
            nxt = next(iter(run[-1].users))
            # A module called twice (resnet's shared ReLU) cannot become an Identity.
            if nxt.op != "call_module" or calls[nxt.target] != 1:
                break
            if not _fusable([*kinds, type(modules[nxt.target])]):
                break
            run.append(nxt)
            kinds.append(type(modules[nxt.target]))
        if len(run) > 1 and calls[node.target] == 1:
            groups.append([str(n.target) for n in run])
    return groups


def _sequential_fusions(model: nn.Module) -> list[list[str]]:
    groups: list[list[str]] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        i = 0
        while i < len(names):
            for length in (3, 2):
                run = names[i : i + length]
                if len(run) == length and _fusable([type(seq._modules[n]) for n in run]):
                    groups.append([f"{prefix}.{n}" if prefix else n for n in run])
                    i += length - 1
                    break
            i += 1
    return groups


def _route_functionals(graph: fx.GraphModule, example: torch.Tensor | None) -> None:
    """Run tensor ``+``, ``*`` and ``torch.cat`` through FloatFunctional so int8 can do them."""
    if example is not None:
        training = graph.training
        with torch.no_grad():  # eval: record shapes without touching BatchNorm statistics
            ShapeProp(graph.eval()).propagate(example.cpu())
        graph.train(training)
    for index, node in enumerate(list(graph.graph.nodes)):
        op = _FUNCTIONALS.get(node.target) if node.op == "call_function" else None
        if op is None or (node.kwargs and op != "cat"):
            continue
        operands = node.args[0] if op == "cat" else node.args[:2]
        if not all(_is_tensor(a, shapes=example is not None) for a in operands):
            continue
        name = f"_torchkit_{op}_{index}"
        graph.add_submodule(name, _Functional(op))
        with graph.graph.inserting_after(node):
            new = graph.graph.call_module(name, node.args, dict(node.kwargs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.graph.erase_node(node)
    graph.recompile()


def _is_tensor(arg: Any, *, shapes: bool) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    if shapes:
        return "tensor_meta" in arg.meta
    # Without an example input, trust only values that a layer or a routed op produced.
    return arg.op in ("call_module", "placeholder")


def _check_runs(model: nn.Module, x: torch.Tensor) -> None:
    try:
        model(x)
    except (NotImplementedError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise RuntimeError(
            "the int8 model built by backend='eager' fails on a calibration batch: "
            f"{first}. Eager mode needs every operation between layers to accept quantized "
            "tensors; use backend='pt2e' (pip install \"torchkit[torchao]\"), or quantize "
            "only the layers with tk.quantize_dynamic"
        ) from error
