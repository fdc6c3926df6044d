"""Make a trained digits CNN smaller: dynamic and static int8 quantization, and pruning.

Trains a small CNN on scikit-learn's digits with ``tk.Trainer``, then:

* ``tk.quantize_dynamic``: int8 weights for the Linear layers, no calibration data;
* ``tk.quantize_static``: int8 weights *and* activations (conv-bn-relu fused), calibrated
  on a few training batches. The eager backend is ``torch.ao.quantization``, deprecated
  upstream: expect one ``FutureWarning`` from torchkit saying so (and one ``UserWarning``
  from torch about quantized tensors) on stderr;
* ``tk.prune`` to 70 % global L1 sparsity, one epoch of fine-tuning with the masks in
  place, then ``tk.remove_pruning`` to make it permanent;

and prints ``tk.quantization_report`` (size, CPU latency, accuracy) and ``tk.sparsity``.

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/quantize_and_prune.py           # about half a minute
    python examples/quantize_and_prune.py --smoke   # for CI
"""

from __future__ import annotations

import argparse
import copy

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def digits(limit: int | None) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400][:limit], perm[1400:][:limit]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def show(name: str, report: dict[str, float]) -> None:
    print(f"{name:>8}: size {report['float_bytes'] / 1e3:6.1f} kB -> "
          f"{report['quantized_bytes'] / 1e3:6.1f} kB (x{report['size_ratio']:.2f}), "
          f"latency x{report['latency_ratio']:.2f}, accuracy "
          f"{report['float_accuracy']:.3f} -> {report['quantized_accuracy']:.3f} "
          f"({report['accuracy_change']:+.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="one epoch on a subset")
    args = parser.parse_args()
    epochs, repeats = (1, 3) if args.smoke else (args.epochs, 50)

    tk.seed_everything(0)
    train_set, val_set = digits(limit=256 if args.smoke else None)
    train_loader = DataLoader(train_set, batch_size=64, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=128)
    model = cnn()
    trainer = tk.Trainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3),
                         nn.functional.cross_entropy, metrics={"acc": tk.accuracy},
                         device="cpu", progress=False)
    history = trainer.fit(train_loader, val_loader, epochs=epochs)
    print(f"float model after {epochs} epochs: val_acc {history['val_acc'][-1]:.3f}")
    model.eval()

    # Dynamic: only the Linear layers; activations are quantized on the fly.
    qdynamic = tk.quantize_dynamic(model, backend="eager")
    show("dynamic", tk.quantization_report(model, qdynamic, val_loader, num_repeats=repeats))

    # Static: convs too, with activation ranges calibrated on a few training batches.
    qstatic = tk.quantize_static(model, train_loader, backend="eager", num_batches=8)
    show("static", tk.quantization_report(model, qstatic, val_loader, num_repeats=repeats))

    # Pruning: masks keep the pruned weights at zero while fine-tuning.
    pruned = tk.prune(copy.deepcopy(model), 0.7, method="l1", scope="global")
    tuner = tk.Trainer(pruned, torch.optim.AdamW(pruned.parameters(), lr=1e-3),
                       nn.functional.cross_entropy, metrics={"acc": tk.accuracy},
                       device="cpu", progress=False)
    print(f"pruned to {tk.sparsity(pruned)['total']:.0%} sparsity: val_acc "
          f"{trainer.evaluate(val_loader)['val_acc']:.3f} -> "
          f"{tuner.evaluate(val_loader)['val_acc']:.3f}")
    tuned = tuner.fit(train_loader, val_loader, epochs=1)
    tk.remove_pruning(pruned)  # plain weights again, holding the zeros
    layers = {k: round(v, 3) for k, v in tk.sparsity(pruned).items()}
    print(f"fine-tuned 1 epoch: val_acc {tuned['val_acc'][-1]:.3f}; sparsity {layers}")
    print(f"state_dict keys after remove_pruning: {sorted(pruned.state_dict())[:4]} ...")


if __name__ == "__main__":
    main()
