"""The default process group from the environment: spawned ranks, torchrun, SLURM."""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["env_from_slurm", "init_from_env"]


def init_from_env(backend: str, timeout_s: float) -> None:
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)  # before init, so NCCL binds each rank to its GPU
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _elastic_store(timeout)
    if store is None:
        dist.init_process_group(backend, init_method="env://", device_id=device_id,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]),
                                device_id=device_id, timeout=timeout)


_SLURM = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID",
          "LOCAL_WORLD_SIZE": "SLURM_NTASKS_PER_NODE"}


def env_from_slurm() -> None:
    """``srun python train.py``: take the ranks from SLURM when MASTER_ADDR/PORT are set."""
    if "RANK" in os.environ or not all(
            v in os.environ for v in ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR",
                                      "MASTER_PORT")):
        return
    for name, slurm in _SLURM.items():
        value = os.environ.get(slurm, "").split("(")[0]  # "2(x3)" per-node counts
        if value.isdigit():
            os.environ.setdefault(name, value)


def _elastic_store(timeout: datetime.timedelta) -> Any:
    """Under torchrun: the rendezvous store, with keys private to this restart attempt.

    torch's elastic agent hands every attempt the same store; a restarted attempt that
    reads the previous attempt's keys connects gloo to dead addresses ("Connection
    refused") or hangs (compare pytorch/pytorch#167288). Prefixing every key with the
    run id and ``TORCHELASTIC_RESTART_COUNT`` gives each attempt a clean namespace.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timeout,
                          multi_tenant=not agent)
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return PrefixStore(f"torchkit/{run}/attempt-{restart}/", store)
