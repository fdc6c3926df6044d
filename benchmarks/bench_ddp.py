"""Trainer under 2-process CPU DDP against a hand-written DDP loop doing the same work.

Both run in the same two gloo processes (started by ``tk.launch``), one thread each, on
the same sharded data: tiny MLP 32 -> 64 -> 10, batch 64 per rank, SGD. Repetitions
alternate between the two and rank 0 reports the medians of one epoch's time.

    python benchmarks/bench_ddp.py [--repeats 10] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torchkit as tk


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def worker(steps: int, repeats: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n = 64 * steps * dist.get_world_size()
    data = TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    raw_model = nn.parallel.DistributedDataParallel(model())
    raw_opt = torch.optim.SGD(raw_model.parameters(), lr=0.01)
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    raw_loader = DataLoader(data, batch_size=64, sampler=sampler)
    net = model()  # Trainer wraps it in DDP itself; the optimizer's parameters stay valid
    trainer = tk.Trainer(net, torch.optim.SGD(net.parameters(), lr=0.01), F.cross_entropy,
                         device="cpu", progress=False)
    loader = DataLoader(data, batch_size=64, shuffle=True)

    def raw(epoch: int) -> None:
        sampler.set_epoch(epoch)
        for x, y in raw_loader:
            loss = F.cross_entropy(raw_model(x), y)
            raw_opt.zero_grad(set_to_none=True)
            loss.backward()
            raw_opt.step()

    def fit(epoch: int) -> None:
        trainer.epoch = 0
        trainer.fit(loader, epochs=1)

    times: dict[str, list[float]] = {"raw": [], "trainer": []}
    for i in range(repeats + 1):
        for name, fn in (("raw", raw), ("trainer", fit)) if i % 2 else (
                ("trainer", fit), ("raw", raw)):
            dist.barrier()
            start = time.perf_counter()
            fn(i)
            dist.barrier()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["raw"]), statistics.median(times["trainer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    raw, trainer = tk.launch(worker, args.steps, args.repeats, nprocs=2, backend="gloo")[0]
    print(f"torch {torch.__version__}, 2 gloo processes x 1 thread, {args.steps} steps of "
          f"batch 64 per rank per repeat, {args.repeats} alternating repeats")
    print()
    print("| variant | median epoch (ms) | steps/s | vs hand-written DDP |")
    print("| --- | ---: | ---: | ---: |")
    for name, seconds in (("hand-written DDP loop", raw), ("tk.Trainer under DDP", trainer)):
        print(f"| {name} | {seconds * 1e3:.1f} | {args.steps / seconds:.0f} | "
              f"{raw / seconds:.3f}x |")


if __name__ == "__main__":
    main()
