"""The script tests/test_torchrun.py runs under torchrun: DDP training that resumes exactly.

Usage: torchrun ... _torchrun_train.py OUT_DIR [--fail-once]. With --fail-once, rank 1 of
the first attempt dies at optimizer step 5 (after the step-4 save); the restarted attempt
resumes from the latest checkpoint. Rank 0 writes the final weights and a summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


class DieOnce(tk.Callback):
    def on_train_batch_end(self, trainer, batch, batch_idx):
        if (tk.get_rank() == 1 and trainer.global_step == 5
                and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
            os._exit(3)  # a crash: no exception, no cleanup


def main(out: str, fail_once: bool) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g)
    data = DataLoader(TensorDataset(x, (x[:, 0] > x[:, 1]).long()), batch_size=4,
                      shuffle=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    manager = tk.CheckpointManager(Path(out) / "ckpt", keep_last=2)
    trainer = tk.Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05),
                         F.cross_entropy, device="cpu", progress=False, seed=1,
                         checkpoint=manager, checkpoint_every=2,
                         callbacks=[DieOnce()] if fail_once else [])
    trainer.fit(data, epochs=2, resume="latest")
    if tk.is_main_process():
        torch.save(trainer.module.state_dict(), Path(out) / "final.pt")
        (Path(out) / "summary.json").write_text(json.dumps({
            "world": tk.get_world_size(), "steps": trainer.global_step,
            "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
            "train_loss": trainer.history["train_loss"]}))


if __name__ == "__main__":
    tk.launch(main, sys.argv[1], "--fail-once" in sys.argv)
