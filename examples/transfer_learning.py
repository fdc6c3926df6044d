"""Transfer learning, the classic full recipe, on an ImageFolder tree of digits.

Writes scikit-learn's digits as PNG files in ``<out>/data/{train,valid}/<class>/``, then:
``tk.vision.image_folder_loaders`` with the classic augmentation pipeline, a torchvision
ResNet-18, ``tk.freeze`` + ``tk.replace_head``, Adam on ``tk.trainable_parameters`` with
StepLR, ``Trainer.fit`` keeping the best checkpoint, ``tk.vision.predict_image`` for one
image file, the macro F1, and two PNGs: the confusion matrix (``tk.ConfusionMatrix.plot``)
and the misclassified samples (``tk.misclassified`` + ``tk.plot_samples``).

    pip install -e ".[plot,vision]" scikit-learn   # in a clone (README: Install)
    python examples/transfer_learning.py                    # offline: random init
    python examples/transfer_learning.py --weights DEFAULT  # ImageNet weights (downloads)
    python examples/transfer_learning.py --smoke            # seconds, for CI

Offline the backbone is random, so ``layer4`` is trained with the head; with real
weights, ``--train layer4`` is still a good first choice (``--train none``: head only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from torchvision import models

import torchkit as tk


def write_image_folder(root: Path, size: int, per_class: int | None) -> None:
    """Save the digits as RGB PNGs, upscaled to ``size`` px: a train/valid ImageFolder."""
    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).tolist()
    for split, indices in {"train": perm[:1400], "valid": perm[1400:]}.items():
        written = [0] * 10
        for i in indices:
            if per_class is not None and written[y[i]] == per_class:
                continue
            written[y[i]] += 1
            folder = root / split / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[i].reshape(8, 8) * (255 / 16)).astype("uint8")
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)
            image.convert("RGB").save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="e.g. DEFAULT (needs the network)")
    parser.add_argument("--train", default="layer4", help="also train this block, or none")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("runs/transfer_learning"))
    parser.add_argument("--smoke", action="store_true", help="few images, 1 epoch")
    args = parser.parse_args()
    epochs, size = (1, 32) if args.smoke else (args.epochs, args.size)

    tk.seed_everything(0)
    data = args.out / "data"
    write_image_folder(data, size, per_class=3 if args.smoke else None)
    # The classic recipe (resize, rotate, crop, jitter, grayscale, normalise with
    # ImageNet's statistics) but no horizontal flip: a mirrored 2, 3 or 7 is no digit.
    augment = tk.vision.classification_transforms(size, train=True, hflip=0.0)
    train_loader, val_loader, classes = tk.vision.image_folder_loaders(
        data, size=size, batch_size=32, train_transform=augment)
    val_set = val_loader.dataset

    model = models.resnet18(weights=args.weights)  # None: random init, no download
    tk.freeze(model, exclude=None if args.train == "none" else args.train)
    tk.replace_head(model, len(classes))  # a new, trainable fc layer
    print(f"trainable parameters: {tk.count_parameters(model, trainable_only=True):,}")
    optimizer = torch.optim.Adam(tk.trainable_parameters(model), lr=1e-3)
    checkpoints = tk.CheckpointManager(args.out / "checkpoints", keep_last=1, keep_best=1,
                                       monitor="val_loss")
    trainer = tk.Trainer(
        model, optimizer, nn.functional.cross_entropy,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.1),
        metrics={"acc": tk.accuracy}, checkpoint=checkpoints, progress=not args.smoke,
    )
    history = trainer.fit(train_loader, val_loader, epochs=epochs)
    print(f"best val_loss {history.best('val_loss')}")

    checkpoints.load("best", {"model": model})  # the best epoch's weights
    print(f"best checkpoint {checkpoints.best()}: {trainer.evaluate(val_loader)}")

    # Predict one image from disk, exactly as a user's new image would be.
    path = Path(val_set.samples[0][0])
    top = tk.vision.predict_image(model, path, val_set.transform, classes=classes, topk=3)
    print(f"{path.name}: true {path.parent.name}, predicted "
          f"{', '.join(f'{name} (p={p:.2f})' for name, p in top)}")

    cm = tk.ConfusionMatrix(len(classes))
    cm.update(trainer.predict(val_loader), torch.tensor(val_set.targets))
    cm.plot(args.out / "confusion_matrix.png", class_names=classes)
    print(f"macro F1 {cm.f1():.3f}; per-class recall {cm.recall(None).tolist()}")
    wrong = tk.misclassified(model, val_loader)
    shown = {key: value[:16] for key, value in wrong.items()}
    tk.plot_samples(shown["inputs"], mean=tk.vision.IMAGENET_MEAN, std=tk.vision.IMAGENET_STD,
                    titles=[f"true {classes[t]}, pred {classes[p]}"
                            for t, p in zip(shown["targets"], shown["preds"])],
                    ncols=4, path=args.out / "misclassified.png")
    print(f"{len(wrong['indices'])} of {len(val_set)} validation images misclassified; "
          f"plots in {args.out}/confusion_matrix.png and misclassified.png")


if __name__ == "__main__":
    main()
