"""plot_samples: the pixels shown are the images before Normalize, titled, saved as PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import torchkit as tk


def shown(fig: Figure) -> list[np.ndarray]:
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes]


def test_plot_samples_writes_a_png_and_returns_the_figure(tmp_path):
    images = torch.rand(5, 3, 12, 12)
    path = tmp_path / "samples.png"
    fig = tk.plot_samples(images, titles=[f"class {i}" for i in range(5)], path=path, ncols=3)
    assert isinstance(fig, Figure)
    assert path.stat().st_size > 0
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (round(fig.get_figwidth() * fig.dpi),
                                round(fig.get_figheight() * fig.dpi))
        assert len(np.unique(np.asarray(picture.convert("L")))) > 10  # not a blank page
    assert [ax.get_title() for ax in fig.axes] == [f"class {i}" for i in range(5)]
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes] == [(2, 3)] * 5
    for picture, image in zip(shown(fig), images):
        np.testing.assert_allclose(picture, image.permute(1, 2, 0).numpy(), rtol=0, atol=1e-7)


def test_plot_samples_undoes_the_normalisation():
    mean, std = tk.vision.IMAGENET_MEAN, tk.vision.IMAGENET_STD
    images = torch.rand(2, 3, 6, 6)
    normalised = (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    fig = tk.plot_samples(normalised, mean=mean, std=std)
    for picture, image in zip(shown(fig), images):
        np.testing.assert_allclose(picture, image.permute(1, 2, 0).numpy(), atol=1e-6)
    with pytest.warns(UserWarning, match=r"outside \[0, 1\], and are clipped; pass the mean= "
                                         r"and std= of the Normalize transform"):
        fig = tk.plot_samples(normalised)
    assert all(picture.min() >= 0 and picture.max() <= 1 for picture in shown(fig))


def test_plot_samples_grayscale_uint8_and_overlay(tmp_path):
    gray = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    heat = torch.rand(3, 7, 9)
    fig = tk.plot_samples(gray, overlay=heat, overlay_alpha=0.3, path=tmp_path / "cam.png")
    for ax, image, cam in zip(fig.axes, gray, heat):
        base, top = ax.images
        np.testing.assert_allclose(np.asarray(base.get_array()), image.numpy() / 255, atol=1e-6)
        assert base.get_cmap().name == "gray"
        np.testing.assert_allclose(np.asarray(top.get_array()), cam.numpy())
        assert top.get_alpha() == 0.3 and top.get_cmap().name == "jet"
    with Image.open(tmp_path / "cam.png") as picture:
        picture.verify()
    single = tk.plot_samples(torch.rand(1, 1, 4, 4))
    assert len(single.axes) == 1 and single.axes[0].get_title() == ""


def test_plot_samples_errors():
    with pytest.raises(TypeError, match="images must be a tensor"):
        tk.plot_samples(np.zeros((1, 3, 4, 4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"C = 1 or 3, or \(N, H, W\), got \(2, 5, 4, 4\); "
                                         r"show a feature map with tk.feature_grid"):
        tk.plot_samples(torch.rand(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"mean must hold 3 numbers \(one per channel\)"):
        tk.plot_samples(torch.rand(2, 3, 4, 4), mean=[0.5])
    with pytest.raises(ValueError, match=r"titles must hold one title per image \(2\), got "
                                         r"\['a'\]; ncols must be an int >= 1, got 0; overlay "
                                         r"must have shape \(2, 4, 4\).*overlay_alpha must"):
        tk.plot_samples(torch.rand(2, 3, 4, 4), titles=["a"], ncols=0,
                        overlay=torch.rand(2, 4, 5), overlay_alpha=2)
    with pytest.raises(TypeError, match="overlay must be a tensor"):
        tk.plot_samples(torch.rand(2, 3, 4, 4), overlay=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"N >= 1"):
        tk.plot_samples(torch.rand(0, 3, 4, 4))
