"""Find a classifier's final layer and replace it for a new number of classes."""

from __future__ import annotations

import logging
import numbers
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import UninitializedParameter

from torchkit.surgery._common import check_model, get_submodule, like, set_submodule
from torchkit.surgery._init import INIT_METHODS, init_weights

__all__ = ["find_head", "replace_head"]

_log = logging.getLogger(__name__)

_CONVS: dict[int, type[_ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """Find the final classifier layer of ``model`` from its structure.

    The head is the submodule registered last among those that own parameters, and it
    must be an ``nn.Linear`` or a 1x1 convolution (``groups=1``). This finds ``fc``
    (ResNet, RegNet, ShuffleNet, GoogLeNet, Inception — not their auxiliary heads),
    ``classifier.6`` (VGG, AlexNet), ``classifier.1`` (a 1x1 conv in SqueezeNet; a
    Linear in MobileNetV2, EfficientNet, MNASNet), ``classifier`` (DenseNet),
    ``classifier.2`` (ConvNeXt), ``classifier.3`` (MobileNetV3), ``classifier.5``
    (MaxViT), ``heads.head`` (ViT) and ``head`` (Swin), and the last layer of most
    hand-written models. When the last layer with parameters is anything else (a
    backbone whose head was removed, say), nothing is guessed: it raises.

    Args:
        model: The model to search (it is not changed).

    Returns:
        The head's qualified name and the head module.

    Raises:
        TypeError: If ``model`` is not a module.
        ValueError: If no submodule owns parameters, or the last one that does is not
            a Linear or a 1x1 convolution.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 10))
        >>> tk.find_head(net)
        ('4', Linear(in_features=8, out_features=10, bias=True))
    """
    check_model(model)
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            last = (name, module)
    if last is None:
        raise ValueError(
            f"found no classifier head in {type(model).__name__}: no submodule has "
            "parameters; expected one ending in an nn.Linear or a 1x1 convolution"
        )
    name, module = last
    if not _is_head(module):
        raise ValueError(
            f"found no classifier head in {type(model).__name__}: the last layer with "
            f"parameters, {name!r}, is a {type(module).__name__}, not an nn.Linear or a "
            "1x1 convolution; pass the head's name to replace_head(..., name=...)"
        )
    return last


def replace_head(
    model: nn.Module,
    num_classes_or_module: int | nn.Module,
    *,
    name: str | None = None,
    init: str | None = None,
) -> nn.Module:
    """Replace the classifier head of ``model`` and return the new layer.

    Given a number of classes, the new head is the same kind of layer as the old one
    (an ``nn.Linear``, or an ``nn.ConvNd`` with the same kernel size, stride, padding
    and dilation) with the same input size and bias setting, freshly initialised and
    trainable, on the old head's device and with its dtype. Given a module, that module
    is moved to the old head's device and (floating-point) dtype and put in its place.
    Build the optimizer after this call, e.g. from :func:`trainable_parameters`: the
    new layer's parameters are new tensors. The head keeps its name, so a
    ``state_dict`` saved after the swap loads into a model edited the same way.

    Auxiliary heads (GoogLeNet ``aux1``/``aux2``, Inception ``AuxLogits``) are left
    alone; replace them by name too, or build the model with ``aux_logits=False``.

    Args:
        model: The model to change in place.
        num_classes_or_module: The number of output classes, or the new head module.
        name: The qualified name of the layer to replace; found with
            :func:`find_head` when ``None``.
        init: Re-initialise the new head with this :func:`~torchkit.init_weights`
            method (``"kaiming_normal"``, ``"xavier_uniform"``, ``"zeros"``, ...; biases
            become 0); ``None`` keeps torch's default initialisation.

    Returns:
        The new head, now part of ``model``.

    Raises:
        TypeError: If ``model`` is not a module, ``num_classes_or_module`` is neither an
            int nor a module, or the input size of the layer to replace cannot be read
            (it is not a Linear or a convolution: pass a module instead).
        ValueError: If the number of classes is below 1, ``name`` is ``""`` (the model
            itself), a lazy head has not run yet, no head is found, or ``init`` is not
            a method name.
        KeyError: If ``name`` is not a submodule (the message lists those that exist).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
        >>> tk.replace_head(net, 3)
        Linear(in_features=8, out_features=3, bias=True)
        >>> net(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """
    check_model(model)
    if init is not None and init not in INIT_METHODS:
        raise ValueError(f"init must be None or one of {', '.join(map(repr, INIT_METHODS))}, "
                         f"got {init!r}")
    replacement = num_classes_or_module
    if not isinstance(replacement, nn.Module) and (
        isinstance(replacement, bool) or not isinstance(replacement, numbers.Integral)
    ):
        raise TypeError(
            "num_classes_or_module must be a number of classes (int) or an nn.Module, "
            f"got {type(replacement).__name__}"
        )
    if not isinstance(replacement, nn.Module) and replacement < 1:
        raise ValueError(f"num_classes_or_module must be >= 1 classes, got {replacement}")
    if name == "":
        raise ValueError(
            "name must name a submodule, got '' (the model itself); build a new model "
            "instead, or name the layer to replace"
        )
    if name is None:
        name, old = find_head(model)
    else:
        old = get_submodule(model, name)
    if isinstance(replacement, nn.Module):
        new = like(replacement, old)
    else:
        new = _new_layer(old, int(replacement), name)
    if init is not None and any(True for _ in new.parameters()):
        init_weights(new, method=init)
    set_submodule(model, name, new)
    _log.info("replaced the head %r (%s) with a %s", name, type(old).__name__,
              type(new).__name__)
    return new


def _is_head(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, _ConvNd)
        and not module.transposed
        and module.groups == 1
        and all(k == 1 for k in module.kernel_size)
    )


def _new_layer(old: nn.Module, num_classes: int, name: str) -> nn.Module:
    weight = getattr(old, "weight", None)
    if isinstance(weight, UninitializedParameter):
        raise ValueError(
            f"cannot replace {name!r}: it is a lazy {type(old).__name__} that has not run "
            "yet, so its input size is unknown; run one forward pass first"
        )
    factory: dict[str, Any] = {}
    if weight is not None:
        factory = {"device": weight.device, "dtype": weight.dtype}
    bias = getattr(old, "bias", None) is not None
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=bias, **factory)
    if isinstance(old, _ConvNd) and not old.transposed and len(old.kernel_size) in _CONVS:
        conv = _CONVS[len(old.kernel_size)]
        return conv(
            old.in_channels, num_classes, old.kernel_size, stride=old.stride,
            padding=old.padding, dilation=old.dilation, bias=bias,
            padding_mode=old.padding_mode, **factory,
        )
    raise TypeError(
        f"cannot read the input size of {name!r}, a {type(old).__name__}: only an "
        "nn.Linear or a convolution can be rebuilt for a number of classes; pass the "
        "new head module instead, e.g. replace_head(model, nn.Linear(in_features, n), "
        f"name={name!r})"
    )

