"""WandbLogger for real, offline (no network): read back from W&B's own run files."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import wandb
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb.proto import wandb_internal_pb2

import torchkit as tk
from torchkit.loggers._wandb import offline_run_files


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def records(path: Path):
    """Decode a .wandb file: a 7-byte ':W&B' header, then LevelDB log records."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_run(root: Path, run_id: str):
    """All offline runs of ``run_id`` under ``root/wandb``, in order: history rows, config,
    summary, and how many offline runs (one per start) there were."""
    wandb.teardown()  # as at a process's exit: W&B's service writes out what it holds
    rows, config, summary = [], {}, {}
    paths = offline_run_files(root / "wandb", run_id)
    assert set(paths) == set(root.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    for path in paths:
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.append({k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")})
            elif kind in ("config", "run"):
                updates = record.config.update if kind == "config" else record.run.config.update
                config.update({u.key: json.loads(u.value_json) for u in updates})
            elif kind == "summary":
                summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                for u in record.summary.update})
    return rows, config, summary, len(paths)


class Crash(tk.Callback):
    """Raise at the end of epoch ``at``: after the logger logged it, before its checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == self.at:
            raise RuntimeError("simulated crash")


def fit(logger, checkpoint_dir, *, epochs=4, crash_at=None, resume=None):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Linear(4, 1)
    trainer = tk.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.05), nn.functional.mse_loss,
        logger=logger, progress=False, seed=0,
        callbacks=[] if crash_at is None else [Crash(crash_at)],
        checkpoint=tk.CheckpointManager(checkpoint_dir, keep_last=2),
    )
    loader = DataLoader(data, batch_size=16, shuffle=True)
    return trainer.fit(loader, loader, epochs=epochs, resume=resume)


def test_offline_metrics_read_back_from_the_run_files(tmp_path):
    logger = tk.WandbLogger("proj", mode="offline", dir=tmp_path, run_id="run0")
    assert logger.state_dict() == {"run_id": "run0", "step": None}
    logger.log_metrics({"loss": 0.5, "lr": torch.tensor(0.25)}, step=0)
    logger.log_metrics({"loss": torch.tensor([0.125])}, step=3)
    assert logger.state_dict() == {"run_id": "run0", "step": 3}
    assert repr(logger) == "WandbLogger('proj', run_id='run0', step=3)"
    assert logger.run.project == "proj"
    logger.close()
    rows, _, summary, starts = read_run(tmp_path, "run0")
    assert rows == [{"loss": 0.5, "lr": 0.25, "_step": 0}, {"loss": 0.125, "_step": 3}]
    assert summary["loss"] == 0.125 and starts == 1
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log_metrics({"loss": 1.0}, step=4)
    assert len(tk.WandbLogger("proj", mode="offline", dir=tmp_path).run_id) == 8


def test_trainer_logs_config_and_final_metrics(tmp_path):
    logger = tk.WandbLogger("proj", mode="offline", dir=tmp_path / "wb")
    result = fit(logger, tmp_path / "ckpt", epochs=3)
    logger.close()
    rows, config, summary, _ = read_run(tmp_path / "wb", logger.run_id)
    assert [row["_step"] for row in rows] == [0, 1, 2]
    assert [row["val_loss"] for row in rows] == pytest.approx(result["val_loss"], rel=1e-6)
    assert config["optimizer"] == "SGD" and config["epochs"] == 3 and config["lr"] == 0.05
    assert summary["hparam/val_loss"] == pytest.approx(result["val_loss"][-1], rel=1e-6)
    assert "hparam/lr" not in summary


@pytest.mark.parametrize("crash_at", [1, 3])
def test_fit_resume_continues_the_same_run_without_duplicated_steps(tmp_path, crash_at):
    straight_logger = tk.WandbLogger("proj", mode="offline", dir=tmp_path / "straight")
    straight = fit(straight_logger, tmp_path / "straight-ckpt")
    straight_logger.close()

    crashed = tk.WandbLogger("proj", mode="offline", dir=tmp_path / "wb")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, tmp_path / "ckpt", crash_at=crash_at)
    crashed.run.finish()  # what wandb's own exit hook does when the process dies, with:
    rows, _, _, _ = read_run(tmp_path / "wb", crashed.run_id)
    assert [row["_step"] for row in rows] == list(range(crash_at + 1))

    resumed = tk.WandbLogger("proj", mode="offline", dir=tmp_path / "wb")  # a new process
    again = fit(resumed, tmp_path / "ckpt", resume="latest")
    resumed.close()
    assert resumed.run_id == crashed.run_id
    assert again.records == [pytest.approx(record, rel=1e-6) for record in straight.records]
    rows, config, summary, starts = read_run(tmp_path / "wb", crashed.run_id)
    expected, expected_config, expected_summary, _ = read_run(
        tmp_path / "straight", straight_logger.run_id)
    assert starts == 2  # the same run id, started twice
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]  # each step once
    assert rows == [pytest.approx(row, rel=1e-6) for row in expected]
    assert config == expected_config
    assert {k: v for k, v in summary.items() if k.startswith("hparam/")} == pytest.approx(
        {k: v for k, v in expected_summary.items() if k.startswith("hparam/")}, rel=1e-6)


def test_load_state_skips_what_earlier_offline_runs_logged_past_the_checkpoint(tmp_path):
    crashed = tk.WandbLogger("proj", mode="offline", dir=tmp_path, run_id="r1")
    crashed.log_metrics({"a": 0.0}, step=0)
    state = roundtrip(crashed.state_dict())
    crashed.log_metrics({"a": 1.0}, step=1)
    crashed.log_metrics({"a": 2.0}, step=2)
    crashed.close()
    wandb.teardown()  # the crashed process exits
    resumed = tk.WandbLogger("proj", mode="offline", dir=tmp_path)
    resumed.load_state_dict(state)
    for step in (1, 2, 3):
        resumed.log_metrics({"a": float(step)}, step=step)
    assert resumed.state_dict() == {"run_id": "r1", "step": 3}
    resumed.log_hparams({"lr": 0.1, "dtype": torch.float32, "t": torch.tensor(2)}, {"a": 3.0})
    resumed.log_hparams({"lr": 0.1, "dtype": torch.float32, "t": torch.tensor(2)}, {"a": 3.0})
    # a state loaded into a logger with an open run finishes that run first
    resumed.load_state_dict(roundtrip(resumed.state_dict()))
    resumed.log_metrics({"a": 4.0}, step=4)
    resumed.close()
    rows, config, summary, _ = read_run(tmp_path, "r1")
    assert [(row["_step"], row["a"]) for row in rows] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert {k: config[k] for k in ("lr", "dtype", "t")} == {"lr": 0.1, "dtype": "torch.float32",
                                                            "t": 2}
    assert summary["hparam/a"] == 3.0


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr("torchkit.loggers._wandb.is_main_process", lambda: False)
    logger = tk.WandbLogger("proj", mode="offline", dir=tmp_path)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_hparams({"lr": 0.1}, {"a": 1.0})
    logger.close()
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(TypeError, match="step must be an int >= 0, got -1"):
        logger.log_metrics({"a": 1.0}, step=-1)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match=r"project must be a non-empty string, got ''; "
                       r"run_id must be a non-empty string or None, got 5"):
        tk.WandbLogger("", run_id=5)
    with pytest.raises(ValueError, match="mode must be 'online', 'offline', 'disabled' or "
                       "None, got 'local'"):
        tk.WandbLogger("proj", mode="local")
    logger = tk.WandbLogger("proj", mode="offline", dir=tmp_path)
    with pytest.raises(KeyError, match=r"unexpected keys \['epoch'\]"):
        logger.load_state_dict({"run_id": "x", "step": 1, "epoch": 0})
    with pytest.raises(TypeError, match=r"'step' must be an int or None, got True"):
        logger.load_state_dict({"run_id": "x", "step": True})
    with pytest.raises(TypeError, match="hparams must be a mapping of names to values, got list"):
        logger.log_hparams([("lr", 1)], {})
    with pytest.raises(TypeError, match="hyperparameter names must be strings, got 1"):
        logger.log_hparams({1: 2}, {})
    logger.close()
    with pytest.raises(RuntimeError, match="is closed"):
        logger.load_state_dict({"run_id": None, "step": None})
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r'pip install "torchkit\[wandb\]"'):
        tk.WandbLogger("proj")
