"""Transfer learning, the classic full recipe, on an ImageFolder tree of digits.

Writes scikit-learn's digits as PNG files in ``<out>/data/{train,val}/<class>/``, then:
the classic augmentation pipeline, a torchvision ResNet-18, ``tk.freeze`` +
``tk.replace_head``, Adam on ``tk.trainable_parameters`` with StepLR, ``Trainer.fit``
keeping the best checkpoint, a prediction for one image file, and two PNGs: the
confusion matrix (``tk.ConfusionMatrix.plot``) and the misclassified samples.

    pip install "torchkit[plot]" torchvision scikit-learn
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
from matplotlib.figure import Figure
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models, transforms

import torchkit as tk

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, for its weights


def write_image_folder(root: Path, size: int, per_class: int | None) -> None:
    """Save the digits as RGB PNGs, upscaled to ``size`` px: a train/val ImageFolder."""
    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).tolist()
    for split, indices in {"train": perm[:1400], "val": perm[1400:]}.items():
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


def transforms_for(size: int) -> tuple[transforms.Compose, transforms.Compose]:
    train = transforms.Compose([
        transforms.Resize(size + size // 8),
        transforms.RandomRotation(10),
        transforms.CenterCrop(size),
        # transforms.RandomHorizontalFlip(): left out on purpose. It is the classic
        # choice for photos, but a mirrored 2, 3 or 7 is not that digit any more.
        transforms.ColorJitter(brightness=0.3, contrast=0.3),
        transforms.RandomGrayscale(p=0.1),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    val = transforms.Compose([
        transforms.Resize(size + size // 8), transforms.CenterCrop(size),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD),
    ])
    return train, val


def plot_misclassified(val_set: datasets.ImageFolder, preds: torch.Tensor, path: Path) -> int:
    """Save up to 16 misclassified validation images with true/predicted labels."""
    targets = torch.tensor(val_set.targets)
    wrong = (preds != targets).nonzero().flatten()[:16].tolist()
    rows = max(1, -(-len(wrong) // 4))
    fig = Figure(figsize=(8, 2.2 * rows), layout="tight")  # not pyplot: no display needed
    for slot, i in enumerate(wrong):
        ax = fig.add_subplot(rows, 4, slot + 1)
        ax.imshow(Image.open(val_set.samples[i][0]))
        ax.set_title(f"true {val_set.classes[targets[i]]}, "
                     f"pred {val_set.classes[preds[i]]}", fontsize=8)
        ax.axis("off")
    fig.savefig(path)
    return int((preds != targets).sum())


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
    train_tf, val_tf = transforms_for(size)
    train_set = datasets.ImageFolder(data / "train", transform=train_tf)
    val_set = datasets.ImageFolder(data / "val", transform=val_tf)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=128)

    model = models.resnet18(weights=args.weights)  # None: random init, no download
    tk.freeze(model, exclude=None if args.train == "none" else args.train)
    tk.replace_head(model, len(train_set.classes))  # a new, trainable fc layer
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
    batch = val_tf(Image.open(path).convert("RGB")).unsqueeze(0)  # (1, 3, size, size)
    model.eval()
    with torch.no_grad():
        probs = model(batch.to(trainer.device)).softmax(1)[0]
    print(f"{path.name}: predicted {val_set.classes[probs.argmax()]} "
          f"(p={probs.max():.2f}), true {path.parent.name}")

    outputs = trainer.predict(val_loader)
    cm = tk.ConfusionMatrix(len(val_set.classes))
    cm.update(outputs, torch.tensor(val_set.targets))
    cm.plot(args.out / "confusion_matrix.png", class_names=val_set.classes)
    wrong = plot_misclassified(val_set, outputs.argmax(1), args.out / "misclassified.png")
    print(f"{wrong} of {len(val_set)} validation images misclassified; "
          f"plots in {args.out}/confusion_matrix.png and misclassified.png")


if __name__ == "__main__":
    main()
