"""Train a model sharded over processes with FSDP2, checkpoint it with DCP, consolidate it.

Two CPU processes (gloo) train one model whose parameters are split between them
(``torch.distributed.fsdp.fully_shard``, through ``Trainer(parallelize=...)``). Every rank
writes its shards into one checkpoint directory per save; training is interrupted and
resumed from it; at the end this (plain) process turns the sharded checkpoint into one
file and loads it into an ordinary, unsharded model, as you would for deployment.

    pip install -e .   # in a clone (README: Install)
    python examples/sharded.py            # 2 processes, a few epochs
    python examples/sharded.py --smoke    # the fast version CI runs
    torchrun --nproc-per-node=2 examples/sharded.py   # the same, under torchrun
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 3))


def shard(model: nn.Module, mesh: object) -> nn.Module:
    """What Trainer(parallelize=...) calls: shard each Linear, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, :3].argmax(1)))


class Interrupt(tk.Callback):
    """Stop the first run after a few optimizer steps, like a pre-empted job."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: tk.Trainer, batch: object, batch_idx: int) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def train(directory: str, epochs: int, samples: int, interrupt_at: int | None) -> dict:
    torch.set_num_threads(1)
    model = make_model()
    trainer = tk.Trainer(
        model, torch.optim.AdamW(model.parameters(), lr=3e-3), F.cross_entropy,
        parallelize=shard, accumulate=2, device="cpu", progress=False,
        metrics={"acc": tk.accuracy},
        checkpoint=tk.CheckpointManager(directory, keep_last=2),  # format="auto": DCP
        checkpoint_every=4,
        callbacks=[Interrupt(interrupt_at)] if interrupt_at else [],
    )
    data = DataLoader(make_data(samples), batch_size=16, shuffle=True)
    val = DataLoader(make_data(samples // 4), batch_size=32)
    try:
        history = trainer.fit(data, val, epochs=epochs, resume="latest")
    except KeyboardInterrupt:
        return {"interrupted_at": trainer.global_step}
    return {"steps": trainer.global_step, "val_acc": history["val_acc"][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny, fast run")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args()
    epochs, samples = (2, 256) if args.smoke else (8, 4096)
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(Path(tmp) / "checkpoints")
        first = tk.launch(train, directory, epochs, samples, 6, nprocs=args.nprocs,
                          backend="gloo")
        print(f"interrupted at optimizer step {first[0]['interrupted_at']}")
        done = tk.launch(train, directory, epochs, samples, None, nprocs=args.nprocs,
                         backend="gloo")
        print(f"resumed and finished: {done[0]['steps']} steps, "
              f"val_acc {done[0]['val_acc']:.3f}")
        if tk.get_world_size() > 1:
            return  # under torchrun: every rank ran the above; consolidate offline
        latest = tk.CheckpointManager(directory).latest()
        assert latest is not None and latest.is_dir()
        print(f"sharded checkpoint: {latest.name}/ "
              f"({', '.join(sorted(p.name for p in latest.iterdir()))})")
        single = tk.consolidate_checkpoint(latest, Path(tmp) / "model.pt")
        model = make_model()
        meta = tk.load_checkpoint(single, {"model": model})
        x, y = make_data(samples // 4).tensors
        with torch.no_grad():
            acc = float(tk.accuracy(model(x), y))
        print(f"consolidated into {single.name} (step {meta['step']}); the plain model "
              f"scores val_acc {acc:.3f}")


if __name__ == "__main__":
    main()
