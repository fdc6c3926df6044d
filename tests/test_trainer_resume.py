"""Exact resume: a run killed (SIGKILL) or stopped (SIGTERM, or an exception) mid-epoch and
mid-accumulation-window, then resumed, ends with weights bitwise equal to a straight run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset
    import torchkit as tk

    directory, out, resume, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    torch.set_num_threads(1)
    tk.seed_everything(0, deterministic=True)
    x = torch.randn(150, 6)
    data = TensorDataset(x, (x.sum(1) > 0).long())
    loader = DataLoader(data, batch_size=8, shuffle=True)       # 19 batches, last short
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)

    class Beat(tk.Callback):
        def on_train_batch_end(self, trainer, batch, batch_idx):
            print(f"{trainer.epoch} {batch_idx}", flush=True)
            time.sleep(pause)

    trainer = tk.Trainer(model, opt, F.cross_entropy, scheduler=sched, accumulate=3,
                         metrics={"acc": tk.accuracy}, callbacks=[Beat(), tk.EarlyStopping()],
                         checkpoint=tk.CheckpointManager(directory, keep_last=2),
                         checkpoint_every=2, progress=False)
    history = trainer.fit(loader, DataLoader(data, batch_size=50), epochs=3,
                          resume=None if resume == "no" else resume)
    torch.save({"model": model.state_dict(), "history": history.records}, out)
""")


def run(tmp_path: Path, name: str, resume: str = "no", pause: float = 0.0,
        stop_at: tuple[int, int] | None = None, sig: int = signal.SIGKILL) -> int:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, str(script), str(tmp_path / name), str(tmp_path / f"{name}.pt"),
            resume, str(pause)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    if stop_at is not None:
        for line in proc.stdout:
            if tuple(map(int, line.split())) == stop_at:
                proc.send_signal(sig)
                break
    _, stderr = proc.communicate(timeout=120)
    if stop_at is None:
        assert proc.returncode == 0, stderr[-3000:]
    return proc.returncode


def final(tmp_path: Path, name: str):
    return torch.load(tmp_path / f"{name}.pt", weights_only=True)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_mid_epoch_and_resumed_is_bitwise_identical(tmp_path, sig):
    run(tmp_path, "straight")
    # Epoch 1, batch 7: mid-epoch, and the second micro-batch of a 3-batch window.
    code = run(tmp_path, "run", pause=0.05, stop_at=(1, 7), sig=sig)
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM  # saved, then SystemExit: not a silent success
        latest = tk.CheckpointManager(tmp_path / "run").latest()
        state = torch.load(latest, weights_only=True)["state"]["trainer"]
        assert state["epoch"] == 1 and 0 < state["batch_idx"] < 19  # saved mid-epoch
    else:
        assert code == -signal.SIGKILL
    assert not (tmp_path / "run.pt").exists()
    run(tmp_path, "run", resume="latest")
    straight, resumed = final(tmp_path, "straight"), final(tmp_path, "run")
    assert_bitwise_equal(resumed["model"], straight["model"])
    assert resumed["history"] == straight["history"]


def make(tmp_path, callbacks=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return tk.Trainer(model, opt, F.mse_loss, accumulate=2, progress=False,
                      callbacks=list(callbacks), checkpoint_every=3,
                      checkpoint=tk.CheckpointManager(tmp_path, keep_last=1))


def loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(44, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True)


class Crash(tk.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("crash_at", [4, 7, 12])
def test_in_process_crash_and_resume(tmp_path, crash_at):
    """Same contract without subprocesses: a crash after step `crash_at` (saves every 3)."""
    torch.manual_seed(5)
    straight = make(tmp_path / "a", [Crash(-1)])
    straight.fit(loader(), epochs=3)
    torch.manual_seed(5)
    crashed = make(tmp_path / "b", [Crash(crash_at)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(loader(), epochs=3)
    torch.manual_seed(123)  # whatever the state of the process, resume restores it
    resumed = make(tmp_path / "b", [Crash(-1)])
    history = resumed.fit(loader(), epochs=3, resume="latest")
    assert_bitwise_equal(resumed.model.state_dict(), straight.model.state_dict())
    assert history.records == straight.history.records


def test_resume_when_there_is_no_checkpoint_yet_starts_fresh(tmp_path):
    trainer = make(tmp_path)
    history = trainer.fit(loader(), epochs=1, resume="latest")
    assert len(history) == 1


def test_resume_after_the_end_does_nothing_more(tmp_path):
    trainer = make(tmp_path)
    trainer.fit(loader(), epochs=2)
    again = make(tmp_path)
    history = again.fit(loader(), epochs=2, resume="latest")
    assert len(history) == 2 and again.global_step == trainer.global_step
    assert_bitwise_equal(again.model.state_dict(), trainer.model.state_dict())


def test_resume_from_a_path_and_mismatched_callbacks(tmp_path):
    trainer = make(tmp_path, [tk.EarlyStopping("train_loss")])
    trainer.fit(loader(), epochs=1)
    path = trainer.checkpoint.latest()
    other = make(tmp_path / "other", [tk.EarlyStopping("train_loss")])
    other.fit(loader(), epochs=1, resume=path)
    assert other.epoch == 1 and other.callbacks[0].num_steps == 1
    with pytest.raises(ValueError, match="state for 1 callbacks but this Trainer has 0"):
        make(tmp_path / "third").fit(loader(), epochs=2, resume=path)


def test_stateless_callbacks_need_not_match_on_resume(tmp_path):
    trainer = make(tmp_path, [Crash(-1)])  # no state
    trainer.fit(loader(), epochs=1)
    again = make(tmp_path)
    again.fit(loader(), epochs=2, resume="latest")
    assert again.epoch == 2


class Grab:
    """Takes whatever state it is given (to read one entry of a checkpoint as data)."""

    def load_state_dict(self, state):
        self.state = state


def test_a_checkpoint_in_the_0_1_0_layout_still_resumes_bitwise(tmp_path):
    """0.1.0 kept the trainer's RNG at the save in the file's own record, the epoch's start
    RNG and the loss sums under other names; such a checkpoint must still resume exactly."""
    torch.manual_seed(5)
    straight = make(tmp_path / "a", [Crash(-1)])
    straight.fit(loader(), epochs=3)
    torch.manual_seed(5)
    crashed = make(tmp_path / "b", [Crash(4)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(loader(), epochs=3)
    # Rewrite its latest checkpoint (step 3, mid-epoch, mid-window) as 0.1.0 wrote it.
    pieces, grab = make(tmp_path / "scratch"), Grab()
    latest = crashed.checkpoint.latest()
    tk.load_checkpoint(latest, {"model": pieces.model, "optimizer": pieces.optimizer,
                                "accumulator": pieces.accumulator, "trainer": grab})
    new = grab.state
    assert new["batch_idx"] > 0 and len(new["rng"]) == 1
    old = {k: new[k] for k in ("epoch", "batch_idx", "should_stop", "stop_reason", "history",
                               "callbacks", "logger")}
    old.update(epoch_rng=new["rng"][0]["epoch_rng"], epoch_loss=new["loss"]["loss"],
               epoch_count=new["loss"]["count"], rank_rngs=None)
    tk.set_rng_state(new["rng"][0]["rng"])  # what the file's own RNG record then held
    legacy = tk.save_checkpoint(tmp_path / "legacy.pt", {
        "model": pieces.model, "optimizer": pieces.optimizer,
        "accumulator": pieces.accumulator, "trainer": old})
    torch.manual_seed(123)
    resumed = make(tmp_path / "c", [Crash(-1)])
    history = resumed.fit(loader(), epochs=3, resume=legacy)
    assert_bitwise_equal(resumed.model.state_dict(), straight.model.state_dict())
    assert history.records == straight.history.records


def test_a_checkpoint_holds_one_rng_record_per_rank(tmp_path):
    trainer = make(tmp_path)
    trainer.fit(loader(), epochs=1)
    state = torch.load(trainer.checkpoint.latest(), weights_only=True)["state"]["trainer"]
    assert [sorted(r) for r in state["rng"]] == [["epoch_rng", "loss", "rng"]]
    assert state["rng"][0]["epoch_rng"] is None  # saved at an epoch's end: nothing to replay
    assert state["rng"][0]["loss"] is None  # and no partial loss sums of this rank
    assert "epoch_rng" not in state and "rank_rngs" not in state
