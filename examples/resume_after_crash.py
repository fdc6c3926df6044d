"""Crash mid-run, resume from the latest checkpoint, and end bitwise where a clean run ends.

Three runs of the same training code:

1. ``crash``, in a subprocess so that it can die: trains with
   ``tk.Trainer(checkpoint=..., checkpoint_every=...)`` and, in the middle of an epoch,
   SIGKILLs itself from a callback: no cleanup, no final save, exactly like a power cut
   or the OOM killer.
2. ``resume``, in this process (the restart): the same code with
   ``fit(..., resume="latest")``, which reloads the model, optimizer, scheduler, RNG
   states and the position inside the epoch.
3. ``straight``: an uninterrupted run, for comparison.

It then checks that the resumed run's final weights equal the uninterrupted run's bit for
bit (CPU, ``tk.seed_everything(0, deterministic=True)``).

    pip install -e . scikit-learn   # in a clone (README: Install)
    python examples/resume_after_crash.py            # a few seconds
    python examples/resume_after_crash.py --smoke    # for CI
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


class CrashAt(tk.Callback):
    """Kill this process, hard, after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: tk.Trainer, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            print(f"crashing at step {trainer.global_step} (epoch {trainer.epoch}, "
                  f"batch {batch_idx})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def train(phase: str, out: Path, epochs: int, crash_at: int) -> None:
    """One run: ``crash``, ``resume`` or ``straight``."""
    tk.seed_everything(0, deterministic=True)  # same initial weights and shuffles
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y))
    train_set, val_set = torch.utils.data.random_split(
        data, [1400, len(data) - 1400], generator=torch.Generator().manual_seed(0))
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    run_dir = out / ("straight" if phase == "straight" else "crashed")
    trainer = tk.Trainer(
        model, optimizer, nn.functional.cross_entropy,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7),
        metrics={"acc": tk.accuracy},
        checkpoint=tk.CheckpointManager(run_dir / "checkpoints", keep_last=2),
        checkpoint_every=10,  # optimizer steps, besides every epoch end
        # Resuming needs the same callbacks, in order: CrashAt(-1) never fires.
        callbacks=[CrashAt(crash_at if phase == "crash" else -1)],
        progress=False,
    )
    history = trainer.fit(train_loader, val_loader, epochs=epochs,
                          resume="latest" if phase == "resume" else None)
    print(f"{phase}: {trainer.global_step} steps, val_acc {history['val_acc'][-1]:.4f}")
    torch.save(model.state_dict(), out / f"{phase}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/resume_after_crash"))
    parser.add_argument("--smoke", action="store_true", help="two short epochs")
    parser.add_argument("--phase", choices=["crash", "resume", "straight"],
                        help=argparse.SUPPRESS)  # set when the script runs itself
    parser.add_argument("--crash-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        train(args.phase, args.out, args.epochs, args.crash_at)
        return

    epochs = 2 if args.smoke else args.epochs
    crash_at = 44 * (epochs - 1) + 23  # 44 steps per epoch: mid-way through the last
    args.out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--phase", "crash", "--epochs", str(epochs),
               "--crash-at", str(crash_at), "--out", str(args.out)]
    code = subprocess.run(command).returncode
    if code != -signal.SIGKILL:
        sys.exit(f"the crash run should be killed by SIGKILL, but it exited with {code}")
    print("the crash run was killed by SIGKILL, as planned", flush=True)
    train("resume", args.out, epochs, crash_at)  # a restart: same code, resume="latest"
    train("straight", args.out, epochs, crash_at)

    resumed = torch.load(args.out / "resume.pt")
    straight = torch.load(args.out / "straight.pt")
    same = all(torch.equal(resumed[k], straight[k]) for k in straight)
    print(f"resumed weights equal the uninterrupted run's bitwise: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
