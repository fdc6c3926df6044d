"""Subclass tk.Trainer for a task that is not classification: a denoising autoencoder.

The default step computes ``loss_fn(model(inputs), targets)``. Here the batches hold
clean digits only, and each training step draws fresh noise, reconstructs the clean
image from the noisy one and returns the loss plus what the metrics need. Validation
uses noise fixed once (so epochs are comparable) and reports a PSNR metric. Everything
else (accumulation, clipping, checkpoints, progress, early stopping) is still the
Trainer's; only ``train_step``, ``eval_step`` and ``predict_step`` are overridden.

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/custom_step.py            # a few seconds
    python examples/custom_step.py --smoke    # for CI
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk

NOISE = 0.3


def psnr(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (a batch mean)."""
    mse = (outputs.clamp(0, 1) - targets).pow(2).flatten(1).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


class DenoisingTrainer(tk.Trainer):
    """Batches are ``(clean,)`` to train and ``(noisy, clean)`` to evaluate."""

    def train_step(self, batch: Any) -> dict[str, Any]:
        (clean,) = batch
        noisy = (clean + NOISE * torch.randn_like(clean)).clamp(0, 1)  # fresh each step
        denoised = self.model(noisy)
        return {"loss": F.mse_loss(denoised, clean), "batch_size": len(clean)}

    def eval_step(self, batch: Any) -> dict[str, Any]:
        noisy, clean = batch
        denoised = self.module(noisy)  # self.module: the model without a DDP wrapper
        # outputs/targets feed the metrics (PSNR here), as for the default step.
        return {"loss": F.mse_loss(denoised, clean), "outputs": denoised, "targets": clean}

    def predict_step(self, batch: Any) -> torch.Tensor:
        noisy, _ = batch
        return self.module(noisy).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="two epochs only")
    args = parser.parse_args()
    epochs = 2 if args.smoke else args.epochs

    tk.seed_everything(0)
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0  # (1797, 64) in [0, 1]
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    clean_train, clean_val = x[perm[:1400]], x[perm[1400:]]
    noisy_val = (clean_val + NOISE * torch.randn_like(clean_val)).clamp(0, 1)
    train_loader = DataLoader(TensorDataset(clean_train), batch_size=64, shuffle=True)
    val_loader = DataLoader(TensorDataset(noisy_val, clean_val), batch_size=256)

    model = nn.Sequential(  # 64 -> 16 -> 64: the bottleneck cannot copy the noise
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16), nn.ReLU(),
        nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid(),
    )
    trainer = DenoisingTrainer(
        model,
        torch.optim.AdamW(model.parameters(), lr=3e-3),  # no loss_fn: the steps compute it
        metrics={"psnr": psnr},
        max_grad_norm=1.0,
        callbacks=[tk.EarlyStopping("val_psnr", mode="max", patience=5, restore_best=True)],
        progress=False,
    )
    history = trainer.fit(train_loader, val_loader, epochs=epochs)
    for epoch, loss, db in zip(history["epoch"], history["train_loss"], history["val_psnr"]):
        print(f"epoch {epoch + 1:2d}  train_loss {loss:.4f}  val_psnr {db:.2f} dB")

    denoised = trainer.predict(val_loader)
    print(f"PSNR of the noisy inputs {psnr(noisy_val, clean_val):.2f} dB -> "
          f"denoised {psnr(denoised, clean_val):.2f} dB")


if __name__ == "__main__":
    main()
