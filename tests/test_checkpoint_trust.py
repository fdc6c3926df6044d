"""Checkpoints you can trust: save order, integrity, hostile files, disk errors, strictness."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import torchkit as tk
from tests.conftest import make_model


def ckpt(step: int) -> str:
    return f"checkpoint-{step:09d}.pt"


def names(paths):
    return [Path(p).name for p in paths]


# --- 1. retention follows the save order ----------------------------------------------


def test_a_save_after_going_back_is_latest_and_is_never_deleted(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss")
    for step, loss in [(10, 0.5), (20, 0.1), (30, 0.4), (40, 0.6)]:
        manager.save({"v": step}, step=step, metrics={"loss": loss})
    assert manager.load("best")["step"] == 20  # resume="best": a new branch
    written = [manager.save({"v": s}, step=s, metrics={"loss": 0.3}) for s in (21, 22, 23)]
    assert all(p.exists() for p in written[-2:]), "a save deleted what it just wrote"
    assert manager.latest() == written[-1]
    assert names(manager.checkpoints()) == [ckpt(20), ckpt(22), ckpt(23)]
    # ... and it survives a new manager on the same directory (the sequence is persisted)
    again = tk.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss")
    assert again.latest().name == ckpt(23)
    assert again.load("latest")["extra"] == {"v": 23}
    again.save({"v": 24}, step=24, metrics={"loss": 0.3})
    assert names(again.checkpoints()) == [ckpt(20), ckpt(23), ckpt(24)]


def test_the_sequence_survives_a_lost_index(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=3)
    for step in (50, 60, 10, 20):  # a branch with lower steps, written later
        manager.save({}, step=step)
    (tmp_path / "index.json").unlink()
    rebuilt = tk.CheckpointManager(tmp_path, keep_last=3)
    assert names(rebuilt.checkpoints()) == [ckpt(60), ckpt(10), ckpt(20)]
    assert rebuilt.latest().name == ckpt(20)
    assert tk.load_checkpoint(rebuilt.latest())["seq"] == 3


def test_fallback_past_a_corrupt_newest_then_new_saves_follow_the_new_branch(tmp_path):
    manager = tk.CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save({"v": step}, step=step)
    newest = tmp_path / ckpt(3)
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 1
    newest.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable latest checkpoint.*digest"):
        assert manager.load("latest")["extra"] == {"v": 2}
    manager.save({"v": 3}, step=3)  # the resumed run reaches step 3 again: replaces it
    manager.save({"v": 4}, step=4)
    assert names(manager.checkpoints()) == [ckpt(3), ckpt(4)]
    assert manager.load("latest")["extra"] == {"v": 4}


def test_a_torchkit_0_1_directory_is_ordered_by_step(tmp_path):
    for step in (3, 1, 2):
        tk.save_checkpoint(tmp_path / ckpt(step), {"v": step}, step=step)
    (tmp_path / "index.json").write_text(json.dumps({
        "format": "torchkit.checkpoint-index", "version": 1,
        "entries": [{"file": ckpt(s), "step": s, "epoch": None, "metrics": {}}
                    for s in (1, 2, 3)]}))
    manager = tk.CheckpointManager(tmp_path, keep_last=3)
    assert names(manager.checkpoints()) == [ckpt(1), ckpt(2), ckpt(3)]
    manager.save({"v": 0}, step=0)
    assert manager.latest().name == ckpt(0)
    assert names(manager.checkpoints()) == [ckpt(2), ckpt(3), ckpt(0)]


BRANCH_WRITER = """
import os, signal, sys, torch, torchkit as tk
manager = tk.CheckpointManager(sys.argv[1], keep_last=2, keep_best=1, monitor="loss")
if sys.argv[2] == "first":
    for step, loss in [(10, 0.5), (20, 0.1), (30, 0.4), (40, 0.6)]:
        manager.save({"w": torch.full((1000,), float(step))}, step=step,
                     metrics={"loss": loss})
else:
    manager.load("best")
    for step in (21, 22, 23):
        manager.save({"w": torch.full((1000,), float(step))}, step=step,
                     metrics={"loss": 0.3})
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_branch_is_what_a_new_process_resumes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(BRANCH_WRITER)
    directory = tmp_path / "ckpt"
    subprocess.run([os.sys.executable, str(script), str(directory), "first"], check=True)
    killed = subprocess.run([os.sys.executable, str(script), str(directory), "branch"])
    assert killed.returncode == -9
    manager = tk.CheckpointManager(directory, keep_last=2, keep_best=1, monitor="loss")
    assert manager.latest().name == ckpt(23)
    assert names(manager.checkpoints()) == [ckpt(20), ckpt(22), ckpt(23)]
    assert tk.load_checkpoint(manager.latest())["extra"]["w"][0] == 23


# --- 2. integrity ----------------------------------------------------------------------


def test_every_single_bit_flip_is_detected(tmp_path):
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": model, "opt": opt, "note": "x"},
                              step=7, metrics={"loss": 0.5})
    data = path.read_bytes()
    rng = random.Random(0)
    flipped = tmp_path / "flipped.pt"
    silent = []
    for trial in range(300):
        bit = rng.randrange(len(data) * 8)
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        flipped.write_bytes(bytes(damaged))
        try:
            tk.load_checkpoint(flipped, {"model": make_model()})
        except tk.CheckpointError:
            continue
        silent.append((trial, bit))
    assert silent == [], f"flips loaded silently: {silent[:5]}"


def test_a_flip_is_found_through_the_manager_and_verify_false_skips_the_check(tmp_path):
    manager = tk.CheckpointManager(tmp_path)
    manager.save({"w": torch.zeros(1000)}, step=1)
    path = manager.save({"w": torch.ones(1000)}, step=2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(tk.CheckpointError, match=r"corrupt: digest mismatch"):
        manager.load(path)
    with pytest.warns(RuntimeWarning, match="digest mismatch"):
        assert torch.equal(manager.load("latest")["extra"]["w"], torch.zeros(1000))
    tk.load_checkpoint(path, verify=False)  # salvage: the damage is not checked


def test_a_missing_or_damaged_trailer_is_corrupt(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"w": torch.arange(100.0)})
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:-48])  # the archive alone: trailer lost
    with pytest.raises(tk.CheckpointError, match="digest trailer is missing or damaged"):
        tk.load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "len.pt").write_bytes(data[:-16] + (1).to_bytes(8, "little") + data[-8:])
    with pytest.raises(tk.CheckpointError, match="digest trailer is damaged"):
        tk.load_checkpoint(tmp_path / "len.pt")


# --- 3. hostile files and names -------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.pt", "/etc/passwd", "sub/checkpoint-1.pt",
                                  "checkpoint-000000001.pt/../../x", "index.json", 3])
def test_names_from_a_loaded_state_never_leave_the_directory(tmp_path, name):
    victim = tmp_path / "outside.pt"
    victim.write_text("precious")
    manager = tk.CheckpointManager(tmp_path / "ckpt", keep_last=1)
    state = {"next_seq": 5, "entries": [{"file": name, "step": 1, "seq": 0, "epoch": None,
                                         "metrics": {}}]}
    with pytest.raises(tk.CheckpointError, match="not a checkpoint file name of this manager"):
        manager.load_state_dict(state)
    manager.save({}, step=2)
    manager.save({}, step=3)
    assert victim.read_text() == "precious"


def test_names_from_the_index_never_leave_the_directory(tmp_path):
    victim = tmp_path / "outside.pt"
    victim.write_text("precious")
    directory = tmp_path / "ckpt"
    tk.CheckpointManager(directory).save({}, step=1)
    index = json.loads((directory / "index.json").read_text())
    index["entries"].append({"file": "../outside.pt", "step": 0, "seq": 0, "epoch": None,
                             "metrics": {}})
    (directory / "index.json").write_text(json.dumps(index))
    with pytest.raises(tk.CheckpointError, match=r"'\.\./outside\.pt', which is not a "
                                                 r"checkpoint file name"):
        tk.CheckpointManager(directory, keep_last=1)
    assert victim.read_text() == "precious"


def _rewrite_zip(source: Path, target: Path, *, compression: int, edit=None) -> None:
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w", compression) as out:
        for info in z.infolist():
            data = z.read(info)
            out.writestr(info.filename, edit(info.filename, data) if edit else data)


def test_compressed_records_are_refused_before_they_expand(tmp_path):
    # torch.save of a plain payload, re-zipped with deflate: a gigabyte of zeros would
    # fit in a megabyte this way; a small one shows the refusal.
    plain = tmp_path / "plain.pt"
    torch.save({"format": "torchkit.checkpoint", "format_version": 1, "state": {},
                "kinds": {}, "rng": {}, "step": None, "epoch": None, "metrics": {},
                "w": torch.zeros(100_000)}, plain)
    bomb = tmp_path / "bomb.pt"
    _rewrite_zip(plain, bomb, compression=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 10_000
    with pytest.raises(tk.CheckpointError,
                       match=r"refused: record '.*' is compressed \(method 8\)"):
        tk.load_checkpoint(bomb)


def test_a_record_claiming_more_bytes_than_the_file_is_refused(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"w": torch.zeros(1000)})
    archive = path.read_bytes()[:-48]
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    # Patch the central directory's sizes of that record to claim 1 GiB.
    start = 0
    while True:
        start = archive.index(b"PK\x01\x02", start)
        name_len = int.from_bytes(archive[start + 28:start + 30], "little")
        if archive[start + 46:start + 46 + name_len].decode() == info.filename:
            break
        start += 4
    big = (1 << 30).to_bytes(4, "little")
    patched = archive[:start + 20] + big + big + archive[start + 28:]
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(patched)
    with pytest.raises(tk.CheckpointError, match=r"refused: record '.*data/0' claims "
                                                 r"1073741824 bytes, more than the file"):
        tk.load_checkpoint(hostile)


@pytest.mark.parametrize("size", range(1, 10))
def test_a_tiny_stub_is_truncated_not_code(tmp_path, size):
    path = tmp_path / "stub.pt"
    path.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x00"[:size])
    with pytest.raises(tk.CheckpointError, match=rf"truncated: {size} bytes"):
        tk.load_checkpoint(path)


# --- 3. disk errors: a real full disk, a real read-only directory ---------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that really fills up (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_a_full_disk_raises_oserror_frees_the_space_and_keeps_the_old_file(small_disk):
    path = small_disk / "c.pt"
    tk.save_checkpoint(path, {"w": torch.full((100_000,), 1.0)})  # 400 kB
    free = _free(small_disk)
    with pytest.raises(OSError) as info:
        tk.save_checkpoint(path, {"w": torch.full((1_000_000,), 2.0)})  # 4 MB: no room
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert str(path) in str(info.value)
    assert _free(small_disk) == free, "the temporary file's space was not freed"
    assert [p.name for p in small_disk.iterdir()] == ["c.pt"]
    assert tk.load_checkpoint(path)["extra"]["w"][0] == 1.0


def test_a_full_disk_under_the_manager_deletes_nothing(small_disk):
    manager = tk.CheckpointManager(small_disk, keep_last=1)
    manager.save({"w": torch.full((100_000,), 1.0)}, step=1)
    with pytest.raises(OSError, match="No space left") as info:
        manager.save({"w": torch.full((1_000_000,), 2.0)}, step=2)
    assert info.value.errno == errno.ENOSPC
    assert names(manager.checkpoints()) == [ckpt(1)]
    assert tk.CheckpointManager(small_disk).load("latest")["step"] == 1


def test_a_read_only_directory_raises_oserror_and_keeps_the_old_file(small_disk):
    path = tk.save_checkpoint(small_disk / "c.pt", {"v": 1})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OSError) as info:
        tk.save_checkpoint(path, {"v": 2})
    assert info.value.errno == errno.EROFS and info.value.filename == str(path)
    assert tk.load_checkpoint(path)["extra"] == {"v": 1}


# --- 4. strict loading -----------------------------------------------------------------


def test_strict_mismatch_names_missing_unexpected_and_shapes(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": nn.Sequential(nn.Linear(4, 8),
                                                                        nn.Linear(8, 3))})
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(5, 2))
    with pytest.raises(tk.CheckpointError) as info:
        tk.load_checkpoint(path, {"model": other})
    message = str(info.value)
    assert "missing keys: 2.weight, 2.bias" in message
    assert "shape mismatches: 1.weight (saved (3, 8), model (5, 8))" in message
    assert "same architecture" in message
    renamed = nn.Sequential(nn.Linear(4, 8))
    renamed.add_module("head", nn.Linear(8, 3))
    with pytest.raises(tk.CheckpointError, match="missing keys: head.weight, head.bias; "
                                                 "unexpected keys: 1.weight, 1.bias"):
        tk.load_checkpoint(path, {"model": renamed})


def test_strict_false_loads_what_matches_and_warns(tmp_path):
    saved = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": saved})
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    with pytest.warns(UserWarning, match=r"only in part: shape mismatches: 1\.weight"):
        tk.load_checkpoint(path, {"model": other}, strict=False)
    assert torch.equal(other[0].weight, saved[0].weight)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_removed(tmp_path, prefix):
    model = make_model()
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": _Raw(state)})
    fresh = make_model()
    tk.load_checkpoint(path, {"model": fresh})
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))


class _Raw:
    """Plain state saved as a 'stateful' entry, as another tool may have written it."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_an_optimizer_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    model = make_model()
    path = tk.save_checkpoint(tmp_path / "c.pt", {"opt": torch.optim.SGD(model.parameters(),
                                                                         lr=0.1)})
    other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(tk.CheckpointError, match=r"state\['opt'\] does not load into the SGD"):
        tk.load_checkpoint(path, {"opt": other})


def test_a_pruned_model_that_meets_a_plain_checkpoint_gets_a_hint(tmp_path):
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": nn.Linear(8, 4)})
    with pytest.raises(tk.CheckpointError, match=r"missing keys: weight_orig.*remove_pruning"):
        tk.load_checkpoint(path, {"model": tk.prune(nn.Linear(8, 4), 0.5)})


# --- 5. pruned checkpoints into freshly built models ------------------------------------


def test_a_pruned_checkpoint_loads_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    pruned = tk.prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), 0.5)
    path = tk.save_checkpoint(tmp_path / "c.pt", {"model": pruned})
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    tk.load_checkpoint(path, {"model": fresh})
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), pruned(x))
    assert tk.sparsity(fresh)["total"] == pytest.approx(0.5, abs=0.01)


def _pruning_run(directory, *, epochs, crash_after=None):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x.sum(1) > 0).long()
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Crash(tk.Callback):
        def on_epoch_end(self, trainer, metrics):
            if crash_after is not None and trainer.epoch + 1 == crash_after:
                raise RuntimeError("crash")

    trainer = tk.Trainer(model, opt, nn.functional.cross_entropy, progress=False,
                         callbacks=[tk.PruningSchedule(0.5, epochs=2), Crash()],
                         checkpoint=tk.CheckpointManager(directory), device="cpu")
    try:
        trainer.fit(data, epochs=epochs, resume="latest")
    except RuntimeError:
        return None
    return model


def test_a_trainer_with_pruning_resumes_into_a_fresh_model(tmp_path):
    straight = _pruning_run(tmp_path / "a", epochs=3)
    assert _pruning_run(tmp_path / "b", epochs=3, crash_after=2) is None
    resumed = _pruning_run(tmp_path / "b", epochs=3)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- 6. plain weights ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip_and_load_without_torchkit(tmp_path, suffix):
    model = make_model()
    path = tk.save_weights(tmp_path / f"w{suffix}", model)
    fresh = tk.load_weights(path, make_model())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values()))
    if suffix == ".pt":
        assert set(torch.load(path, weights_only=True)) == set(model.state_dict())
    else:
        from safetensors.torch import load_file

        assert set(load_file(path)) == set(model.state_dict())


def test_tied_and_wrapped_and_pruned_weights(tmp_path):
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight
    tk.save_weights(tmp_path / "tied.safetensors", tied)  # safetensors refuses shared memory
    pruned = tk.prune(nn.Linear(8, 4), 0.5)
    tk.save_weights(tmp_path / "pruned.safetensors", torch.compile(pruned))
    plain = tk.load_weights(tmp_path / "pruned.safetensors", nn.Linear(8, 4))
    assert torch.equal(plain.weight, pruned.weight) and (plain.weight == 0).float().mean() == 0.5


def test_extract_weights_from_a_checkpoint(tmp_path):
    model = tk.prune(make_model(), 0.3)
    ckpt_path = tk.save_checkpoint(tmp_path / "c.pt", {"model": model, "step": 3}, step=3)
    out = tk.extract_weights(ckpt_path, tmp_path / "w.safetensors")
    fresh = tk.load_weights(out, make_model())
    x = torch.randn(3, 6)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(tk.CheckpointError, match="holds no 'ema'"):
        tk.extract_weights(ckpt_path, tmp_path / "x.pt", name="ema")
    with pytest.raises(tk.CheckpointError, match=r"state\['step'\] is not a model state_dict"):
        tk.extract_weights(ckpt_path, tmp_path / "x.pt", name="step")
    assert tk.load_weights(ckpt_path, make_model()) is not None  # a full checkpoint too


def test_weights_bad_input(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        tk.save_weights(tmp_path / "w.pt", "model")
    with pytest.raises(TypeError, match="path must be a path"):
        tk.save_weights(3, make_model())
    with pytest.raises(tk.CheckpointError, match="no such file"):
        tk.load_weights(tmp_path / "nope.pt", make_model())
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(tk.CheckpointError, match="holds a list, not a state_dict"):
        tk.load_weights(tmp_path / "list.pt", make_model())
    tk.save_weights(tmp_path / "w.pt", nn.Linear(4, 9))
    with pytest.raises(tk.CheckpointError, match="shape mismatches"):
        tk.load_weights(tmp_path / "w.pt", nn.Linear(4, 3))


# --- save-side checks --------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["s", -1, 1.5, True])
def test_step_and_epoch_must_be_counts(tmp_path, bad):
    for name in ("step", "epoch"):
        with pytest.raises(ValueError, match=rf"{name} must be an int >= 0 or None, got"):
            tk.save_checkpoint(tmp_path / "c.pt", {}, **{name: bad})
    assert not (tmp_path / "c.pt").exists()


def test_manager_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="directory must be a path .* got NoneType"):
        tk.CheckpointManager(None)
    with pytest.raises(ValueError, match="async_save must be True or False, got 'yes'"):
        tk.CheckpointManager(tmp_path, async_save="yes")
    with pytest.raises(TypeError, match="which must be 'latest', 'best' or a path, got 3"):
        tk.CheckpointManager(tmp_path).load(3)


# --- 7. asynchronous saves ---------------------------------------------------------------


def _training_state(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    model[1].weight = nn.Parameter(model[1].weight)  # a fresh parameter object
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "view": model[0].weight.detach()[:3], "note": "x"}


def test_async_writes_the_same_bytes_as_a_sync_save(tmp_path):
    state = _training_state()
    rng = torch.get_rng_state()
    sync = tk.CheckpointManager(tmp_path / "sync").save(state, step=4, metrics={"l": 0.5})
    torch.set_rng_state(rng)  # the RNG states are part of the file
    manager = tk.CheckpointManager(tmp_path / "async", async_save=True)
    path = manager.save(state, step=4, metrics={"l": 0.5})
    manager.wait()
    assert path.read_bytes() == sync.read_bytes()


def test_async_snapshot_is_taken_at_save_time(tmp_path):
    model = nn.Linear(1000, 1000)
    manager = tk.CheckpointManager(tmp_path, async_save=True)
    path = manager.save({"model": model}, step=1)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the file is written
    manager.wait()
    fresh = nn.Linear(1000, 1000)
    tk.load_checkpoint(path, {"model": fresh})
    assert torch.equal(fresh.weight, before)


def test_async_at_most_one_save_in_flight(tmp_path, monkeypatch):
    from torchkit.checkpoint import _manager

    active, peak = [], []
    real = _manager.write_payload

    def slow_write(*args, **kwargs):
        active.append(1)
        peak.append(len(active))
        import time

        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            active.pop()

    monkeypatch.setattr(_manager, "write_payload", slow_write)
    manager = tk.CheckpointManager(tmp_path, async_save=True, keep_last=2)
    for step in range(5):
        manager.save({"v": step}, step=step)
    assert manager.load("latest")["extra"] == {"v": 4}  # load waits for the last one
    assert max(peak) == 1 and len(peak) == 5
    assert names(manager.checkpoints()) == [ckpt(3), ckpt(4)]


def test_async_background_error_surfaces_on_the_next_call(small_disk):
    manager = tk.CheckpointManager(small_disk, async_save=True, keep_last=1)
    manager.save({"w": torch.full((100_000,), 1.0)}, step=1)
    manager.wait()
    manager.save({"w": torch.full((1_000_000,), 2.0)}, step=2)  # returns: disk fills later
    with pytest.raises(OSError, match="No space left") as info:
        manager.save({"w": torch.full((10,), 3.0)}, step=3)
    assert info.value.errno == errno.ENOSPC
    manager.wait()  # the error was raised once; nothing else is pending
    assert names(manager.checkpoints()) == [ckpt(1)]
    manager.save({"w": torch.full((10,), 3.0)}, step=3)
    with pytest.raises(OSError, match="No space left"):
        manager.save({"w": torch.full((1_000_000,), 4.0)}, step=4)
        manager.wait()
    assert tk.load_checkpoint(small_disk / ckpt(3))["extra"]["w"][0] == 3.0


ASYNC_KILLED = """
import os, signal, sys, torch, torchkit as tk
manager = tk.CheckpointManager(sys.argv[1], async_save=True)
manager.save({"w": torch.full((10,), 1.0)}, step=1)
manager.wait()
manager.save({"w": torch.full((50_000_000,), 2.0)}, step=2)  # 200 MB in the background
os.kill(os.getpid(), signal.SIGKILL)  # while the writer thread is busy
"""


def test_a_kill_during_the_background_write_keeps_the_previous_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(ASYNC_KILLED)
    done = subprocess.run([os.sys.executable, str(script), str(tmp_path / "ckpt")])
    assert done.returncode == -9
    assert not (tmp_path / "ckpt" / ckpt(2)).exists()
    manager = tk.CheckpointManager(tmp_path / "ckpt")
    assert manager.latest().name == ckpt(1)
    assert manager.load("latest")["extra"]["w"][0] == 1.0
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []


def _async_run(directory, *, epochs, crash_after=None, async_save=True):
    torch.manual_seed(0)
    x = torch.randn(96, 8)
    y = (x.sum(1) > 0).long()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                       shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    class Crash(tk.Callback):
        def on_train_batch_end(self, trainer, batch, batch_idx):
            if crash_after is not None and trainer.global_step == crash_after:
                raise RuntimeError("crash")

    manager = tk.CheckpointManager(directory, async_save=async_save)
    trainer = tk.Trainer(model, opt, nn.functional.cross_entropy, progress=False,
                         callbacks=[Crash()], checkpoint=manager, checkpoint_every=4,
                         device="cpu", seed=1)
    try:
        trainer.fit(data, epochs=epochs, resume="latest")
    except RuntimeError:
        manager.wait()
        return None
    return model


def test_a_trainer_with_async_saves_resumes_bitwise(tmp_path):
    straight = _async_run(tmp_path / "a", epochs=3, async_save=False)
    assert _async_run(tmp_path / "b", epochs=3, crash_after=14) is None
    assert tk.CheckpointManager(tmp_path / "b").load("latest")["step"] == 12
    resumed = _async_run(tmp_path / "b", epochs=3)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _resumable(directory, *, epochs, resume, keep_last=2):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x.sum(1) > 0).long()
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    manager = tk.CheckpointManager(directory, keep_last=keep_last, keep_best=1,
                                   monitor="val_loss")
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5),
                         nn.functional.cross_entropy, progress=False, checkpoint=manager,
                         device="cpu")
    trainer.fit(data, data, epochs=epochs, resume=resume)
    return manager


def test_a_trainer_resumed_from_an_older_checkpoint_keeps_its_new_branch(tmp_path):
    first = _resumable(tmp_path, epochs=4, resume=None)
    oldest = first.checkpoints()[0]
    done = tk.load_checkpoint(oldest)["epoch"] + 1  # epochs completed at that checkpoint
    manager = _resumable(tmp_path, epochs=done + 2, resume=oldest)
    latest = tk.load_checkpoint(manager.latest())
    assert latest["epoch"] + 1 == done + 2 and latest["seq"] == 5
    new_branch = [p for p in manager.checkpoints() if tk.load_checkpoint(p)["seq"] >= 4]
    assert len(new_branch) == 2, names(manager.checkpoints())
    again = _resumable(tmp_path, epochs=done + 3, resume="latest")
    assert tk.load_checkpoint(again.latest())["epoch"] + 1 == done + 3


def test_sharded_state_is_refused_and_nothing_is_written(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard = distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])
        for state in ({"model": {"w": shard}}, {"p": nn.Parameter(shard)}):
            with pytest.raises(tk.CheckpointError, match=r"is a sharded DTensor .* "
                                                         r"CheckpointManager\(format='dcp'\)"):
                tk.save_checkpoint(tmp_path / "c.pt", state)
        assert not (tmp_path / "c.pt").exists()
    finally:
        dist.destroy_process_group()


def test_fit_returns_after_an_async_save_is_on_disk(tmp_path, monkeypatch):
    from torchkit.checkpoint import _manager

    real = _manager.write_payload

    def slow(*args, **kwargs):
        import time

        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(_manager, "write_payload", slow)
    model = nn.Linear(4, 2)
    manager = tk.CheckpointManager(tmp_path, async_save=True)
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         nn.functional.cross_entropy, progress=False, checkpoint=manager,
                         device="cpu")
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    trainer.fit(data, epochs=2)
    assert not manager._writer.busy
    assert [tk.load_checkpoint(p)["epoch"] for p in manager.checkpoints()] == [0, 1]


def test_a_piece_that_does_not_fit_keeps_its_error_type(tmp_path):
    stopper = tk.EarlyStopping()
    path = tk.save_checkpoint(tmp_path / "c.pt", {"stopper": {"best": 1.0}})
    with pytest.raises(KeyError) as info:
        tk.load_checkpoint(path, {"stopper": stopper})
    assert isinstance(info.value, tk.CheckpointError) and info.value.path == path
    assert str(info.value).startswith(f"checkpoint {path}: state['stopper'] does not load")


def test_async_reuses_its_host_buffers_and_writes_fresh_values(tmp_path):
    model = nn.Linear(256, 256)
    manager = tk.CheckpointManager(tmp_path, async_save=True, keep_last=1)
    manager.save({"model": model}, step=1)
    manager.wait()
    spare = {id(b) for buffers in manager._pool.values() for b in buffers}
    assert spare, "the snapshot's buffers were not kept for the next save"
    with torch.no_grad():
        model.weight.fill_(7.0)
    path = manager.save({"model": model}, step=2)
    manager.wait()
    assert {id(b) for buffers in manager._pool.values() for b in buffers} == spare
    fresh = nn.Linear(256, 256)
    tk.load_checkpoint(path, {"model": fresh})
    assert torch.equal(fresh.weight, model.weight)
