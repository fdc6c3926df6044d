"""tk.vision: the notes' transforms, seeded ImageFolder loaders, one-image prediction."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torchkit as tk

ROOT = Path(__file__).resolve().parent.parent


def names(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def write_digits(root: Path, classes: dict[str, int], per_split: dict[str, int]) -> None:
    """Save digits as 20 px RGB PNGs in root/<split>/<class name>/."""
    x, y = load_digits(return_X_y=True)
    for name, digit in classes.items():
        rows = np.flatnonzero(y == digit)
        start = 0
        for split, count in per_split.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in rows[start:start + count]:
                pixels = (x[i].reshape(8, 8) * (255 / 16)).astype("uint8")
                image = Image.fromarray(pixels).resize((20, 20), Image.BILINEAR)
                image.convert("RGB").save(folder / f"{i:04d}.png")
            start += count


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    # Created in this order; ImageFolder (and so the labels) sorts them by name.
    write_digits(root, {"zero": 0, "one": 1, "seven": 7}, {"train": 6, "valid": 3})
    return root


# --- classification_transforms --------------------------------------------------------


def test_train_transforms_are_the_notes_recipe_with_options():
    tf = tk.vision.classification_transforms(224, train=True)
    assert names(tf) == ["Resize", "RandomRotation", "CenterCrop", "RandomHorizontalFlip",
                         "ColorJitter", "RandomGrayscale", "ToTensor", "Normalize"]
    resize, rotation, crop, hflip, jitter, gray, _, normalize = tf.transforms
    assert resize.size == 256 and crop.size == (224, 224)
    assert rotation.degrees == [-10.0, 10.0] and hflip.p == 0.5 and gray.p == 0.1
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.8, 1.2)
    assert normalize.mean == list(tk.vision.IMAGENET_MEAN)
    assert normalize.std == list(tk.vision.IMAGENET_STD)
    custom = tk.vision.classification_transforms(
        32, train=True, resize=40, rotation=30, hflip=0, vflip=0.25, color_jitter=0.5,
        grayscale=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert names(custom) == ["Resize", "RandomRotation", "CenterCrop", "RandomVerticalFlip",
                             "ColorJitter", "RandomGrayscale", "ToTensor", "Normalize"]
    assert custom.transforms[0].size == 40 and custom.transforms[1].degrees == [-30.0, 30.0]
    assert custom.transforms[3].p == 0.25 and custom.transforms[4].brightness == (0.5, 1.5)
    out = custom(Image.new("RGB", (50, 44), (200, 10, 10)))
    assert out.shape == (3, 32, 32)
    # grayscale=1.0: always gray, so the three channels agree (after the same normalisation)
    torch.testing.assert_close(out[0], out[1])
    bare = tk.vision.classification_transforms(32, train=True, rotation=0, hflip=0,
                                               color_jitter=0, grayscale=0)
    assert names(bare) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]


def test_valid_transforms_resize_crop_and_normalise():
    tf = tk.vision.classification_transforms(24, train=False, mean=(0.5, 0.5, 0.5),
                                             std=(0.5, 0.25, 0.1))
    assert names(tf) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    for shape in [(24, 24), (60, 30), (31, 90)]:
        out = tf(Image.new("RGB", shape, (255, 255, 255)))
        assert out.shape == (3, 24, 24)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 2.0, 5.0]))  # (1 - .5) / std
    torch.manual_seed(3)
    train = tk.vision.classification_transforms(24, train=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), "uint8"))
    first = train(image)
    torch.manual_seed(3)
    torch.testing.assert_close(train(image), first)  # augmentation follows torch's seed


def test_transform_errors():
    with pytest.raises(ValueError, match=r"train must be True or False, got 1; size must be an "
                                         r"int >= 1, got 0"):
        tk.vision.classification_transforms(0, train=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"resize must be an int >= size \(32\), got 16"):
        tk.vision.classification_transforms(32, train=False, resize=16)
    with pytest.raises(ValueError, match=r"mean must hold 3 numbers \(R, G, B\), got \[0.5\]; "
                                         r"rotation must be a number in \[0, 180\], got -1; "
                                         r"hflip must be a number in \[0, 1\], got 1.5"):
        tk.vision.classification_transforms(32, train=True, mean=[0.5], hflip=1.5, rotation=-1)
    with pytest.raises(TypeError, match="train"):
        tk.vision.classification_transforms(32)  # type: ignore[call-arg]


# --- image_folder_loaders -------------------------------------------------------------


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def test_image_folder_loaders_class_order_and_shapes(digit_folder):
    train, valid, classes = tk.vision.image_folder_loaders(digit_folder, size=16,
                                                           batch_size=4)
    assert classes == ["one", "seven", "zero"]  # ImageFolder's (sorted) order
    assert train.dataset.classes == valid.dataset.classes == classes
    images, labels = epoch(valid)
    assert images.shape == (9, 3, 16, 16)
    expected = [classes.index(Path(path).parent.name) for path, _ in valid.dataset.samples]
    assert labels.tolist() == expected == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # not shuffled
    assert names(valid.dataset.transform) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert "RandomRotation" in names(train.dataset.transform)
    assert epoch(train)[0].shape == (18, 3, 16, 16)


def test_image_folder_loaders_are_seeded(digit_folder):
    def run(seed: int, workers: int = 0):
        train, _, _ = tk.vision.image_folder_loaders(digit_folder, size=16, batch_size=5,
                                                     seed=seed, num_workers=workers)
        torch.manual_seed(123)  # the global seed must not matter
        return epoch(train)

    a, b, other = run(0), run(0), run(1)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same order, same augmentations
    assert a[1].tolist() != other[1].tolist()
    with_workers = run(0, workers=2)
    torch.testing.assert_close(with_workers, run(0, workers=2), rtol=0, atol=0)


class RandomValues(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([random.random(), float(np.random.rand())])


def test_image_folder_loaders_seed_the_workers_python_and_numpy(digit_folder):
    train, _, _ = tk.vision.image_folder_loaders(digit_folder, size=16)
    assert train.worker_init_fn is not None

    def values(seed: int) -> torch.Tensor:
        loader = DataLoader(RandomValues(), batch_size=1, num_workers=2,
                            worker_init_fn=train.worker_init_fn,
                            generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(loader))

    first = values(0)
    torch.testing.assert_close(values(0), first, rtol=0, atol=0)
    assert not torch.equal(values(1), first)
    assert not torch.equal(first[0], first[1])  # the two workers differ


def test_image_folder_loaders_errors(tmp_path, digit_folder):
    with pytest.raises(FileNotFoundError, match=r"missing train_dir: .*train, valid_dir: "):
        tk.vision.image_folder_loaders(tmp_path)
    write_digits(tmp_path, {"a": 0}, {"train": 1})
    write_digits(tmp_path, {"b": 1}, {"valid": 1})
    with pytest.raises(ValueError, match=r"must hold the same class folders .*got \['a'\] and "
                                         r"\['b'\]"):
        tk.vision.image_folder_loaders(tmp_path)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        tk.vision.image_folder_loaders(digit_folder, batch_size=0)
    with pytest.raises(ValueError, match="seed must be an int, got 'x'"):
        tk.vision.image_folder_loaders(digit_folder, seed="x")  # type: ignore[arg-type]
    train, valid, _ = tk.vision.image_folder_loaders(digit_folder, train_dir="valid",
                                                     valid_dir="train", size=8)
    assert len(train.dataset) == 9 and len(valid.dataset) == 18


def test_image_folder_loaders_take_other_transforms(digit_folder):
    augment = tk.vision.classification_transforms(12, train=True, hflip=0.0)
    plain = tk.vision.classification_transforms(10, train=False)
    train, valid, _ = tk.vision.image_folder_loaders(digit_folder, train_transform=augment,
                                                     valid_transform=plain)
    assert train.dataset.transform is augment and valid.dataset.transform is plain
    assert next(iter(valid))[0].shape[-2:] == (10, 10)


# --- predict_image --------------------------------------------------------------------


class Probe(nn.Module):
    """Records the mode and grad state of each call; scores from the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.dropout = nn.Dropout(0.9)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.dropout(self.linear(x.mean(dim=(2, 3))))


def test_predict_image_from_a_path_or_a_pil_image(tmp_path):
    model = Probe().train()
    tf = tk.vision.classification_transforms(8, train=False)
    image = Image.new("RGB", (12, 10), (30, 140, 220))
    image.convert("L").save(tmp_path / "gray.png")  # converted to RGB when opened
    expected = model.linear(tf(image).mean(dim=(1, 2))).softmax(0).detach()
    top = tk.vision.predict_image(model, image, tf, classes=["a", "b", "c", "d"], topk=4)
    order = expected.argsort(descending=True).tolist()
    assert [name for name, _ in top] == [["a", "b", "c", "d"][i] for i in order]
    assert [p for _, p in top] == pytest.approx(expected[order].tolist())
    assert model.calls == [(False, False)] and model.training and model.dropout.training
    from_path = tk.vision.predict_image(model, tmp_path / "gray.png", tf)
    assert len(from_path) == 1 and isinstance(from_path[0][0], int)
    assert from_path[0][1] == pytest.approx(max(
        model.linear(tf(Image.open(tmp_path / "gray.png").convert("RGB")).mean(dim=(1, 2)))
        .softmax(0).tolist()))
    assert tk.vision.predict_image(model, str(tmp_path / "gray.png"), tf) == from_path


def test_predict_image_errors(tmp_path):
    model = Probe()
    tf = tk.vision.classification_transforms(8, train=False)
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"topk must be an int in \[1, 4\] \(the number of "
                                         r"classes\), got 5; classes must hold 4 names"):
        tk.vision.predict_image(model, image, tf, topk=5, classes=["a"])
    with pytest.raises(TypeError, match="image must be a path or a PIL image, got Tensor"):
        tk.vision.predict_image(model, torch.zeros(3, 8, 8), tf)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transform must return a tensor, got Image"):
        tk.vision.predict_image(model, image, lambda im: im)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        tk.vision.predict_image(None, image, tf)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        tk.vision.predict_image(model, tmp_path / "missing.png", tf)


def test_vision_needs_only_the_vision_extra(digit_folder, monkeypatch):
    """Without matplotlib, scikit-learn or tensorboard, the whole module still works.

    ``import torchkit`` imports none of them (tests/test_package.py); here any import of
    them inside a tk.vision function would raise.
    """
    for name in ("matplotlib", "matplotlib.figure", "sklearn", "tensorboard", "scipy",
                 "pandas"):
        monkeypatch.setitem(sys.modules, name, None)
    train, valid, classes = tk.vision.image_folder_loaders(digit_folder, size=8)
    images, _ = next(iter(train))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    path = valid.dataset.samples[0][0]
    top = tk.vision.predict_image(model, path, valid.dataset.transform, classes=classes, topk=2)
    assert (classes, tuple(images.shape), len(top)) == (["one", "seven", "zero"],
                                                         (18, 3, 8, 8), 2)
    extras = (ROOT / "pyproject.toml").read_text()
    assert 'vision = ["torchvision>=0.19", "pillow' in extras
