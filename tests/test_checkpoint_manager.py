"""CheckpointManager: retention, restart, fallback past corrupt files, stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchkit as tk
from tests.conftest import make_model


def names(paths):
    return [Path(p).name for p in paths]


def ckpt(step: int) -> str:
    return f"checkpoint-{step:09d}.pt"


def expected_kept(values, keep_last, keep_best, mode):
    """The retention policy, stated plainly: last k by step, plus best k by metric."""
    steps = list(range(1, len(values) + 1))
    kept = set(steps if keep_last is None else steps[-keep_last:])
    sign = 1 if mode == "min" else -1
    ranked = sorted(steps, key=lambda s: (sign * values[s - 1], s))
    kept |= set(ranked[: max(keep_best, 1)])
    return sorted(kept)


@given(
    values=st.lists(st.integers(0, 5).map(float), min_size=1, max_size=12),
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    keep_best=st.integers(0, 3),
    mode=st.sampled_from(["min", "max"]),
)
def test_retention_keeps_last_k_and_best_k(values, keep_last, keep_best, mode):
    with tempfile.TemporaryDirectory() as directory:
        manager = tk.CheckpointManager(directory, keep_last=keep_last, keep_best=keep_best,
                                       monitor="val", mode=mode, durable=False)
        for step, value in enumerate(values, start=1):
            manager.save({"v": value}, step=step, metrics={"val": value})
        kept = expected_kept(values, keep_last, keep_best, mode)
        assert names(manager.checkpoints()) == [ckpt(s) for s in kept]
        assert sorted(p.name for p in Path(directory).glob("*.pt")) == [ckpt(s) for s in kept]
        assert manager.latest().name == ckpt(len(values))
        sign = 1 if mode == "min" else -1
        best_step = min(range(1, len(values) + 1), key=lambda s: (sign * values[s - 1], s))
        assert manager.best().name == ckpt(best_step)
        # A new manager on the same directory sees the same thing.
        again = tk.CheckpointManager(directory, keep_last=keep_last, keep_best=keep_best,
                                     monitor="val", mode=mode)
        assert again.checkpoints() == manager.checkpoints()
        assert (again.latest(), again.best()) == (manager.latest(), manager.best())


def test_without_monitor_only_the_last_are_kept(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=2)
    for step in range(5):
        manager.save({"model": make_model()}, step=step)
    assert names(manager.checkpoints()) == [ckpt(3), ckpt(4)]
    with pytest.raises(ValueError, match=r"best checkpoints need CheckpointManager\(monitor"):
        manager.best()


def test_checkpoints_without_the_monitored_metric_are_never_best(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=1, monitor="val_loss")
    manager.save({}, step=1, metrics={"val_loss": 0.5})
    manager.save({}, step=2)  # e.g. a mid-epoch checkpoint without validation
    manager.save({}, step=3, metrics={"val_loss": float("nan")})
    assert manager.best().name == ckpt(1)
    assert names(manager.checkpoints()) == [ckpt(1), ckpt(3)]
    empty = tk.CheckpointManager(tmp_path / "empty", monitor="val_loss")
    assert empty.best() is None and empty.latest() is None and empty.checkpoints() == []


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    manager = tk.CheckpointManager(tmp_path)
    manager.save({"v": 1}, step=7)
    manager.save({"v": 2}, step=7)
    assert names(manager.checkpoints()) == [ckpt(7)]
    assert manager.load()["extra"] == {"v": 2}


def test_load_best_latest_and_path_into_objects(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=3, monitor="acc", mode="max")
    models = []
    for step, acc in enumerate([0.5, 0.9, 0.7]):
        model = make_model()
        with torch.no_grad():
            model[0].weight.fill_(step)
        models.append(model)
        manager.save({"model": model}, step=step, epoch=step, metrics={"acc": acc})
    target = make_model()
    assert manager.load("best", {"model": target})["metrics"] == {"acc": 0.9}
    assert torch.all(target[0].weight == 1)
    assert manager.load("latest", {"model": target})["epoch"] == 2
    assert manager.load(tmp_path / ckpt(0), {"model": target})["step"] == 0
    assert torch.all(target[0].weight == 0)


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=3, monitor="loss")
    for step in range(3):
        manager.save({"v": step}, step=step, metrics={"loss": 1.0 - step / 10})
    corrupt(tmp_path / ckpt(2))
    with pytest.warns(RuntimeWarning, match=rf"skipping unreadable latest checkpoint: "
                                            rf"checkpoint .*{ckpt(2)}: cannot be read"):
        meta = manager.load("latest")
    assert meta["step"] == 1 and meta["extra"] == {"v": 1}
    with pytest.warns(RuntimeWarning, match=rf"skipping unreadable best checkpoint.*{ckpt(2)}"):
        assert manager.load("best")["step"] == 1


def test_nothing_readable(tmp_path):
    manager = tk.CheckpointManager(tmp_path)
    with pytest.raises(tk.CheckpointError, match="holds no latest checkpoint to load"):
        manager.load()
    manager.save({}, step=1)
    corrupt(tmp_path / ckpt(1))
    with pytest.warns(RuntimeWarning), pytest.raises(
        tk.CheckpointError, match=rf"none of its 1 checkpoints can be read: {ckpt(1)}"
    ):
        manager.load()
    with pytest.raises(tk.CheckpointError, match="cannot be read"):
        manager.load(tmp_path / ckpt(1))


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "foreign"])
def test_a_lost_or_broken_index_loses_nothing(tmp_path, damage, caplog):
    manager = tk.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss")
    for step, loss in enumerate([0.3, 0.1, 0.4, 0.5]):
        manager.save({}, step=step, epoch=step, metrics={"loss": loss})
    index = tmp_path / "index.json"
    if damage == "delete":
        index.unlink()
    elif damage == "garbage":
        index.write_text("{not json")
    elif damage == "truncate":
        index.write_text(index.read_text()[:40])
    else:
        index.write_text('{"format": "something else"}')
    again = tk.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss")
    assert again.checkpoints() == manager.checkpoints()
    assert again.best().name == ckpt(1)  # metrics re-read from the files themselves
    assert again.state_dict() == manager.state_dict()
    if damage != "delete":
        assert "ignoring unreadable checkpoint index" in caplog.text


def test_a_checkpoint_written_after_the_index_is_found(tmp_path):
    manager = tk.CheckpointManager(tmp_path, monitor="loss")
    manager.save({}, step=1, metrics={"loss": 0.5})
    # As if the process died between writing a checkpoint and updating the index:
    tk.save_checkpoint(tmp_path / ckpt(2), {}, step=2, epoch=0, metrics={"loss": 0.1})
    again = tk.CheckpointManager(tmp_path, monitor="loss")
    assert again.latest().name == ckpt(2) and again.best().name == ckpt(2)


def test_stale_temporaries_are_removed_but_live_writers_are_left_alone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".{ckpt(5)}.tmp-{dead_pid}-abc123"
    stale_index = tmp_path / f".index.json.tmp-{dead_pid}-xyz"
    live = tmp_path / f".{ckpt(6)}.tmp-{os.getppid()}-def456"
    unrelated = tmp_path / "notes.txt"
    for p in (stale, stale_index, live, unrelated):
        p.write_bytes(b"partial")
    manager = tk.CheckpointManager(tmp_path)
    assert not stale.exists() and not stale_index.exists()
    assert live.exists() and unrelated.exists()
    assert manager.checkpoints() == []


def test_state_dict_round_trip(tmp_path):
    manager = tk.CheckpointManager(tmp_path, monitor="loss")
    manager.save({}, step=3, epoch=1, metrics={"loss": 0.2})
    state = manager.state_dict()
    assert state == {"next_seq": 1, "entries": [{"file": ckpt(3), "step": 3, "seq": 0,
                                                 "epoch": 1, "metrics": {"loss": 0.2}}]}
    (tmp_path / "index.json").unlink()
    other = tk.CheckpointManager(tmp_path, monitor="loss")
    other.load_state_dict(state)
    assert other.state_dict() == state
    with pytest.raises(KeyError, match=r"missing keys \['entries', 'next_seq'\]"):
        other.load_state_dict({})
    assert repr(other) == (f"CheckpointManager({str(tmp_path)!r}, keep_last=3, keep_best=0, "
                           "monitor='loss', checkpoints=1)")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last must be an int >= 1 or None, got 0"),
        ({"keep_best": -1}, "keep_best must be an int >= 0, got -1"),
        ({"keep_best": 2}, r"keep_best=2 needs monitor= \(the metric to rank by\)"),
        ({"mode": "best"}, "mode must be 'min' or 'max', got 'best'"),
        ({"prefix": "a/b"}, "prefix must be a non-empty file-name-safe string, got 'a/b'"),
    ],
)
def test_bad_config(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tk.CheckpointManager(tmp_path, **kwargs)


def test_bad_step(tmp_path):
    manager = tk.CheckpointManager(tmp_path)
    for step in (-1, 1.5, None):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            manager.save({}, step=step)


def test_refresh_sees_what_another_manager_wrote(tmp_path):
    reader = tk.CheckpointManager(tmp_path)
    tk.CheckpointManager(tmp_path).save({"v": 1}, step=3)
    assert reader.latest() is None
    reader.refresh()
    assert reader.latest().name == ckpt(3)
