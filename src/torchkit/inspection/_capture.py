"""Record submodules' outputs (and gradients) with hooks that end with the block; tile them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from torchkit._names import as_patterns, matches, name_hint, unmatched

__all__ = ["Captured", "capture", "feature_grid", "hooked"]


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
    with hooked(modules, grads=grads, detach=detach, device=device) as captured:
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
def hooked(
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
