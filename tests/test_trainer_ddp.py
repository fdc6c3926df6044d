"""Trainer under a 2-process gloo group equals one process with the global batch."""

from __future__ import annotations

import contextlib
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def datasets():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g)
    train = TensorDataset(x, (x[:, 0] - x[:, 1] > 0).long())
    xv = torch.randn(101, 6, generator=g)  # not divisible by the world size
    val = TensorDataset(xv, (xv[:, 0] - xv[:, 1] > 0).long())
    return train, val


def make_trainer(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    return tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.2), F.cross_entropy,
                      metrics={"acc": tk.accuracy}, progress=False, device="cpu", **kwargs)


def make_thawing_trainer():
    """The first layer frozen, thawed at the start of epoch 1 (gradual unfreezing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    tk.freeze(model, "0.*")
    return tk.Trainer(model, torch.optim.SGD(tk.trainable_parameters(model), lr=0.2),
                      F.cross_entropy, progress=False, device="cpu",
                      callbacks=[tk.UnfreezeSchedule({1: "0.*"})])


class StopOnRankOne(tk.Callback):
    def on_epoch_end(self, trainer, metrics):
        if dist.get_rank() == 1 and trainer.epoch == 1:
            trainer.should_stop = True


class SigtermOnRankOne(tk.Callback):
    def on_train_batch_end(self, trainer, batch, batch_idx):
        if dist.get_rank() == 1 and trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


class RankOneClock(tk.TimeLimit):
    """A TimeLimit whose clock passes the limit at optimizer step 10 on rank 1 only."""

    def __init__(self):
        super().__init__(100.0)
        self.step = 0

    def on_optimizer_step(self, trainer):
        self.step = trainer.global_step
        super().on_optimizer_step(trainer)

    def elapsed_s(self):
        return 1000.0 if dist.get_rank() == 1 and self.step >= 10 else 0.0


class CrashAt(tk.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def _worker(rank, port, out, case):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        train, val = datasets()
        batch, accumulate = (4, 2) if case == "accumulate" else (8, 1)
        loader = DataLoader(train, batch_size=batch)
        val_loader = DataLoader(val, batch_size=10)
        result = {}
        if case == "stop":
            trainer = make_trainer(callbacks=[StopOnRankOne()])
            history = trainer.fit(loader, val_loader, epochs=5)
        elif case == "early":
            trainer = make_trainer(callbacks=[tk.EarlyStopping(patience=1)])
            trainer.optimizer.param_groups[0]["lr"] = 8.0  # diverges: val_loss gets worse
            history = trainer.fit(loader, val_loader, epochs=30)
        elif case == "timelimit":
            # 128 optimizer steps an epoch: the ranks' first shared check is at step 64.
            manager = tk.CheckpointManager(out / f"ckpt{rank}")
            trainer = make_trainer(callbacks=[RankOneClock()], checkpoint=manager)
            x = torch.randn(256, 6, generator=torch.Generator().manual_seed(4))
            long = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=1)
            history = trainer.fit(long, epochs=3)  # returns: a planned stop, no exception
            result.update(step=trainer.global_step, epoch=trainer.epoch,
                          batch_idx=trainer.batch_idx, reason=trainer.stop_reason)
        elif case == "sigterm":
            manager = tk.CheckpointManager(out / f"ckpt{rank}")
            trainer = make_trainer(callbacks=[SigtermOnRankOne()], checkpoint=manager)
            try:
                trainer.fit(loader, val_loader, epochs=30)
            except SystemExit as exit_:
                result["exit"] = exit_.code
            result["step"] = trainer.global_step
            history = trainer.history
        elif case in ("resume", "resume_mid_epoch"):
            # Epochs of 4 optimizer steps: a crash at step 5 resumes from the end of epoch
            # 0; one at step 7 from the step-6 save, halfway through epoch 1.
            manager = tk.CheckpointManager(out / "ckpt", keep_last=2)
            crash = 5 if case == "resume" else 7
            crashed = make_trainer(callbacks=[CrashAt(crash)], checkpoint=manager,
                                   checkpoint_every=2)
            loader = DataLoader(train, batch_size=8, shuffle=True)
            with contextlib.suppress(RuntimeError):
                crashed.fit(loader, val_loader, epochs=3)
            dist.barrier()
            resumed = make_trainer(callbacks=[CrashAt(-1)], checkpoint=manager,
                                   checkpoint_every=2)
            history = resumed.fit(loader, val_loader, epochs=3, resume="latest")
            trainer = resumed
            straight = make_trainer(callbacks=[CrashAt(-1)])
            result["straight_history"] = straight.fit(loader, val_loader, epochs=3).records
            result["straight"] = {k: v.clone() for k, v in straight.module.state_dict().items()}
        else:
            if case == "accumulate":  # (sharing this launch) a DDP model thawed mid-fit
                thawing = make_thawing_trainer()
                thawing.fit(DataLoader(train, batch_size=8), epochs=3)
                result["thawed"] = {k: v.clone() for k, v in thawing.module.state_dict().items()}
            trainer = make_trainer(accumulate=accumulate)
            history = trainer.fit(loader, val_loader, epochs=2)
        result.update(params={k: v.clone() for k, v in trainer.module.state_dict().items()},
                      history=history.records, evaluate=trainer.evaluate(val_loader),
                      is_ddp=isinstance(trainer.model, nn.parallel.DistributedDataParallel))
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(tmp_path, case):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, tmp_path, case), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``run``'s results per case, launched once for the tests that share them."""
    results = {}

    def get(case):
        if case not in results:
            results[case] = run(tmp_path_factory.mktemp(case), case)
        return results[case]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["plain", "accumulate"])
def test_ddp_equals_one_process_with_the_global_batch(launched, case):
    results = launched(case)
    train, val = datasets()
    single = make_trainer()
    history = single.fit(DataLoader(train, batch_size=16), DataLoader(val, batch_size=10),
                         epochs=2)
    for result in results:
        assert result["is_ddp"]
        torch.testing.assert_close(result["params"], single.module.state_dict())
        for got, expected in zip(result["history"], history.records):
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        expected_eval = single.evaluate(DataLoader(val, batch_size=10))
        assert result["evaluate"] == pytest.approx(expected_eval, rel=1e-5)
    assert results[0]["history"] == results[1]["history"]  # every rank reports the same


@pytest.mark.distributed
def test_a_stop_on_one_rank_stops_every_rank(tmp_path):
    results = run(tmp_path, "stop")
    assert [len(r["history"]) for r in results] == [2, 2]


@pytest.mark.distributed
def test_parameters_thawed_under_ddp_are_all_reduced_like_the_rest(launched):
    """UnfreezeSchedule under DDP: the trainer wraps the model again, so the thawed layer
    trains on the global batch's gradient (it used to train on each rank's own)."""
    results = launched("accumulate")  # the same launch as that case of the test above
    train, _ = datasets()
    single = make_thawing_trainer()
    single.fit(DataLoader(train, batch_size=16), epochs=3)
    torch.testing.assert_close(results[0]["thawed"], results[1]["thawed"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["thawed"], single.module.state_dict())
    frozen = make_thawing_trainer().module.state_dict()
    assert not torch.equal(results[0]["thawed"]["0.weight"], frozen["0.weight"])  # it trained


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["resume", "resume_mid_epoch"])
def test_resume_under_ddp_equals_a_straight_run(tmp_path, case):
    results = run(tmp_path, case)
    for result in results:
        torch.testing.assert_close(result["params"], result["straight"], rtol=0, atol=0)
        # The resumed epoch's train_loss counts every rank's batches before the save too.
        for got, expected in zip(result["history"], result["straight_history"], strict=True):
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)


@pytest.mark.distributed
def test_early_stopping_stops_both_ranks_together(tmp_path):
    results = run(tmp_path, "early")
    lengths = [len(r["history"]) for r in results]
    assert lengths[0] == lengths[1] < 30


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path):
    results = run(tmp_path, "sigterm")
    assert [r.get("exit") for r in results] == [128 + signal.SIGTERM] * 2
    assert results[0]["step"] == results[1]["step"]
    assert list((tmp_path / "ckpt0").glob("checkpoint-*.pt"))  # rank 0 saved, then stopped
    assert not list((tmp_path / "ckpt1").glob("checkpoint-*.pt"))  # and only rank 0



@pytest.mark.distributed
def test_a_time_limit_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 1's clock runs out at step 10: both ranks stop, save and return at step 64,
    the first cross-rank check after it, instead of rank 1 saving alone (a hang)."""
    results = run(tmp_path, "timelimit")
    assert [(r["step"], r["epoch"], r["batch_idx"]) for r in results] == [(64, 0, 64)] * 2
    assert results[1]["reason"].startswith("time limit of 100 s reached")
    assert results[0]["reason"] == "another rank decided to stop"
    assert [r["history"] for r in results] == [[], []]  # mid-epoch: no epoch completed
    saved = list((tmp_path / "ckpt0").glob("checkpoint-*.pt"))
    assert [path.name for path in saved] == ["checkpoint-000000064.pt"]  # the planned save
    assert torch.load(saved[0], weights_only=False)["state"]["trainer"]["batch_idx"] == 64
    torch.testing.assert_close(results[0]["params"], results[1]["params"], rtol=0, atol=0)


def test_a_thaw_under_your_own_ddp_wrapper_is_refused(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        tk.freeze(model, "0.*")
        wrapped = nn.parallel.DistributedDataParallel(model)
        trainer = tk.Trainer(wrapped, torch.optim.SGD(tk.trainable_parameters(model), lr=0.2),
                             F.cross_entropy, progress=False, device="cpu",
                             callbacks=[tk.UnfreezeSchedule({1: "0.*"})])
        train, _ = datasets()
        with pytest.raises(RuntimeError, match="epoch 1 changed which parameters require grad "
                           "under the DistributedDataParallel model you passed"):
            trainer.fit(DataLoader(train, batch_size=16), epochs=2)
        assert trainer.global_step == 4  # epoch 0 trained; nothing of epoch 1
    finally:
        dist.destroy_process_group()
