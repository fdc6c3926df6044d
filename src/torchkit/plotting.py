"""Pictures of samples: a grid of images with their labels, heat maps on top (matplotlib).

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot, so drawing
works headless and leaves no global figure open; save them with ``path=`` or log them
with :meth:`~torchkit.TensorBoardLogger.log_figure`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from torchkit._utils import require

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_samples"]

_log = logging.getLogger(__name__)

# How far outside [0, 1] pixel values may stray (float error) before plot_samples warns.
_RANGE_SLACK = 1e-3


def plot_samples(
    images: torch.Tensor,
    *,
    titles: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    ncols: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    overlay: torch.Tensor | None = None,
    overlay_alpha: float = 0.5,
) -> Figure:
    """Draw images in a grid, each with its title (e.g. true and predicted class).

    Images normalised by a ``Normalize(mean, std)`` transform are shown as they were
    before it when given the same ``mean`` and ``std`` (``x * std + mean`` per
    channel). Pixel values are then shown on a ``[0, 1]`` scale (values outside are
    clipped, with a warning when far outside: a sign that ``mean``/``std`` are missing).

    Args:
        images: ``(N, C, H, W)`` with 1 or 3 channels, or ``(N, H, W)`` grayscale.
        titles: One title per image (class names, ``"true 3 / pred 5"``, ...).
        path: Save the figure there (format from the suffix, e.g. ``.png``).
        ncols: Images per row (fewer when there are fewer images).
        mean: Per-channel mean of the normalisation to undo (one number per channel).
        std: Per-channel standard deviation of the normalisation to undo.
        overlay: ``(N, H, W)`` heat maps in ``[0, 1]`` drawn over the images (e.g.
            from :func:`~torchkit.grad_cam`), with the ``"jet"`` colour map.
        overlay_alpha: The opacity of ``overlay``.

    Returns:
        The figure drawn into.

    Raises:
        ImportError: If matplotlib is not installed.
        TypeError: If ``images`` or ``overlay`` is not a tensor.
        ValueError: If a shape, the number of titles, ``ncols``, ``mean``/``std`` or
            ``overlay_alpha`` does not fit.

    Example:
        >>> images = torch.rand(3, 3, 8, 8)
        >>> fig = tk.plot_samples(images, titles=["cat", "dog", "cat"], ncols=2)
        >>> [ax.get_title() for ax in fig.axes]
        ['cat', 'dog', 'cat']
    """
    pixels = _prepare(images, mean=mean, std=std)
    n = pixels.shape[0]
    names = _check(n, pixels.shape[1:3], titles=titles, ncols=ncols, overlay=overlay,
                   overlay_alpha=overlay_alpha)
    figure_module = require("matplotlib.figure", extra="plot")
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig: Figure = figure_module.Figure(figsize=(1.7 * cols, 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    heat = None if overlay is None else overlay.detach().float().cpu()
    for i, ax in enumerate(axes.flat):
        if i >= n:
            fig.delaxes(ax)
            continue
        ax.set_axis_off()
        image = pixels[i].numpy()
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(image)
        if heat is not None:
            ax.imshow(heat[i].numpy(), cmap="jet", alpha=float(overlay_alpha), vmin=0.0,
                      vmax=1.0)
        if names is not None:
            ax.set_title(names[i], fontsize=9)
    if path is not None:
        fig.savefig(os.fspath(path))
        _log.info("saved %d samples to %s", n, path)
    return fig


def _prepare(
    images: torch.Tensor, *, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """Return ``(N, H, W, C)`` float pixels in ``[0, 1]`` on the CPU, normalisation undone."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor (N, C, H, W) or (N, H, W), got "
                        f"{type(images).__name__}")
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1 and C = 1 or 3, "
                         f"or (N, H, W), got {tuple(images.shape)}; show a feature map "
                         "with tk.feature_grid(features)")
    channels = x.shape[1]
    stats = []
    for arg, value, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        if value is None:
            stats.append(torch.full((channels,), default))
            continue
        values = [value] if isinstance(value, numbers.Real) else list(value)
        if len(values) != channels or not all(isinstance(v, numbers.Real) for v in values):
            raise ValueError(f"{arg} must hold {channels} numbers (one per channel), got "
                             f"{value!r}")
        stats.append(torch.tensor([float(v) for v in values]))
    x = x * stats[1].view(1, -1, 1, 1) + stats[0].view(1, -1, 1, 1)
    low, high = float(x.min()), float(x.max())
    if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
        warnings.warn(
            f"plot_samples: pixel values span [{low:.3g}, {high:.3g}], outside [0, 1], and "
            "are clipped; pass the mean= and std= of the Normalize transform to undo it",
            stacklevel=3,
        )
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1)


def _check(
    n: int, size: tuple[int, ...] | torch.Size, *, titles: Sequence[str] | None, ncols: int,
    overlay: torch.Tensor | None, overlay_alpha: float,
) -> list[str] | None:
    problems = []
    names = None if titles is None else [str(t) for t in titles]
    if names is not None and (isinstance(titles, str) or len(names) != n):
        problems.append(f"titles must hold one title per image ({n}), got {titles!r}")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        problems.append(f"ncols must be an int >= 1, got {ncols!r}")
    if overlay is not None:
        if not isinstance(overlay, torch.Tensor):
            raise TypeError(f"overlay must be a tensor (N, H, W), got {type(overlay).__name__}")
        if tuple(overlay.shape) != (n, *size):
            problems.append(f"overlay must have shape {(n, *size)} to match the images, got "
                            f"{tuple(overlay.shape)}")
    if isinstance(overlay_alpha, bool) or not isinstance(overlay_alpha, numbers.Real) or not (
        0 <= overlay_alpha <= 1
    ):
        problems.append(f"overlay_alpha must be a number in [0, 1], got {overlay_alpha!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return names
