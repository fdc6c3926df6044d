"""Run a classifier and look at its predictions: grad_cam and misclassified."""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchkit._batches import split_batch
from torchkit._names import name_hint
from torchkit.inspection._capture import hooked

__all__ = ["grad_cam", "misclassified"]

_log = logging.getLogger(__name__)


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
    with _eval_mode(model), torch.enable_grad(), hooked(
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
