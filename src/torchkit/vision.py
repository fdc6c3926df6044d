"""Image classification plumbing: the classic transforms, ImageFolder loaders, one prediction.

The pieces every image workflow starts and ends with (needs the ``vision`` extra:
``pip install "torchkit[vision]"``, torchvision and Pillow): :func:`classification_transforms`
(train-time augmentation, or the plain resize and normalise for validation),
:func:`image_folder_loaders` over ``root/train`` and ``root/valid``, and
:func:`predict_image` for one image file. Use them as ``tk.vision.predict_image``;
torchvision is imported only when a function is called.
"""

from __future__ import annotations

import logging
import numbers
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from torchkit._utils import require

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "classification_transforms",
    "image_folder_loaders",
    "predict_image",
]

_log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""The per-channel mean of ImageNet: normalise with it for torchvision's pretrained weights."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""The per-channel standard deviation of ImageNet (see :data:`IMAGENET_MEAN`)."""


def classification_transforms(
    size: int = 224,
    *,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: int | None = None,
    rotation: float = 10.0,
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float = 0.2,
    grayscale: float = 0.1,
) -> Callable[[Any], torch.Tensor]:
    """Return the classic transform from a PIL image to a normalised ``(3, size, size)`` tensor.

    With ``train=True``: ``Resize(resize)``, ``RandomRotation(rotation)``,
    ``CenterCrop(size)``, ``RandomHorizontalFlip(hflip)``, ``RandomVerticalFlip(vflip)``,
    ``ColorJitter(brightness=contrast=saturation=color_jitter)``,
    ``RandomGrayscale(grayscale)``, ``ToTensor()``, ``Normalize(mean, std)``; a step
    whose amount is 0 is left out. With ``train=False``: ``Resize(resize)``,
    ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(mean, std)``. ``Resize`` scales
    the shorter side, so the crop sees the image's centre at any aspect ratio.

    Args:
        size: The side of the square output.
        train: Augment (for training) or not (for validation and prediction).
        mean: Per-channel mean to normalise with (ImageNet's for its weights).
        std: Per-channel standard deviation to normalise with.
        resize: The shorter side before cropping (default: ``round(size * 8 / 7)``,
            256 for 224).
        rotation: Rotate by a random angle in ``[-rotation, rotation]`` degrees.
        hflip: The probability of a horizontal flip (0 for digits and text).
        vflip: The probability of a vertical flip.
        color_jitter: How much brightness, contrast and saturation vary (a factor in
            ``[1 - color_jitter, 1 + color_jitter]``).
        grayscale: The probability of turning the image gray (3 channels kept).

    Returns:
        A ``torchvision.transforms.Compose``.

    Raises:
        ImportError: If torchvision is not installed.
        ValueError: If a size, angle or probability is out of range, or ``mean``/``std``
            do not hold 3 numbers.

    Example:
        >>> tf = tk.vision.classification_transforms(32, train=False)
        >>> [type(t).__name__ for t in tf.transforms]
        ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
        >>> from PIL import Image
        >>> tf(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """
    resize = round(size * 8 / 7) if resize is None and _is_int(size) else resize
    _check_options(size=size, train=train, mean=mean, std=std, resize=resize,
                   rotation=rotation, hflip=hflip, vflip=vflip, color_jitter=color_jitter,
                   grayscale=grayscale)
    t = require("torchvision.transforms", extra="vision")
    steps: list[Any] = [t.Resize(resize)]
    if train:
        steps += [t.RandomRotation(rotation)] if rotation else []
        steps.append(t.CenterCrop(size))
        steps += [t.RandomHorizontalFlip(hflip)] if hflip else []
        steps += [t.RandomVerticalFlip(vflip)] if vflip else []
        if color_jitter:
            steps.append(t.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                                       saturation=color_jitter))
        steps += [t.RandomGrayscale(grayscale)] if grayscale else []
    else:
        steps.append(t.CenterCrop(size))
    steps += [t.ToTensor(), t.Normalize(list(mean), list(std))]
    composed: Callable[[Any], torch.Tensor] = t.Compose(steps)
    return composed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_options(*, size: Any, train: Any, mean: Any, std: Any, resize: Any,
                   **amounts: Any) -> None:
    problems = []
    if not isinstance(train, bool):
        problems.append(f"train must be True or False, got {train!r}")
    if not _is_int(size) or size < 1:
        problems.append(f"size must be an int >= 1, got {size!r}")
    elif not _is_int(resize) or resize < size:
        problems.append(f"resize must be an int >= size ({size}), got {resize!r}")
    for arg, value in (("mean", mean), ("std", std)):
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3 or not all(
            isinstance(v, numbers.Real) for v in value
        ):
            problems.append(f"{arg} must hold 3 numbers (R, G, B), got {value!r}")
    for arg, value in amounts.items():
        top = 180.0 if arg == "rotation" else 1.0
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            0 <= float(value) <= top
        ):
            problems.append(f"{arg} must be a number in [0, {top:g}], got {value!r}")
    if problems:
        raise ValueError("; ".join(problems))


def image_folder_loaders(
    root: str | os.PathLike[str],
    *,
    size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    seed: int = 0,
    train_dir: str = "train",
    valid_dir: str = "valid",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train_transform: Callable[[Any], Any] | None = None,
    valid_transform: Callable[[Any], Any] | None = None,
) -> tuple[DataLoader[Any], DataLoader[Any], list[str]]:
    """Return ``(train_loader, valid_loader, class_names)`` over an ImageFolder tree.

    ``root/train/<class>/*.png`` and ``root/valid/<class>/*.png`` become two
    torchvision ``ImageFolder`` datasets with the two :func:`classification_transforms`
    (train: augmented; valid: ``size`` x ``size``, not augmented). ``class_names`` are
    the class folders in ``ImageFolder`` order (sorted): label ``i`` is
    ``class_names[i]``. The training loader shuffles with a ``torch.Generator`` seeded
    with ``seed`` and seeds each worker's ``random``, numpy and torch generators, so
    the same ``seed`` gives the same batches and augmentations, with workers or without.

    Args:
        root: The folder holding ``train_dir`` and ``valid_dir``.
        size: The side of the square images.
        batch_size: Samples per batch (both loaders; the last batch may be smaller).
        num_workers: Loader worker processes.
        seed: Seeds shuffling and the workers' augmentations.
        train_dir: The training subfolder's name.
        valid_dir: The validation subfolder's name.
        mean: Per-channel mean to normalise with.
        std: Per-channel standard deviation to normalise with.
        train_transform: Use this instead of ``classification_transforms(size,
            train=True, mean=mean, std=std)``, e.g. one with other augmentation options.
        valid_transform: Use this instead of the validation transform.

    Returns:
        The two loaders and the class names.

    Raises:
        ImportError: If torchvision is not installed.
        FileNotFoundError: If a subfolder is missing.
        ValueError: If the two subfolders hold different classes, or an option is out
            of range.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for split in ("train", "valid"):
        ...     for name in ("cat", "dog"):
        ...         (root / split / name).mkdir(parents=True)
        ...         Image.new("RGB", (40, 40)).save(root / split / name / "0.png")
        >>> train, valid, classes = tk.vision.image_folder_loaders(root, size=32)
        >>> classes, next(iter(valid))[0].shape
        (['cat', 'dog'], torch.Size([2, 3, 32, 32]))
    """
    for arg, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    if not _is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    datasets = require("torchvision.datasets", extra="vision")
    folders = {arg: Path(root) / sub for arg, sub in (("train_dir", train_dir),
                                                      ("valid_dir", valid_dir))}
    missing = [f"{arg}: {path}" for arg, path in folders.items() if not path.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"image_folder_loaders needs {root}/{train_dir} and {root}/{valid_dir}, each "
            f"with one subfolder per class; missing {', '.join(missing)}"
        )
    if train_transform is None:
        train_transform = classification_transforms(size, train=True, mean=mean, std=std)
    if valid_transform is None:
        valid_transform = classification_transforms(size, train=False, mean=mean, std=std)
    train_set = datasets.ImageFolder(folders["train_dir"], transform=train_transform)
    valid_set = datasets.ImageFolder(folders["valid_dir"], transform=valid_transform)
    if train_set.classes != valid_set.classes:
        raise ValueError(
            f"{folders['train_dir']} and {folders['valid_dir']} must hold the same class "
            f"folders (labels follow their sorted names), got {train_set.classes} and "
            f"{valid_set.classes}"
        )
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers,
                              "worker_init_fn": _seed_worker}
    train_loader = DataLoader(train_set, shuffle=True,
                              generator=torch.Generator().manual_seed(seed), **common)
    valid_loader = DataLoader(valid_set, shuffle=False,
                              generator=torch.Generator().manual_seed(seed), **common)
    _log.info("ImageFolder %s: %d training and %d validation images, %d classes", root,
              len(train_set), len(valid_set), len(train_set.classes))
    return train_loader, valid_loader, list(train_set.classes)


def _seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in a loader worker from its torch seed (set by the loader)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torchvision
        return
    numpy.random.seed(seed)


def predict_image(
    model: nn.Module,
    image: str | os.PathLike[str] | Image,
    transform: Callable[[Any], torch.Tensor],
    *,
    classes: Sequence[str] | None = None,
    topk: int = 1,
    mode: str | None = "RGB",
) -> list[tuple[str | int, float]]:
    """Predict one image: open, transform, add a batch dimension, softmax, top ``k``.

    The model runs in eval mode under ``torch.no_grad()`` on the device of its first
    parameter; each module's mode is restored afterwards.

    Args:
        model: A classifier returning ``(1, num_classes)`` scores.
        image: A path to an image file, or a PIL image.
        transform: From a PIL image to a ``(C, H, W)`` tensor, e.g.
            ``classification_transforms(size, train=False)``.
        classes: The class names (e.g. from :func:`image_folder_loaders`); ``None``
            reports class indices.
        topk: How many of the most probable classes to return.
        mode: Convert the image to this PIL mode first (``None``: leave it).

    Returns:
        ``[(class, probability), ...]``, most probable first.

    Raises:
        ImportError: If Pillow is not installed.
        TypeError: If ``model`` or ``image`` has the wrong type, or ``transform`` does
            not return a tensor.
        ValueError: If ``topk`` or ``classes`` does not fit the model's outputs.

    Example:
        >>> from PIL import Image
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
        >>> with torch.no_grad():  # a model that always prefers class 1
        ...     _ = net[1].weight.zero_(), net[1].bias.copy_(torch.tensor([0.0, 1.0]))
        >>> tf = tk.vision.classification_transforms(8, train=False)
        >>> image = Image.new("RGB", (10, 10))
        >>> tk.vision.predict_image(net, image, tf, classes=["cat", "dog"], topk=2)
        [('dog', 0.731...), ('cat', 0.268...)]
    """
    pil = require("PIL.Image", extra="vision")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(image, (str, os.PathLike)):
        with pil.open(image) as opened:
            picture = opened.convert(mode) if mode else opened.copy()
    elif isinstance(image, pil.Image):
        picture = image.convert(mode) if mode else image
    else:
        raise TypeError(f"image must be a path or a PIL image, got {type(image).__name__}")
    x = transform(picture)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"transform must return a tensor, got {type(x).__name__}; end it "
                        "with ToTensor()")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            probs = model(x.unsqueeze(0).to(device)).softmax(dim=1)[0].cpu()
    finally:
        for module, training in modes:
            module.training = training
    return _top(probs, classes, topk)


def _top(probs: torch.Tensor, classes: Sequence[str] | None,
         topk: int) -> list[tuple[str | int, float]]:
    n = probs.numel()
    problems = []
    if not _is_int(topk) or not 1 <= topk <= n:
        problems.append(f"topk must be an int in [1, {n}] (the number of classes), got "
                        f"{topk!r}")
    if classes is not None and (isinstance(classes, str) or len(classes) != n):
        problems.append(f"classes must hold {n} names, one per model output, got {classes!r}")
    if problems:
        raise ValueError("; ".join(problems))
    values, indices = probs.topk(topk)
    return [(int(i) if classes is None else classes[int(i)], float(v))
            for v, i in zip(values.tolist(), indices.tolist())]
