"""Sharded training: FSDP2 in the Trainer and GradAccumulator, DCP checkpoints, resharding.

One 2-rank launch (about 10 s of start-up on 2 cores) runs every multi-rank case; the
assertions on its results, and the single-process references, run in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk

EPOCHS = 2


def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g)
    train = TensorDataset(x, (x[:, 0] - x[:, 1] > 0).long())
    xv = torch.randn(101, 6, generator=g)  # not divisible by the world size
    return train, TensorDataset(xv, (xv[:, 0] - xv[:, 1] > 0).long())


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


class CrashAt(tk.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def fit(directory, *, batch, world, crash=None, resume=None, callbacks=()):
    """Adam, uneven micro-batches (5 + 5, then a last window of 2) and checkpoints."""
    train, val = data()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    manager = None if directory is None else tk.CheckpointManager(directory, keep_last=2)
    trainer = tk.Trainer(model, opt, F.cross_entropy, accumulate=2, progress=False,
                         device="cpu", metrics={"acc": tk.accuracy}, checkpoint=manager,
                         checkpoint_every=None if manager is None else 3,
                         parallelize=shard if world > 1 else None,
                         callbacks=[*callbacks, *([CrashAt(crash)] if crash else [])])
    trainer.fit(DataLoader(train, batch_size=batch), DataLoader(val, batch_size=7),
                epochs=EPOCHS, resume=resume)
    return trainer


def full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return {k: v.detach().clone() for k, v in get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True)).items()}


def _world(root: str) -> dict:
    torch.set_num_threads(1)
    root_path = Path(root)
    rank = dist.get_rank()
    counts = {"n": 0}
    # What FSDP2 calls, looked up at call time: reduce_scatter_tensor on torch 2.8,
    # reduce_scatter_single (which 2.8 does not have) on newer releases.
    name = ("reduce_scatter_single" if hasattr(dist, "reduce_scatter_single")
            else "reduce_scatter_tensor")
    reduce_scatter = getattr(dist, name)

    def counted(*args, **kwargs):
        counts["n"] += 1
        return reduce_scatter(*args, **kwargs)

    setattr(dist, name, counted)
    try:
        trainer = fit(root_path / "a", batch=5, world=2)
    finally:
        setattr(dist, name, reduce_scatter)
    out = {"weights": full_state(trainer.model), "history": trainer.history.records,
           "steps": trainer.global_step, "reduce_scatters": counts["n"],
           "ddp": isinstance(trainer.model, nn.parallel.DistributedDataParallel),
           "dtensor": type(next(trainer.model.parameters())).__name__,
           "opt_is_model": trainer.optimizer.param_groups[0]["params"][0]
           is next(trainer.model.parameters())}
    with pytest.raises(RuntimeError, match="crash"):
        fit(root_path / "b", batch=5, world=2, crash=5)
    out["resumed"] = full_state(fit(root_path / "b", batch=5, world=2, resume="latest").model)
    # A checkpoint written by one plain process loads into the 2-rank sharded model.
    model = shard(make_model(), None)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    tk.CheckpointManager(root_path / "one").load("latest", {"model": model, "optimizer": opt})
    out["from_one"] = full_state(model)
    # A flipped bit in rank 1's shard: every rank refuses the load, none waits in DCP.
    flips = tk.CheckpointManager(root_path / "flip", format="dcp")
    saved = flips.save({"model": model}, step=1)
    if rank == 0:
        raw = bytearray((saved / "__1_0.distcp").read_bytes())
        raw[len(raw) // 2] ^= 0x10
        (saved / "__1_0.distcp").write_bytes(bytes(raw))
    dist.barrier()
    try:
        flips.load(saved, {"model": model})
        out["flip_error"] = ""
    except tk.CheckpointError as error:
        out["flip_error"] = str(error)
    out["rank"] = rank
    out.update(_stops(root_path, rank))
    return out


class StopOnRankOne(tk.Callback):
    def on_epoch_end(self, trainer, metrics):
        if tk.get_rank() == 1:
            trainer.should_stop = True


class NanOnRankOne(nn.Module):
    def forward(self, outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if tk.get_rank() == 1 else loss


def _stops(root: Path, rank: int) -> dict:
    """Early stopping and nan checks stop every rank together, as under DDP."""
    train, _ = data()
    model = make_model()
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                         parallelize=shard, progress=False, device="cpu",
                         callbacks=[StopOnRankOne()])
    trainer.fit(DataLoader(train, batch_size=8), epochs=3)
    model = make_model()
    nan = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), NanOnRankOne(),
                     parallelize=shard, progress=False, device="cpu")
    try:
        nan.fit(DataLoader(train, batch_size=8), epochs=1)
        raised = ""
    except FloatingPointError as error:
        raised = str(error)
    try:
        thawed: Any = full_state(thawing_fit(batch=8, world=2).model)
    except RuntimeError as error:  # torch < 2.13 (see the test)
        thawed = str(error)
    return {"stopped_after": len(trainer.history), "stop_reason": trainer.stop_reason,
            "nan_error": raised, "thawed": thawed}


def thawing_fit(*, batch: int, world: int) -> tk.Trainer:
    """The first layer frozen, thawed at the start of epoch 1 (gradual unfreezing)."""
    train, _ = data()
    model = make_model()
    tk.freeze(model, "0.*")
    trainer = tk.Trainer(model, torch.optim.SGD(tk.trainable_parameters(model), lr=0.2),
                         F.cross_entropy, parallelize=shard if world > 1 else None,
                         progress=False, device="cpu",
                         callbacks=[tk.UnfreezeSchedule({1: "0.*"})])
    trainer.fit(DataLoader(train, batch_size=batch), epochs=3)
    return trainer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    # Written first by this plain process, loaded by the 2 ranks.
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(torch.ones(2, 6)).sum().backward()
    opt.step()
    tk.CheckpointManager(root / "one", format="dcp").save({"model": model, "optimizer": opt},
                                                          step=1)
    results = tk.launch(_world, str(root), nprocs=2, backend="gloo")
    return root, results, model


@pytest.mark.distributed
def test_fsdp2_trainer_equals_one_process_on_the_full_batch(world):
    _, results, _ = world
    single = fit(None, batch=10, world=1)
    for result in results:
        assert not result["ddp"] and result["dtensor"] == "DTensor" and result["opt_is_model"]
        assert result["steps"] == single.global_step == EPOCHS * 4
        for key, value in single.module.state_dict().items():
            torch.testing.assert_close(result["weights"][key], value, atol=2e-6, rtol=1e-5)
        for mine, ref in zip(result["history"], single.history.records):
            assert mine.keys() == ref.keys()
            for key in ref:
                assert mine[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key


@pytest.mark.distributed
def test_accumulation_skips_the_reduce_scatter_inside_a_window(world):
    _, results, _ = world
    # Two fully_shard groups hold parameters (the root holds none). Per epoch: 7
    # micro-batches in 4 windows (the last, partial one reduced by flush); reducing
    # every micro-batch would cost 2 * 7 reduce-scatters, once per window costs 2 * 4.
    for result in results:
        assert result["reduce_scatters"] == 2 * 4 * EPOCHS


@pytest.mark.distributed
def test_a_resumed_fsdp2_run_is_bitwise_identical(world):
    _, results, _ = world
    for result in results:
        for key, value in result["weights"].items():
            assert torch.equal(result["resumed"][key], value), key


@pytest.mark.distributed
def test_dcp_checkpoints_load_under_another_world_size(world):
    root, results, model = world
    for result in results:  # written by 1 process, loaded by 2
        for key, value in model.state_dict().items():
            assert torch.equal(result["from_one"][key], value), key
    # written by 2 ranks, loaded by this plain process into a plain model and optimizer
    manager = tk.CheckpointManager(root / "a")
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-000000006",
                                                       "checkpoint-000000008"]
    assert all(p.is_dir() for p in manager.checkpoints())
    plain = make_model()
    opt = torch.optim.Adam(plain.parameters(), lr=0.05)
    meta = manager.load("latest", {"model": plain, "optimizer": opt})
    assert meta["step"] == 8 and meta["epoch"] == EPOCHS - 1  # History["epoch"]
    for key, value in plain.state_dict().items():
        assert torch.equal(results[0]["weights"][key], value), key
    assert opt.state_dict()["state"][0]["step"].item() == 8
    # consolidated into one file that load_checkpoint reads into a plain model
    out = tk.consolidate_checkpoint(manager.latest(), root / "model.pt")
    again = make_model()
    assert tk.load_checkpoint(out, {"model": again})["step"] == 8
    for key, value in again.state_dict().items():
        assert torch.equal(results[0]["weights"][key], value), key


@pytest.mark.distributed
def test_early_stopping_and_nan_checks_stop_every_rank_together(world):
    _, results, _ = world
    assert [r["stopped_after"] for r in results] == [1, 1]
    assert results[0]["stop_reason"] == "another rank decided to stop"
    assert all("nan" in r["nan_error"] or "inf" in r["nan_error"] for r in results)


class DeviceMesh:  # what check_sharding accepts by type name, without a process group
    pass


@pytest.mark.distributed
def test_parameters_thawed_under_fsdp2_train_on_the_global_batch(world):
    """FSDP2 reduces whatever has a gradient, so an UnfreezeSchedule needs nothing more
    from torch 2.13 on; before it (2.8.0 trained them wrong) the trainer refuses the thaw."""
    _, results, _ = world
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        for result in results:
            assert "changed which parameters require grad in a model sharded with FSDP2" \
                in result["thawed"]
        return
    single = thawing_fit(batch=16, world=1).module.state_dict()
    for result in results:
        torch.testing.assert_close(result["thawed"], single)
    assert not torch.equal(single["0.weight"], make_model().state_dict()["0.weight"])


@pytest.mark.distributed
def test_a_corrupt_shard_is_refused_on_every_rank(world):
    _, results, _ = world
    for result in results:
        assert "corrupt: digest mismatch in __1_0.distcp" in result["flip_error"]


def test_parallelize_repoints_the_optimizer_keeping_groups_and_options():
    model = make_model()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "momentum": 0.5}], lr=0.2)

    def replace(model, mesh):  # like fully_shard: new Parameter objects, same names
        assert isinstance(mesh, DeviceMesh)
        for layer in (model[0], model[2]):
            layer.weight = nn.Parameter(layer.weight.detach().clone())
        return model

    old = model[0].weight
    trainer = tk.Trainer(model, opt, F.cross_entropy, parallelize=replace, mesh=DeviceMesh(),
                         progress=False, device="cpu")
    assert trainer.optimizer is opt and model[0].weight is not old
    assert opt.param_groups[0]["params"][0] is model[0].weight
    assert opt.param_groups[1]["params"][0] is model[2].weight
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert [g["momentum"] for g in opt.param_groups] == [0, 0.5]
    before = model[0].weight.detach().clone()
    train, _ = data()
    trainer.fit(DataLoader(train, batch_size=16), epochs=1)
    assert not torch.equal(model[0].weight, before)  # the optimizer steps the new ones


def test_sharding_options_are_checked_by_name(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="parallelize must be a callable"):
        tk.Trainer(model, opt, parallelize="fsdp")
    with pytest.raises(ValueError, match="mesh= is handed to parallelize"):
        tk.Trainer(model, opt, mesh=DeviceMesh())
    with pytest.raises(TypeError, match="mesh must be a torch.distributed DeviceMesh"):
        tk.Trainer(model, opt, parallelize=shard, mesh="cpu")
    with pytest.raises(ValueError, match="format='dcp' or 'auto'"):
        tk.Trainer(model, opt, parallelize=shard, mesh=DeviceMesh(),
                   checkpoint=tk.CheckpointManager(tmp_path, format="file"))
    with pytest.raises(TypeError, match="must return the model"):
        tk.Trainer(model, opt, parallelize=lambda m, mesh: None, mesh=DeviceMesh())
    stepped = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 6)).sum().backward()
    stepped.step()
    with pytest.raises(ValueError, match="must not have state yet"):
        tk.Trainer(model, stepped, parallelize=shard, mesh=DeviceMesh())
    with pytest.raises(ValueError, match="format must be 'auto', 'file' or 'dcp'"):
        tk.CheckpointManager(tmp_path, format="zip")
    with pytest.raises(ValueError, match="async_save=True is for format='file'"):
        tk.CheckpointManager(tmp_path, format="dcp", async_save=True)


_KILL = """
import os, sys, torch, torchkit as tk
from torchkit.checkpoint import _dcp
from torch import nn
manager = tk.CheckpointManager(sys.argv[1], format="dcp")
model = nn.Linear(3, 2)
manager.save({"model": model}, step=1)
real = _dcp.write_payload
_dcp.write_payload = lambda *a, **k: os._exit(9)  # killed after the shards were written
with torch.no_grad():
    model.weight.add_(1.0)
manager.save({"model": model}, step=2)
"""


def test_a_kill_during_a_dcp_save_leaves_the_previous_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, "-c", _KILL, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 9, run.stderr
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())  # the interrupted save
    manager = tk.CheckpointManager(tmp_path)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-000000001"]
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())  # removed on start
    model = nn.Linear(3, 2)
    assert manager.load("latest", {"model": model})["step"] == 1


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    manager = tk.CheckpointManager(tmp_path, format="dcp")
    path = manager.save({"model": nn.Linear(3, 2)}, step=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    import pickle

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(tk.CheckpointError, match="corrupt: digest mismatch in .metadata"):
        manager.load(path, {"model": nn.Linear(3, 2)})  # its digest catches it first
    with pytest.raises(tk.CheckpointError, match="unsafe or corrupt .metadata"):
        manager.load(path, {"model": nn.Linear(3, 2)}, verify=False)  # then the unpickler
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("victim", ["__0_0.distcp", ".metadata"])
def test_a_flipped_bit_in_a_dcp_file_is_found_and_latest_falls_back(tmp_path, victim):
    manager = tk.CheckpointManager(tmp_path, format="dcp")
    torch.manual_seed(0)
    first = nn.Linear(3, 2)
    manager.save({"model": first}, step=1)
    newest = manager.save({"model": nn.Linear(3, 2)}, step=2)
    raw = bytearray((newest / victim).read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (newest / victim).write_bytes(bytes(raw))
    model = nn.Linear(3, 2)
    with pytest.raises(tk.CheckpointError, match=f"corrupt: digest mismatch in {victim}"):
        manager.load(newest, {"model": model})
    with pytest.warns(RuntimeWarning, match="skipping unreadable latest checkpoint"):
        assert manager.load("latest", {"model": model})["step"] == 1
    torch.testing.assert_close(model.state_dict(), first.state_dict(), rtol=0, atol=0)
    (newest / victim).unlink()
    with pytest.raises(tk.CheckpointError, match=f"digest mismatch in {victim}"):
        manager.load(newest, {"model": model})  # a missing file too
    with pytest.raises(tk.CheckpointError, match="digest mismatch"):
        tk.consolidate_checkpoint(newest, tmp_path / "whole.pt")


def test_a_dcp_save_leaves_torchs_typed_storage_warning_to_the_user(tmp_path):
    """torch 2.8's DCP writer calls the deprecated tensor.storage(): torchkit hides that
    warning (the user cannot act on it) but not torch's once-per-process warning for the
    user's own storage() calls."""
    torch.storage._reset_warn_typed_storage_removal()
    manager = tk.CheckpointManager(tmp_path, format="dcp")
    path = manager.save({"model": nn.Linear(3, 2)}, step=1)
    manager.load(path, {"model": nn.Linear(3, 2)})
    with pytest.warns(UserWarning, match="TypedStorage is deprecated"):
        torch.zeros(2).storage()


def test_dcp_digests_naming_files_outside_the_directory_are_refused(tmp_path):
    from torchkit.checkpoint import _dcp, _files

    manager = tk.CheckpointManager(tmp_path / "ckpt", format="dcp")
    path = manager.save({"model": nn.Linear(3, 2)}, step=1)
    (tmp_path / "secret").write_bytes(b"not yours")
    payload = _dcp.read_dcp_payload(path)
    for hostile in ({"../secret": "0" * 32}, {str(tmp_path / "secret"): "0" * 32},
                    ["__0_0.distcp"]):
        payload[_dcp.DIGESTS] = hostile  # a well-formed torchkit.pt that names them
        _files.write_payload(payload, path / _dcp.META, durable=False)
        with pytest.raises(tk.CheckpointError, match="not plain file names"):
            manager.load(path, {"model": nn.Linear(3, 2)})
