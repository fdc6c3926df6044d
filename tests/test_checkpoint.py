"""save_checkpoint / load_checkpoint: round trips, atomicity under SIGKILL, safe loading."""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import torchkit as tk
from tests.conftest import make_model


def assert_nested_equal(a, b, where="state"):
    """Every tensor bitwise equal, every counter equal, the same structure."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_nested_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def build():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    stopper = tk.EarlyStopping(patience=3, restore_best=True)
    accum = tk.GradAccumulator(opt, 3, scaler=scaler, max_norm=1.0)
    return {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler,
            "early_stopping": stopper, "accumulator": accum}


def train(objs, micro_batches, seed=0):
    g = torch.Generator().manual_seed(seed)
    model, accum = objs["model"], objs["accumulator"]
    for _ in range(micro_batches):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        with accum.accumulate():
            loss = F.cross_entropy(model(x), y)
        if accum.backward(loss, batch_size=5):
            objs["scheduler"].step()
        objs["early_stopping"].step(loss.item(), model)


def test_round_trip_of_every_piece_into_fresh_objects(tmp_path):
    objs = build()
    train(objs, 7)  # ends mid-window: the accumulator holds pending gradients
    assert objs["accumulator"].micro_step == 1
    path = tk.save_checkpoint(tmp_path / "c.pt", objs, step=7, epoch=1,
                              metrics={"val_loss": torch.tensor(0.25)})
    fresh = build()
    meta = tk.load_checkpoint(path, fresh)
    assert (meta["step"], meta["epoch"], meta["metrics"]) == (7, 1, {"val_loss": 0.25})
    assert meta["names"] == list(objs)
    for name in objs:
        assert_nested_equal(fresh[name].state_dict(), objs[name].state_dict(), name)
    # ...and both continue identically, bit for bit.
    train(objs, 5, seed=1)
    train(fresh, 5, seed=1)
    assert_nested_equal(fresh["model"].state_dict(), objs["model"].state_dict())


def test_metadata_records_versions_and_rng(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": make_model(), "cfg": {"lr": 0.1}})
    meta = tk.load_checkpoint(path)
    assert meta["torchkit_version"] == tk.__version__
    assert meta["torch_version"] == str(torch.__version__)
    assert meta["extra"] == {"cfg": {"lr": 0.1}}
    assert meta["step"] is None and meta["metrics"] == {}
    payload = torch.load(path, weights_only=True)  # loads without torchkit's help
    assert payload["format_version"] == 2
    assert set(payload["rng"]) >= {"python", "torch", "cuda", "numpy"}


def test_restore_rng_replays_the_same_draws(tmp_path):
    tk.seed_everything(3)
    path = tk.save_checkpoint(tmp_path / "c.pt", {})
    after_save = (random.random(), np.random.rand(), torch.rand(3))
    tk.seed_everything(99)  # scramble
    tk.load_checkpoint(path, restore_rng=True)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == after_save[:2]
    assert torch.equal(again[2], after_save[2])


def test_without_restore_rng_the_generators_are_untouched(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {})
    tk.seed_everything(5)
    expected = torch.rand(2)
    tk.seed_everything(5)
    tk.load_checkpoint(path)
    assert torch.equal(torch.rand(2), expected)


def test_compiled_models_are_saved_unwrapped_and_load_into_either_form(tmp_path):
    model = make_model()
    compiled = torch.compile(model)  # no forward: nothing is actually compiled
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": compiled})
    keys = torch.load(path, weights_only=True)["state"]["model"].keys()
    assert set(keys) == set(model.state_dict())
    plain, wrapped = make_model(), torch.compile(make_model())
    for target in (plain, wrapped):
        nn.init.zeros_(target.get_submodule("0" if target is plain else "_orig_mod.0").weight)
        tk.load_checkpoint(path, {"model": target})
        assert_nested_equal(tk.checkpoint._files.unwrap(target).state_dict(),
                            model.state_dict())


def test_ddp_models_are_saved_unwrapped(tmp_path):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        path = tk.save_checkpoint(tmp_path / "c.pt", {"model": ddp})
        assert set(torch.load(path, weights_only=True)["state"]["model"]) == set(
            model.state_dict())
        other = nn.parallel.DistributedDataParallel(make_model())
        with torch.no_grad():
            other.module[0].weight.zero_()
        tk.load_checkpoint(path, {"model": other})
        assert_nested_equal(other.module.state_dict(), model.state_dict())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("value", "where", "kind"),
    [
        (np.zeros(3), "state['x']", "numpy.ndarray"),
        ({"a": [1, np.float32(2)]}, "state['x']['a'][1]", "numpy.float32"),
        (defaultdict(int), "state['x']", "collections.defaultdict"),
        ({1, 2}, "state['x']", "builtins.set"),
    ],
)
def test_only_plain_data_is_written(tmp_path, value, where, kind):
    with pytest.raises(TypeError, match=rf"{where.replace('[', '.').replace(']', '.')} is a "
                                        rf"{kind}; checkpoints hold only tensors"):
        tk.save_checkpoint(tmp_path / "c.pt", {"x": value})
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="state must be a mapping of names to objects, got list"):
        tk.save_checkpoint(tmp_path / "c.pt", [make_model()])
    with pytest.raises(TypeError, match=r"metrics\['acc'\] must be a number, got 'high'"):
        tk.save_checkpoint(tmp_path / "c.pt", {}, metrics={"acc": "high"})
    with pytest.raises(TypeError, match="metrics must be a mapping of names to numbers"):
        tk.save_checkpoint(tmp_path / "c.pt", {}, metrics=[0.5])
    with pytest.raises(FileNotFoundError):
        tk.save_checkpoint(tmp_path / "missing" / "c.pt", {})


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"v": 1})
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half-written...")
        raise OSError(28, "No space left on device")  # ...then the disk is full

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left") as info:
        tk.save_checkpoint(path, {"v": 2})
    assert info.value.errno == 28 and info.value.filename == str(path)
    monkeypatch.setattr(torch, "save", real_save)
    assert tk.load_checkpoint(path)["extra"] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_not_durable_is_still_atomic(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    tk.save_checkpoint(tmp_path / "c.pt", {"v": 1}, durable=False)
    assert calls == []
    tk.save_checkpoint(tmp_path / "c.pt", {"v": 2})
    assert len(calls) == 2  # the file, then the directory
    assert tk.load_checkpoint(tmp_path / "c.pt")["extra"] == {"v": 2}


# --- loading what torchkit did not write ---------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_runs_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": "torchkit.checkpoint", "state": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(tk.CheckpointError, match=r"evil\.pt: refused to load: .*could run code"):
        tk.load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_names_itself(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": make_model()})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(tk.CheckpointError, match=r"c\.pt: cannot be read, it is truncated or "
                                                 r"corrupt") as info:
        tk.load_checkpoint(path)
    assert info.value.path == path


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, os.urandom(4096)])
def test_garbage_is_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "g.pt"
    path.write_bytes(content)
    with pytest.raises(tk.CheckpointError, match=r"g\.pt: "):
        tk.load_checkpoint(path)


def test_foreign_and_future_files(tmp_path):
    torch.save(make_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(tk.CheckpointError, match="not a torchkit checkpoint"):
        tk.load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "torchkit.checkpoint", "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(tk.CheckpointError, match="format version 99, newer than this torchkit"):
        tk.load_checkpoint(tmp_path / "new.pt")
    torch.save({"format": "torchkit.checkpoint", "format_version": 1}, tmp_path / "part.pt")
    with pytest.raises(tk.CheckpointError, match=r"incomplete torchkit checkpoint: no \['epoch'"):
        tk.load_checkpoint(tmp_path / "part.pt")
    with pytest.raises(tk.CheckpointError, match="no such file"):
        tk.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(tk.CheckpointError, match="not a file"):
        tk.load_checkpoint(tmp_path)


def test_missing_names(tmp_path, caplog):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": make_model(), "cfg": 1})
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(tk.CheckpointError, match="holds no 'optimizer'; it holds 'model', 'cfg'"):
        tk.load_checkpoint(path, {"model": make_model(), "optimizer": opt})
    with pytest.warns(UserWarning, match="holds no 'optimizer'; left as it is"):
        meta = tk.load_checkpoint(path, {"optimizer": opt}, strict=False)
    assert meta["names"] == ["model", "cfg"]
    with pytest.raises(TypeError, match=r"state\['cfg'\] has no load_state_dict\(\)"):
        tk.load_checkpoint(path, {"cfg": {}})


def test_strict_is_passed_to_models(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": make_model()})
    bigger = nn.Sequential(*make_model(), nn.Linear(3, 3))
    with pytest.raises(tk.CheckpointError, match=r"state\['model'\] does not fit the "
                       r"Sequential: missing keys: 3\.weight, 3\.bias\. Is it the same"):
        tk.load_checkpoint(path, {"model": bigger})
    with pytest.warns(UserWarning, match=r"loaded state\['model'\] only in part: missing "
                      r"keys: 3\.weight, 3\.bias"):
        tk.load_checkpoint(path, {"model": bigger}, strict=False)
    assert torch.equal(bigger[0].weight, make_model()[0].weight)


# --- a writer killed at random moments -----------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch, torchkit as tk
    manager = tk.CheckpointManager(sys.argv[1], keep_last=2)
    step = manager.load("latest")["step"] if manager.latest() else 0
    while True:
        step += 1
        # 8 MB whose every value is the step: a torn write would mix steps.
        manager.save({"w": torch.full((2_000_000,), float(step)), "step": step}, step=step)
        print(step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_at_random_moments_never_corrupts(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "ckpts"
    rng = random.Random(0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    last_seen = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(directory)],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        proc.stdout.readline()  # one save completed: kill somewhere in the next ones
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        manager = tk.CheckpointManager(directory, keep_last=2)
        assert not [p for p in directory.iterdir() if ".tmp-" in p.name]  # cleaned up
        meta = manager.load("latest")
        w = tk.load_checkpoint(manager.latest())["extra"]["w"]
        assert meta["step"] == meta["extra"]["step"] > last_seen
        assert torch.all(w == float(meta["step"]))
        for path in manager.checkpoints():  # every file under a final name is whole
            tk.load_checkpoint(path)
        last_seen = meta["step"]


def test_str_paths_work_and_files_load_with_plain_torch(tmp_path):
    path = tk.save_checkpoint(str(tmp_path / "c.pt"), {"v": torch.arange(3)})
    assert isinstance(path, Path)
    buffer = io.BytesIO(path.read_bytes())
    assert torch.load(buffer, weights_only=True)["state"]["v"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("checksum", [False, True])
def test_checksum_option_and_global_setting_untouched(tmp_path, checksum):
    import zipfile

    before = torch.serialization.get_crc32_options()
    path = tk.save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(10.0)}, checksum=checksum)
    assert torch.serialization.get_crc32_options() == before
    with zipfile.ZipFile(path) as z:
        assert (z.testzip() is None) == checksum  # only checksummed zips verify
    assert torch.equal(tk.load_checkpoint(path)["extra"]["w"], torch.arange(10.0))
