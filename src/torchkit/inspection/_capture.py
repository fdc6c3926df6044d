"""See what a model learned: feature maps and their gradients, Grad-CAM, its mistakes.

:func:`capture` hooks submodules chosen by the same glob patterns as
:func:`~torchkit.freeze` and records their outputs (and, on request, the gradients of
those outputs) for as long as a ``with`` block lasts; nothing is left on the model
afterwards. :func:`feature_grid` turns a ``(N, C, H, W)`` feature map into one image per
sample for :meth:`~torchkit.TensorBoardLogger.log_images` or
:func:`~torchkit.plot_samples`. :func:`grad_cam` says where in an image the evidence
for a class lies, and :func:`misclassified` collects the samples a model gets wrong.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle

from torchkit._batches import split_batch
from torchkit._names import as_patterns, matches, name_hint, unmatched

__all__ = ["Captured", "capture", "feature_grid", "grad_cam", "misclassified"]

_log = logging.getLogger(__name__)


class Captured(dict[str, Any]):
    """What :func:`capture` recorded: a ``dict`` of outputs by module name, and :attr:`grads`.

    Each value is the output of the latest call of that module inside the ``with``
    block (a tensor, or a tuple/list/dict of them for modules that return several).

    Attributes:
        grads: The gradients of those outputs by module name, filled in by ``backward``
            inside the ``with`` block (empty unless ``capture(..., grads=True)``).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        >>> with tk.capture(net, "0") as captured:
        ...     _ = net(torch.ones(2, 3))
        >>> list(captured), captured["0"].shape, captured.grads
        (['0'], torch.Size([2, 4]), {})
    """

    def __init__(self) -> None:
        super().__init__()
        self.grads: dict[str, torch.Tensor] = {}


@contextlib.contextmanager
def capture(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    grads: bool = False,
    detach: bool = True,
    to: torch.device | str | None = "cpu",
) -> Iterator[Captured]:
    """Record the outputs of the named submodules while the ``with`` block runs.

    ``names`` are glob patterns over the qualified names of ``model.named_modules()``,
    matched exactly as :func:`~torchkit.freeze` matches parameter names (``*`` also
    matches dots; a pattern naming a module selects what lies under it). Of the modules
    matched, only the outermost are hooked: ``"layer*"`` captures ``layer1`` ...
    ``layer4`` of a ResNet, not every block inside them; ``"*conv*"`` captures every
    convolution. Every hook (forward hooks on the modules, gradient hooks on their
    outputs) is removed when the block ends, also on an exception, so a model that is
    not being captured runs exactly as before, with no hook left to call.

    Args:
        model: The model whose submodules to watch.
        names: Glob pattern(s) over submodule names.
        grads: Also record the gradient of each captured output (a tensor) when
            ``backward`` runs inside the block, into :attr:`Captured.grads`.
        detach: Store detached copies (safe from later in-place changes). ``False``
            stores the outputs themselves, still on the autograd graph, e.g. for
            ``torch.autograd.grad(score, captured["layer4"])`` (with ``to=None`` on a
            GPU: a move to another device is a new tensor).
        to: The device the recorded tensors are moved to (``None``: where they are).

    Yields:
        A :class:`Captured` dict, filled in as the model runs.

    Raises:
        TypeError: If ``model`` is not a module, ``names`` not pattern(s), or with
            ``grads=True`` a captured output is not a tensor.
        ValueError: If a pattern matches no submodule (the message suggests names),
            ``names`` is empty or ``to`` is not a device.
        RuntimeError: With ``grads=True``, if a captured output does not require grad
            (e.g. the forward ran under ``torch.no_grad()``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))
        >>> with tk.capture(net, ["0", "1"], grads=True) as feats:
        ...     net(torch.randn(2, 1, 5, 5)).sum().backward()
        >>> feats["1"].shape, feats.grads["0"].shape
        (torch.Size([2, 4, 3, 3]), torch.Size([2, 4, 3, 3]))
        >>> any(m._forward_hooks for m in net.modules())  # gone after the block
        False
    """
    modules = _select_modules(model, names)
    device = _device(to)
    if not isinstance(grads, bool) or not isinstance(detach, bool):
        raise TypeError(f"grads and detach must be bools, got grads={grads!r}, "
                        f"detach={detach!r}")
    with _hooked(modules, grads=grads, detach=detach, device=device) as captured:
        yield captured


def _select_modules(model: nn.Module, names: str | Sequence[str]) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patterns = as_patterns(names, arg="names")
    if not patterns:
        raise ValueError(f"names must be a pattern or a non-empty list of patterns, got "
                         f"{names!r}")
    named = [(n, m) for n, m in model.named_modules() if n]
    known = [n for n, _ in named]
    wrong = unmatched(patterns, known)
    if wrong:
        raise ValueError(
            f"capture: pattern(s) {', '.join(map(repr, wrong))} matched no submodule of "
            f"{type(model).__name__}; {name_hint(known, wrong)}"
        )
    chosen: dict[str, nn.Module] = {}
    for name, module in named:
        if matches(name, patterns) and not any(name.startswith(c + ".") for c in chosen):
            chosen[name] = module
    return chosen


def _device(to: torch.device | str | None) -> torch.device | None:
    if to is None:
        return None
    try:
        return torch.device(to)
    except (RuntimeError, TypeError):
        raise ValueError(f"to must be a device (e.g. 'cpu', 'cuda:0') or None, got "
                         f"{to!r}") from None


@contextlib.contextmanager
def _hooked(
    modules: Mapping[str, nn.Module], *, grads: bool, detach: bool,
    device: torch.device | None,
) -> Iterator[Captured]:
    """The one hook mechanism: record outputs (and their gradients), remove every hook."""
    captured = Captured()
    handles: list[RemovableHandle] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        if detach:
            return t.detach().to(device or t.device, copy=True)
        return t if device is None else t.to(device)

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def save_grad(grad: torch.Tensor) -> None:
            captured.grads[name] = grad.detach().to(device or grad.device, copy=True)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[name] = _map_tensors(output, keep)
            if not grads:
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"capture(grads=True) needs tensor outputs, but {name!r} "
                                f"returned a {type(output).__name__}; capture a submodule")
            if not output.requires_grad:
                raise RuntimeError(
                    f"capture(grads=True): the output of {name!r} does not require grad; "
                    "run the forward outside torch.no_grad(), and make something before "
                    "it trainable (or call inputs.requires_grad_())"
                )
            handles.append(output.register_hook(save_grad))  # type: ignore[no-untyped-call]

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) in (tuple, list):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def feature_grid(
    features: torch.Tensor, *, max_channels: int | None = 64, ncols: int | None = None,
    padding: int = 1,
) -> torch.Tensor:
    """Tile each sample's channels into one grayscale image: ``(N, C, H, W) -> (N, 1, H', W')``.

    TensorBoard and :func:`~torchkit.plot_samples` show images of 1 or 3 channels; a
    feature map has many. Each channel of each sample is scaled to ``[0, 1]`` on its
    own (a constant channel becomes 0) and placed in a grid of ``ncols`` columns
    (default: about square), with ``padding`` white pixels between tiles.

    Args:
        features: A ``(N, C, H, W)`` tensor (e.g. from :func:`capture`).
        max_channels: Show only the first this many channels (``None``: all).
        ncols: Tiles per row.
        padding: Pixels between tiles.

    Returns:
        A float32 ``(N, 1, H', W')`` tensor in ``[0, 1]`` on the device of ``features``.

    Raises:
        TypeError: If ``features`` is not a floating-point tensor.
        ValueError: If it is not 4-d, or an option is out of range.

    Example:
        >>> grid = tk.feature_grid(torch.randn(2, 6, 4, 4), ncols=3)
        >>> grid.shape  # 2 rows of 3 tiles, 1 pixel apart
        torch.Size([2, 1, 9, 14])
        >>> float(grid.min()), float(grid.max())
        (0.0, 1.0)
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        got = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
        raise TypeError(f"features must be a floating-point tensor, got {got}")
    problems = []
    if features.ndim != 4:
        problems.append(f"features must have shape (N, C, H, W), got {tuple(features.shape)}")
    for arg, value, low in (("max_channels", max_channels, 1), ("ncols", ncols, 1),
                            ("padding", padding, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            problems.append(f"{arg} must be an int >= {low}, got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))
    f = features.detach().float()[:, :max_channels]
    n, c, h, w = f.shape
    cols = ncols or math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    low_, high = f.amin(dim=(2, 3), keepdim=True), f.amax(dim=(2, 3), keepdim=True)
    span = high - low_
    f = torch.where(span > 0, (f - low_) / span.clamp_min(torch.finfo(f.dtype).tiny), 0.0)
    grid = f.new_ones(n, rows * (h + padding) - padding, cols * (w + padding) - padding)
    for i in range(c):
        r, col = divmod(i, cols)
        top, left = r * (h + padding), col * (w + padding)
        grid[:, top:top + h, left:left + w] = f[:, i]
    return grid.unsqueeze(1)


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target_layer: str | nn.Module,
    class_idx: int | Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Return Grad-CAM maps: where in each input the evidence for a class lies.

    The gradients of the class score with respect to ``target_layer``'s output
    ``(N, K, h, w)``, averaged over ``h, w``, weight its ``K`` channels; the ReLU of
    the weighted sum, upsampled (bilinear) to the inputs' size and scaled to ``[0, 1]``
    per sample (an all-zero map stays 0), is the map (Selvaraju et al., 2017). Pick the
    last convolutional stage: ``"layer4"`` (ResNet), ``"features"`` (VGG, MobileNet,
    EfficientNet, DenseNet).

    The model runs once in eval mode (each module's mode is restored afterwards), with
    gradients enabled even inside ``torch.no_grad()``, also for a frozen model; the
    parameters' ``.grad`` are left untouched.

    Args:
        model: A classifier returning ``(N, num_classes)`` scores.
        inputs: A ``(N, C, H, W)`` floating-point batch on the model's device.
        target_layer: A submodule's qualified name, or the submodule itself, whose
            output has shape ``(N, K, h, w)``.
        class_idx: The class to explain: one for all samples, one per sample, or
            ``None`` for each sample's predicted class.

    Returns:
        A float32 ``(N, H, W)`` tensor in ``[0, 1]``, on the device of ``inputs``.

    Raises:
        TypeError: If ``model``, ``inputs`` or ``target_layer`` has the wrong type.
        KeyError: If no submodule has the name ``target_layer`` (the message suggests).
        ValueError: If a shape is wrong, ``target_layer`` is a module outside ``model``
            or ``class_idx`` is out of range.
        RuntimeError: If ``target_layer`` did not run in the forward pass.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> cams = tk.grad_cam(net, torch.randn(2, 3, 8, 8), "1")
        >>> cams.shape, bool(cams.min() >= 0), bool(cams.max() <= 1)
        (torch.Size([2, 8, 8]), True, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        got = inputs.dtype if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise TypeError(f"inputs must be a floating-point tensor, got {got}")
    if inputs.ndim != 4:
        raise ValueError(f"inputs must have shape (N, C, H, W), got {tuple(inputs.shape)}")
    name, layer = _target(model, target_layer)
    with _eval_mode(model), torch.enable_grad(), _hooked(
        {name: layer}, grads=False, detach=False, device=None
    ) as captured:
        logits = model(inputs.detach().requires_grad_(True))
    if name not in captured:
        raise RuntimeError(f"target_layer {name!r} did not run in the forward pass of "
                           f"{type(model).__name__}; pick a layer on the path to the output")
    activation = captured[name]
    if not isinstance(activation, torch.Tensor) or activation.ndim != 4:
        raise ValueError(f"target_layer {name!r} must output (N, K, h, w) feature maps, got "
                         f"{_shape(activation)}; pick a convolutional layer or block")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"model must return (N, num_classes) scores, got {_shape(logits)}")
    index = _class_indices(class_idx, logits)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(logits.gather(1, index[:, None]).sum(), activation)
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(inputs.shape[-2:]), mode="bilinear",
                        align_corners=False)[:, 0]
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    span = high - low
    cam = torch.where(span > 0, (cam - low) / span.clamp_min(torch.finfo(cam.dtype).tiny), 0.0)
    return cam.detach().to(inputs.device)


def _target(model: nn.Module, target_layer: str | nn.Module) -> tuple[str, nn.Module]:
    named = dict(model.named_modules())
    if isinstance(target_layer, str):
        if target_layer not in named:
            known = [n for n in named if n]
            raise KeyError(f"no submodule {target_layer!r} in {type(model).__name__}; "
                           f"{name_hint(known, [target_layer])}")
        return target_layer, named[target_layer]
    if isinstance(target_layer, nn.Module):
        for name, module in named.items():
            if module is target_layer:
                return name, module
        raise ValueError(f"target_layer ({type(target_layer).__name__}) is not a submodule "
                         f"of {type(model).__name__}; pass one of its modules or a name")
    raise TypeError(f"target_layer must be a submodule name (str) or an nn.Module, got "
                    f"{type(target_layer).__name__}")


def _class_indices(class_idx: Any, logits: torch.Tensor) -> torch.Tensor:
    n, classes = logits.shape
    if class_idx is None:
        return logits.detach().argmax(dim=1)
    if isinstance(class_idx, numbers.Integral) and not isinstance(class_idx, bool):
        index = torch.full((n,), int(class_idx), dtype=torch.long, device=logits.device)
    else:
        index = torch.as_tensor(class_idx, device=logits.device)
        if index.is_floating_point() or index.dtype == torch.bool or index.shape != (n,):
            raise ValueError(f"class_idx must be None, an int or {n} ints (one per sample), "
                             f"got {class_idx!r}")
        index = index.long()
    if bool(((index < 0) | (index >= classes)).any()):
        raise ValueError(f"class_idx must lie in [0, {classes}), got {class_idx!r}")
    return index


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then give every module back the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def misclassified(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    limit: int | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``data`` and collect the samples whose predicted class is wrong.

    The model runs in eval mode under ``torch.no_grad()`` (each module's mode is
    restored afterwards). A sample's index counts from the first sample ``data``
    yields, in the order it yields them (with a shuffling ``DataLoader`` that is the
    order of this pass, not of the dataset: pass an unshuffled loader to index the
    dataset).

    Args:
        model: A classifier returning ``(N, num_classes)`` scores.
        data: Batches ``(inputs, targets)`` (or dicts, as ``Trainer`` takes); targets
            are class indices or one-hot rows.
        device: Where to run (default: the device of the model's first parameter).
        limit: Stop after this many misclassified samples.

    Returns:
        ``{"inputs", "preds", "targets", "indices"}``, on the CPU, in data order.

    Raises:
        TypeError: If ``model`` is not a module or a batch is not ``(inputs, targets)``.
        ValueError: If ``limit`` is not a positive int, ``data`` is empty or a shape
            does not fit.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.eye(2)), net.bias.zero_()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        >>> wrong = tk.misclassified(net, [(x, torch.tensor([0, 0, 0]))])
        >>> wrong["indices"], wrong["preds"], wrong["targets"]
        (tensor([1]), tensor([1]), tensor([0]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    found: dict[str, list[torch.Tensor]] = {"inputs": [], "preds": [], "targets": [],
                                            "indices": []}
    seen, count = 0, 0
    with _eval_mode(model), torch.no_grad():
        for batch in data:
            inputs, targets = split_batch(batch)
            outputs = model(inputs.to(dev))
            preds, labels = outputs.argmax(dim=1).cpu(), _labels(outputs, targets).cpu()
            wrong = (preds != labels).nonzero().flatten()
            if limit is not None:
                wrong = wrong[: limit - count]
            for key, values in (("inputs", inputs.detach().cpu()), ("preds", preds),
                                ("targets", labels), ("indices", wrong + seen)):
                found[key].append(values if key == "indices" else values[wrong])
            seen, count = seen + len(labels), count + len(wrong)
            if limit is not None and count >= limit:
                break
    if not found["indices"]:
        raise ValueError("data yielded no batches: pass a DataLoader or a list of "
                         "(inputs, targets) batches")
    _log.debug("misclassified: %d of %d samples", count, seen)
    return {key: torch.cat(values) for key, values in found.items()}


def _labels(outputs: Any, targets: Any) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor) or outputs.ndim != 2:
        raise ValueError(f"model must return (N, num_classes) scores, got {_shape(outputs)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.shape == outputs.shape:
        return targets.argmax(dim=1)
    if targets.shape != outputs.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets must be {outputs.shape[0]} class indices or one-hot rows "
                         f"of shape {tuple(outputs.shape)}, got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    return targets.to(outputs.device)


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
