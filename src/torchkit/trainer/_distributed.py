"""Private helpers for Trainer under a process group: sharding, reductions, gathering."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler

from torchkit._utils import unwrap
from torchkit.distributed import get_rank, get_world_size
from torchkit.trainer._compile import CompiledModels

__all__ = ["ShardSampler", "all_reduce_sum", "any_ranks", "gather", "rewrap_if_thawed",
           "set_epoch", "shard", "trainable_ids", "wrap_ddp"]

_log = logging.getLogger("torchkit.trainer")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Wrap ``model`` in DDP under a process group (not one that is DDP already)."""
    if get_world_size() == 1 or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def trainable_ids(model: nn.Module) -> frozenset[int]:
    """The parameters of ``model`` that require grad (by id): what a DDP wrapper reduces."""
    return frozenset(id(p) for p in model.parameters() if p.requires_grad)


# FSDP2 trains parameters thawed after fully_shard correctly from this torch on (measured:
# wrong on 2.8.0, right on 2.13.0 and 2.14.1; the releases between were not measured).
_FSDP2_THAWS = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) \
    >= (2, 13)


def rewrap_if_thawed(trainer: Any) -> None:
    """After an epoch start that changed which parameters train: keep the ranks exact.

    DDP all-reduces only the parameters that required grad when it was built (its reducer
    is made then): one thawed later (``UnfreezeSchedule``) would train on each rank's own
    gradient, and the ranks would drift apart without an error. So a new wrapper replaces
    the old one (every rank does this at the same epoch start; DDP's constructor is a
    collective) and the accumulator and the compiled model are pointed at it. FSDP2
    reduces whatever has a gradient, on the torch releases where that was measured.

    Raises:
        RuntimeError: If the DDP wrapper was the caller's own: its options (bucket sizes,
            ``find_unused_parameters``, ...) are theirs, so the trainer does not rebuild
            it; or if the model is sharded and this torch's FSDP2 is older than 2.13.
    """
    old = trainer.accumulator.model
    if trainer._sharded and not _FSDP2_THAWS \
            and trainer._trainable != trainable_ids(unwrap(trainer.model)):
        raise RuntimeError(
            f"epoch {trainer.epoch} changed which parameters require grad in a model "
            f"sharded with FSDP2, which torch {torch.__version__} does not train right "
            "(measured wrong on 2.8.0, right from 2.13.0): set requires_grad before "
            "fully_shard, or use torch >= 2.13")
    if not isinstance(old, nn.parallel.DistributedDataParallel) \
            or trainer._trainable == trainable_ids(old.module):
        return
    if not trainer._ddp_own:
        raise RuntimeError(
            f"epoch {trainer.epoch} changed which parameters require grad under the "
            "DistributedDataParallel model you passed, which reduces only those that "
            "required grad when it was built: the ranks would train the others apart. "
            "Pass the plain model (the Trainer wraps it, and wraps it again after such a "
            "change) or set requires_grad before wrapping it")
    remove_hooks: Any = getattr(old, "_remove_autograd_hooks", None)
    if remove_hooks is not None:  # the old reducer must not reduce as well
        remove_hooks()
    new = wrap_ddp(old.module, trainer.device)
    _log.info("epoch %d changed which parameters train: wrapped the model in DDP again",
              trainer.epoch)
    trainer._trainable = trainable_ids(old.module)
    trainer.accumulator.model = new
    trainer._compiled = CompiledModels(new, trainer._compiled.option)
    trainer.model = trainer._compiled.train


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (nothing without a group) and return it."""
    if get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is true on any rank: one small collective for all."""
    if get_world_size() == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order (``None`` without a group)."""
    if get_world_size() == 1:
        return None
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ShardSampler(Sampler[int]):
    """Give rank ``r`` of ``w`` the samples ``r, r + w, ...``, without padding.

    Every sample is evaluated exactly once, so summed metrics equal a single process's.
    """

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.length, self.rank, self.world = length, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))


def shard(data: Iterable[Any] | None, *, train: bool, seed: int) -> Any:
    """Give this rank its part of a DataLoader: a DistributedSampler to train.

    Evaluation gets a plain stride instead; other iterables are left to the user, with a
    note in the log.
    """
    if data is None or get_world_size() == 1:
        return data
    if not isinstance(data, DataLoader):
        _log.info("under a process group, %s is not a DataLoader: each rank iterates it "
                  "as given, so shard it yourself", type(data).__name__)
        return data
    if isinstance(data.sampler, DistributedSampler | ShardSampler) or isinstance(
        data.dataset, IterableDataset
    ):
        return data  # sharded already, or cannot be sharded by index
    if data.batch_sampler is None or type(data.batch_sampler).__name__ != "BatchSampler":
        _log.info("a DataLoader with a custom batch_sampler is not sharded by Trainer")
        return data
    n = len(data.dataset)  # type: ignore[arg-type]
    sampler: Sampler[int]
    if train:
        sampler = DistributedSampler(data.dataset, num_replicas=get_world_size(), rank=get_rank(),
                                     shuffle=isinstance(data.sampler, RandomSampler),
                                     seed=seed)
    else:
        sampler = ShardSampler(n, get_rank(), get_world_size())
    extra: dict[str, Any] = {}
    if data.num_workers > 0:
        extra = {"prefetch_factor": data.prefetch_factor,
                 "persistent_workers": data.persistent_workers}
    return DataLoader(
        data.dataset, batch_size=data.batch_size, sampler=sampler,
        num_workers=data.num_workers, collate_fn=data.collate_fn,
        pin_memory=data.pin_memory, drop_last=data.drop_last, timeout=data.timeout,
        worker_init_fn=data.worker_init_fn,
        multiprocessing_context=data.multiprocessing_context, generator=data.generator,
        pin_memory_device=data.pin_memory_device, **extra,
    )


def set_epoch(data: Any, epoch: int) -> None:
    """Call ``sampler.set_epoch(epoch)`` when the loader's sampler has it."""
    set_sampler_epoch = getattr(getattr(data, "sampler", None), "set_epoch", None)
    if callable(set_sampler_epoch):
        set_sampler_epoch(epoch)
