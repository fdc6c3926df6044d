"""MLflowLogger for real, offline: a local sqlite store read back with MlflowClient."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def history(uri, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


class Crash(tk.Callback):
    """Raise at the end of epoch ``at``: after the logger logged it, before its checkpoint."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == self.at:
            raise RuntimeError("simulated crash")


def fit(logger, checkpoint_dir, *, epochs=4, crash_at=None, resume=None, every=None):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = nn.Linear(4, 1)
    trainer = tk.Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.05), nn.functional.mse_loss,
        logger=logger, progress=False, seed=0,
        callbacks=[] if crash_at is None else [Crash(crash_at)],
        checkpoint=tk.CheckpointManager(checkpoint_dir, keep_last=2), checkpoint_every=every,
    )
    loader = DataLoader(data, batch_size=16, shuffle=True)
    return trainer.fit(loader, loader, epochs=epochs, resume=resume)


def test_metrics_read_back_and_state(uri):
    logger = tk.MLflowLogger("exp", tracking_uri=uri)
    assert logger.run_id is None
    state = logger.state_dict()  # a checkpoint before the first log names the run
    assert state == {"run_id": logger.run_id, "step": None} and logger.run_id
    logger.log_metrics({"loss": 0.5, "lr": torch.tensor(0.1)}, step=0)
    logger.log_metrics({"loss": torch.tensor([0.25])}, step=3)
    run_id = logger.run_id
    assert logger.state_dict() == {"run_id": run_id, "step": 3}
    assert repr(logger) == f"MLflowLogger('exp', run_id='{run_id}', step=3)"
    logger.close()
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert history(uri, run_id, "loss") == [(0, 0.5), (3, 0.25)]
    assert history(uri, run_id, "lr") == [(0, pytest.approx(0.1))]
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log_metrics({"loss": 1.0}, step=4)
    # a second logger in the same experiment makes a second run there
    with tk.MLflowLogger("exp", tracking_uri=uri) as other:
        other.log_metrics({"loss": 1.0}, step=0)
    assert client.get_run(other.run_id).info.experiment_id == run.info.experiment_id
    assert other.run_id != run_id


def test_default_store_is_sqlite_under_mlruns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with tk.MLflowLogger("exp") as logger:
        logger.log_metrics({"loss": 1.0}, step=0)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert logger.tracking_uri == uri
    assert history(uri, logger.run_id, "loss") == [(0, 1.0)]
    experiment = MlflowClient(uri).get_experiment_by_name("exp")
    assert experiment.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()


def test_trainer_logs_hparams_and_final_metrics(uri, tmp_path):
    logger = tk.MLflowLogger("exp", tracking_uri=uri)
    result = fit(logger, tmp_path / "ckpt", epochs=3)
    logger.close()
    run = MlflowClient(uri).get_run(logger.run_id)
    params = run.data.params
    assert params["optimizer"] == "SGD" and params["epochs"] == "3" and params["lr"] == "0.05"
    assert params["model"] == "Linear"
    assert history(uri, logger.run_id, "val_loss") == [
        (epoch, pytest.approx(value, rel=1e-6)) for epoch, value in
        enumerate(result["val_loss"])]
    assert history(uri, logger.run_id, "hparam/val_loss") == [
        (2, pytest.approx(result["val_loss"][-1], rel=1e-6))]
    assert "hparam/lr" not in run.data.metrics


@pytest.mark.parametrize(("crash_at", "every"), [(1, None), (3, None), (0, 2)])
def test_fit_resume_continues_the_same_run_without_duplicated_steps(uri, tmp_path, crash_at,
                                                                    every):
    # crash_at=0 with a checkpoint every 2 steps: the checkpoint predates the first log
    straight_logger = tk.MLflowLogger("straight", tracking_uri=uri)
    straight = fit(straight_logger, tmp_path / "straight", epochs=4)
    straight_logger.close()

    crashed = tk.MLflowLogger("exp", tracking_uri=uri)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, tmp_path / "ckpt", crash_at=crash_at, every=every)
    run_id = crashed.run_id  # the process dies here: the logger is never closed
    assert [s for s, _ in history(uri, run_id, "train_loss")] == list(range(crash_at + 1))

    resumed = tk.MLflowLogger("exp", tracking_uri=uri)  # a new process: a new logger
    again = fit(resumed, tmp_path / "ckpt", resume="latest", every=every)
    resumed.close()
    assert resumed.run_id == run_id
    assert again.records == [pytest.approx(record, rel=1e-6) for record in straight.records]
    client = MlflowClient(uri)
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 1
    for key in ("train_loss", "val_loss", "lr"):
        expected = history(uri, straight_logger.run_id, key)
        assert history(uri, run_id, key) == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]
    assert [s for s, _ in history(uri, run_id, "val_loss")] == [0, 1, 2, 3]
    assert client.get_run(run_id).data.params == client.get_run(straight_logger.run_id).data.params
    assert client.get_run(run_id).info.status == "FINISHED"


def test_load_state_skips_exactly_what_the_crashed_run_logged_past_the_checkpoint(uri):
    crashed = tk.MLflowLogger("exp", tracking_uri=uri)
    crashed.log_metrics({"a": 0.0}, step=0)
    state = roundtrip(crashed.state_dict())
    crashed.log_metrics({"a": 1.0}, step=1)  # past the checkpoint, then the process dies
    resumed = tk.MLflowLogger("exp", tracking_uri=uri)
    resumed.load_state_dict(state)
    resumed.log_metrics({"a": 1.0, "b": 5.0}, step=1)  # "b" at step 1 is new: it is logged
    resumed.log_metrics({"a": 2.0}, step=2)
    assert resumed.state_dict() == {"run_id": crashed.run_id, "step": 2}
    assert history(uri, crashed.run_id, "a") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert history(uri, crashed.run_id, "b") == [(1, 5.0)]
    # parameters re-logged on resume do not crash; a changed one is kept and warned about
    resumed.log_hparams({"lr": 0.1, "name": None}, {"a": 2.0})
    resumed.log_hparams({"lr": 0.1, "name": None}, {"a": 2.0})
    with pytest.warns(UserWarning, match=r"already has parameters lr='0.1' \(now '0.2'\)"):
        resumed.log_hparams({"lr": 0.2, "momentum": 0.9}, {"a": 2.0})
    params = MlflowClient(uri).get_run(crashed.run_id).data.params
    assert params == {"lr": "0.1", "name": "None", "momentum": "0.9"}
    assert history(uri, crashed.run_id, "hparam/a") == [(2, 2.0)]
    # a state from before anything was logged starts the run at the first write
    fresh = tk.MLflowLogger("exp", tracking_uri=uri)
    fresh.load_state_dict({"run_id": None, "step": None})
    fresh.log_metrics({"a": 3.0}, step=0)
    assert fresh.run_id not in (None, crashed.run_id)


def test_run_id_continues_an_existing_run(uri):
    with tk.MLflowLogger("exp", tracking_uri=uri) as first:
        first.log_metrics({"a": 0.0}, step=0)
    with tk.MLflowLogger("ignored", tracking_uri=uri, run_id=first.run_id) as again:
        again.log_metrics({"a": 1.0}, step=1)
    assert history(uri, first.run_id, "a") == [(0, 0.0), (1, 1.0)]


def test_only_rank_zero_writes(uri, monkeypatch):
    monkeypatch.setattr("torchkit.loggers._mlflow.is_main_process", lambda: False)
    logger = tk.MLflowLogger("exp", tracking_uri=uri)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_hparams({"lr": 0.1}, {"a": 1.0})
    logger.close()
    assert logger.state_dict() == {"run_id": None, "step": None}
    with pytest.raises(TypeError, match="step must be an int >= 0, got -1"):
        logger.log_metrics({"a": 1.0}, step=-1)  # still validated on every rank


def test_errors(uri, monkeypatch):
    with pytest.raises(TypeError, match=r"experiment must be a non-empty string, got ''; "
                       r"tracking_uri must be a string or None, got 3; run_id must be a "
                       r"non-empty string or None, got 5"):
        tk.MLflowLogger("", tracking_uri=3, run_id=5)
    logger = tk.MLflowLogger("exp", tracking_uri=uri)
    with pytest.raises(KeyError, match=r"missing keys \['run_id'\]"):
        logger.load_state_dict({"step": 1})
    with pytest.raises(TypeError, match=r"'run_id' must be a string or None, got 1; "
                       r"'step' must be an int or None, got '2'"):
        logger.load_state_dict({"run_id": 1, "step": "2"})
    with pytest.raises(TypeError, match="hparams must be a mapping of names to values, got list"):
        logger.log_hparams([("lr", 1)], {})
    with pytest.raises(TypeError, match="hyperparameter names must be strings, got 1"):
        logger.log_hparams({1: 2}, {})
    with pytest.raises(TypeError, match="metric 'x' must be a number"):
        logger.log_metrics({"x": "high"}, step=0)
    logger.close()
    with pytest.raises(RuntimeError, match="is closed"):
        logger.load_state_dict({"run_id": None, "step": None})
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r'pip install "torchkit\[mlflow\]"'):
        tk.MLflowLogger("exp")
