"""Trainer: learns, composes the pieces, calls hooks in order, and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:1400], perm[1400:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.1), nn.Linear(32, 10),
    )


def test_a_small_cnn_learns_digits(digits):
    train, val = digits
    torch.manual_seed(0)
    model = small_cnn()
    trainer = tk.Trainer(model, torch.optim.Adam(model.parameters(), lr=3e-3),
                         F.cross_entropy, metrics={"acc": tk.accuracy}, progress=False)
    val_loader = DataLoader(val, batch_size=128)
    history = trainer.fit(DataLoader(train, batch_size=32, shuffle=True), val_loader, epochs=15)
    # issue 13: accumulate=1 is the plain loop now (no n/32 weighting of the short last
    # batch), a different trajectory; 15 epochs, the same 0.95 bar.
    assert len(history) == 15
    assert history["val_acc"][-1] >= 0.95
    assert history["train_loss"][-1] < history["train_loss"][0]
    # evaluate and predict agree with the history and with each other
    result = trainer.evaluate(val_loader)
    assert result["val_acc"] == pytest.approx(history["val_acc"][-1])
    assert result["val_loss"] == pytest.approx(history["val_loss"][-1])
    logits = trainer.predict(val_loader)
    assert logits.shape == (len(val), 10)
    targets = val.tensors[1]
    assert (logits.argmax(1) == targets).float().mean().item() == pytest.approx(result["val_acc"])
    assert F.cross_entropy(logits, targets).item() == pytest.approx(result["val_loss"], rel=1e-5)
    assert trainer.evaluate(val_loader, prefix="test").keys() == {"test_loss", "test_acc"}


def regression_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


def linear_trainer(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs.setdefault("progress", False)
    return tk.Trainer(model, opt, F.mse_loss, **kwargs)


class Recorder(tk.Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer):
        self.events.append(f"epoch_start {trainer.epoch}")

    def on_train_batch_start(self, trainer, batch, batch_idx):
        self.events.append(f"batch_start {batch_idx}")

    def on_train_batch_end(self, trainer, batch, batch_idx):
        self.events.append(f"batch_end {batch_idx} step {trainer.global_step}")

    def on_validation_end(self, trainer, metrics):
        self.events.append(f"validation_end {sorted(metrics)}")

    def on_epoch_end(self, trainer, metrics):
        self.events.append(f"epoch_end {trainer.epoch} {sorted(metrics)}")

    def on_checkpoint_save(self, trainer, checkpoint):
        self.events.append(f"checkpoint_save {sorted(checkpoint)}")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


def test_hooks_run_in_the_documented_order(tmp_path):
    recorder = Recorder()
    data = DataLoader(regression_data(12), batch_size=4)
    trainer = linear_trainer(callbacks=[recorder], accumulate=2,
                             checkpoint=tk.CheckpointManager(tmp_path))
    trainer.fit(data, data, epochs=1)
    keys = ["val_loss"]
    assert recorder.events == [
        "fit_start", "epoch_start 0",
        "batch_start 0", "batch_end 0 step 0",
        "batch_start 1", "batch_end 1 step 1",
        "batch_start 2", "batch_end 2 step 1",  # the partial window is flushed after
        f"validation_end {keys}",
        f"epoch_end 0 {sorted(['train_loss', 'val_loss', 'lr'])}",
        "checkpoint_save ['accumulator', 'model', 'optimizer', 'trainer']",
        "fit_end",
    ]
    assert trainer.global_step == 2 and trainer.epoch == 1


def test_accumulation_in_the_trainer_equals_the_hand_written_loop():
    data = regression_data(40)
    loader = DataLoader(data, batch_size=6)  # 6 batches + a short one; windows of 3
    trainer = linear_trainer(accumulate=3, max_grad_norm=0.5)
    trainer.fit(loader, epochs=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.05), 3, max_norm=0.5)
    for _ in range(2):
        for x, y in loader:
            with accum.accumulate():
                loss = F.mse_loss(model(x), y)
            accum.backward(loss, batch_size=len(x))
        accum.flush()
    torch.testing.assert_close(dict(trainer.model.named_parameters()),
                               dict(model.named_parameters()), rtol=0, atol=0)


def test_train_loss_is_the_sample_weighted_mean():
    data = regression_data(10)
    loader = DataLoader(data, batch_size=4)  # 4 + 4 + 2
    model = nn.Linear(4, 1)
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), F.mse_loss,
                         progress=False)
    history = trainer.fit(loader, epochs=1)
    expected = F.mse_loss(model(data.tensors[0]), data.tensors[1]).item()
    assert history["train_loss"][0] == pytest.approx(expected, rel=1e-6)


def test_early_stopping_ends_fit_and_restores_the_best():
    data = DataLoader(regression_data(32), batch_size=8)
    noisy = DataLoader(regression_data(16, seed=1), batch_size=8)
    stopper = tk.EarlyStopping(patience=2, restore_best=True)
    trainer = linear_trainer(callbacks=[stopper],
                             optimizer=None)
    trainer.optimizer.param_groups[0]["lr"] = 0.9  # too big: the val loss bounces
    history = trainer.fit(data, noisy, epochs=50)
    assert trainer.should_stop and len(history) < 50
    assert trainer.stop_reason == stopper.reason
    assert trainer.evaluate(noisy)["val_loss"] == pytest.approx(min(history["val_loss"]))


def test_early_stopping_names_a_missing_monitor():
    trainer = linear_trainer(callbacks=[tk.EarlyStopping("val_acc")])
    data = DataLoader(regression_data(8), batch_size=4)
    with pytest.raises(KeyError, match=r"monitors 'val_acc', but the epoch's metrics are "
                                       r"\['lr', 'train_loss', 'val_loss'\]"):
        trainer.fit(data, data, epochs=1)


def test_reduce_lr_on_plateau_lowers_the_lr():
    data = DataLoader(regression_data(16), batch_size=8)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no progress: always a plateau
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    trainer = tk.Trainer(model, opt, F.mse_loss, scheduler=sched, progress=False)
    history = trainer.fit(data, data, epochs=4)
    assert opt.param_groups[0]["lr"] == 0.0
    opt.param_groups[0]["lr"] = 1.0
    trainer.fit(data, data, epochs=7)
    assert history["lr"][-3:] == [1.0, 0.5, 0.25]


def test_schedulers_step_per_epoch_or_per_step():
    loader = DataLoader(regression_data(16), batch_size=4)  # 4 steps per epoch
    for interval, expected in (("epoch", 0.1 * 0.5**2), ("step", 0.1 * 0.5**8)):
        trainer = linear_trainer(scheduler_interval=interval)
        trainer.optimizer.param_groups[0]["lr"] = 0.1
        sched = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1, gamma=0.5)
        trainer.scheduler = sched
        history = trainer.fit(loader, epochs=2)
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert history["lr"][0] == pytest.approx(0.1)


def test_plateau_without_its_metric_is_a_clear_error():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    trainer = tk.Trainer(model, opt, F.mse_loss, scheduler=sched, progress=False)
    with pytest.raises(KeyError, match="ReduceLROnPlateau watches scheduler_monitor='val_loss'"):
        trainer.fit(DataLoader(regression_data(8), batch_size=4), epochs=1)


def test_bf16_on_cpu_trains():
    trainer = linear_trainer(precision="bf16")
    data = DataLoader(regression_data(64), batch_size=16)
    history = trainer.fit(data, data, epochs=8)
    assert history["val_loss"][-1] < 0.5 * history["val_loss"][0]


class Autoencoder(tk.Trainer):
    """A non-classification task: batches are bare tensors, the target is the input."""

    def train_step(self, batch):
        return F.mse_loss(self.model(batch), batch)

    def eval_step(self, batch):
        return {"loss": F.mse_loss(self.model(batch), batch), "batch_size": len(batch)}


def test_custom_steps_for_an_autoencoder():
    torch.manual_seed(0)
    x = torch.randn(64, 2) @ torch.randn(2, 6)  # rank-2 data: a 2-d bottleneck suffices
    model = nn.Sequential(nn.Linear(6, 2), nn.Linear(2, 6))
    trainer = Autoencoder(model, torch.optim.Adam(model.parameters(), lr=0.02), progress=False)
    loader = DataLoader(x, batch_size=16)
    history = trainer.fit(loader, loader, epochs=40)
    assert history["val_loss"][-1] < 0.05 * history["val_loss"][0]
    assert trainer.predict(loader).shape == (64, 6)


def test_dict_batches():
    data = regression_data(16)
    batches = [{"inputs": x, "targets": y} for x, y in DataLoader(data, batch_size=8)]
    trainer = linear_trainer()
    history = trainer.fit(batches, batches, epochs=2)
    assert set(history.keys()) == {"epoch", "train_loss", "val_loss", "lr"}
    assert trainer.predict(batches).shape == (16, 1)
    with pytest.raises(KeyError, match=r"a dict batch needs its targets under one of the keys"):
        linear_trainer().fit([{"inputs": data.tensors[0]}], epochs=1)


def test_stateful_metrics_are_reset_and_computed_per_evaluation(digits):
    _, val = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cm = tk.ConfusionMatrix(10)
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                         metrics={"acc": tk.accuracy, "cm": cm}, progress=False)
    loader = DataLoader(val, batch_size=100)
    result = trainer.evaluate(loader)
    trainer.evaluate(loader)
    assert cm.compute().sum().item() == len(val)  # reset between evaluations
    # issue 13: a metric is never dropped; the matrix comes back under its own name
    assert set(result) == {"val_loss", "val_acc", "val_cm"}
    torch.testing.assert_close(result["val_cm"], cm.compute(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_loss(mode):
    class Poisoned(tk.Trainer):
        def train_step(self, batch):
            loss = super().train_step(batch)
            return loss * math.nan if self.epoch == 1 and self.batch_idx == 1 else loss

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    trainer = Poisoned(model, torch.optim.SGD(model.parameters(), lr=0.01), F.mse_loss,
                       nonfinite=mode, progress=False)
    data = DataLoader(regression_data(16), batch_size=4)
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"nan/inf at epoch 1, batch 1, optimizer "
                                                     r"step 6"):
            trainer.fit(data, epochs=3)
    else:
        history = trainer.fit(data, epochs=3)
        assert all(math.isfinite(v) for v in history["train_loss"])
        assert trainer.accumulator.skipped_steps == 1
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"precision": "64"}, ValueError, "precision must be '32', 'bf16' or '16', got '64'"),
        ({"precision": "16"}, ValueError, "precision='16' needs a CUDA device"),
        ({"checkpoint_every": 5}, ValueError, "checkpoint_every needs checkpoint="),
        ({"checkpoint": "dir"}, ValueError, "checkpoint must be a CheckpointManager or None"),
        ({"scheduler_interval": "batch"}, ValueError, "scheduler_interval must be 'epoch' or"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be 'raise' or 'skip'"),
        ({"device": "gpu0"}, ValueError, "device must be 'auto' or a torch device, got 'gpu0'"),
        ({"callbacks": [object()]}, TypeError, r"callbacks\[0\] \(object\) is not a callback"),
        ({"metrics": {"acc": 3}}, TypeError, "metric 'acc' must be a callable"),
        ({"metrics": [tk.accuracy, tk.accuracy]}, ValueError, "two metrics are named 'accuracy'"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        linear_trainer(**kwargs)


def test_bad_calls():
    model = nn.Linear(4, 1)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        tk.Trainer("model", torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        tk.Trainer(model, "sgd")
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    data = DataLoader(regression_data(8), batch_size=4)
    with pytest.raises(TypeError, match=r"Trainer\(loss_fn=None\) cannot run the default step"):
        trainer.fit(data, epochs=1)
    trainer = linear_trainer()
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        trainer.fit(data, epochs=0)
    with pytest.raises(ValueError, match="resume='latest' needs Trainer"):
        trainer.fit(data, epochs=1, resume="latest")
    with pytest.raises(ValueError, match="evaluate\\(\\) got no samples"):
        trainer.evaluate([])
    with pytest.raises(ValueError, match="predict\\(\\) got no batches"):
        trainer.predict([])
    with pytest.raises(TypeError, match=r"the default step expects a batch \(inputs, targets\)"):
        linear_trainer().fit([torch.ones(2, 4)], epochs=1)


def test_exceptions_reach_on_exception_and_propagate():
    seen = []

    class Boom(tk.Callback):
        def on_train_batch_end(self, trainer, batch, batch_idx):
            raise RuntimeError("boom")

        def on_exception(self, trainer, exception):
            seen.append(str(exception))

    trainer = linear_trainer(callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(DataLoader(regression_data(8), batch_size=4), epochs=1)
    assert seen == ["boom"]


def test_history_plot_and_state(tmp_path):
    trainer = linear_trainer()
    data = DataLoader(regression_data(16), batch_size=8)
    history = trainer.fit(data, data, epochs=3)
    fig = history.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr"]
    assert history.best("val_loss") == min(history["val_loss"])
    assert history.best_epoch("val_loss") == history["val_loss"].index(min(history["val_loss"]))
    again = tk.History()
    again.load_state_dict(history.state_dict())
    assert again.records == history.records
    with pytest.raises(KeyError, match="no metric 'val_acc' in the history"):
        history["val_acc"]
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'low'"):
        history.best("val_loss", "low")
    with pytest.raises(ValueError, match="the history is empty"):
        tk.History().plot()
    with pytest.raises(ValueError, match="metric 'x' has no recorded value"):
        tk.History([{"x": math.nan}]).best("x")
    assert repr(history) == "History(epochs=3, keys=['epoch', 'train_loss', 'val_loss', 'lr'])"


def test_tensorboard_and_csv_logs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = DataLoader(regression_data(32), batch_size=8)
    tb = tk.TensorBoardLogger(tmp_path / "tb", log_graph=True)
    trainer = linear_trainer(logger=tb)
    history = trainer.fit(data, data, epochs=3)
    tb.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "lr"} <= tags
    assert [e.step for e in events.Scalars("val_loss")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx(history["val_loss"])
    assert events.Tags()["graph"]

    csv_path = tmp_path / "log.csv"
    with tk.CSVLogger(csv_path) as csv_logger:
        linear_trainer(logger=csv_logger).fit(data, data, epochs=2)
    import csv

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert {"train_loss", "val_loss", "lr"} <= set(rows[0])


def test_progress_bar_shows_loss_and_metrics(capfd):
    data = DataLoader(regression_data(32), batch_size=8)
    linear_trainer(progress=True).fit(data, data, epochs=2)
    err = capfd.readouterr().err
    assert "epoch 0 (1/2)" in err and "epoch 1 (2/2)" in err  # numbered from 0, as History
    assert "val_loss=" in err and "train_loss=" in err
    linear_trainer(progress=False).fit(data, data, epochs=1)
    assert capfd.readouterr().err == ""


def test_plateau_with_step_interval_is_only_stepped_per_evaluation():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    trainer = tk.Trainer(model, opt, F.mse_loss, scheduler=sched, scheduler_interval="step",
                         progress=False)
    opt.param_groups[0]["lr"] = 0.0
    data = DataLoader(regression_data(16), batch_size=4)
    trainer.fit(data, data, epochs=1)  # 4 optimizer steps, one evaluation
    assert sched.num_bad_epochs == 0 and sched.best < math.inf


def test_a_signal_during_validation_stops_after_the_epoch_is_saved(tmp_path):
    import os
    import signal

    class SignalDuringValidation(tk.Callback):
        def on_validation_end(self, trainer, metrics):
            os.kill(os.getpid(), signal.SIGTERM)

    data = DataLoader(regression_data(16), batch_size=4)
    manager = tk.CheckpointManager(tmp_path)
    trainer = linear_trainer(callbacks=[SignalDuringValidation()], checkpoint=manager)
    with pytest.raises(SystemExit) as info:
        trainer.fit(data, data, epochs=3)
    assert info.value.code == 128 + signal.SIGTERM
    state = torch.load(manager.latest(), weights_only=True)["state"]["trainer"]
    assert (state["epoch"], state["batch_idx"]) == (1, 0)  # the finished epoch, saved once
    assert len(manager.checkpoints()) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"accumulate": 0}, ValueError, "accumulate must be an int >= 1, got 0"),
        ({"accumulate": 2.0}, ValueError, "accumulate must be an int >= 1, got 2.0"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm must be a positive number or None"),
        ({"max_grad_norm": True}, ValueError, "max_grad_norm must be a positive number or None"),
        ({"loss_fn": "mse"}, ValueError, "loss_fn must be a callable"),
        ({"scheduler": 0.1}, ValueError, r"scheduler must be an LR scheduler \(with step\(\)\)"),
        ({"logger": "tb"}, ValueError, "logger must be a torchkit Logger"),
        ({"progress": "yes"}, ValueError, "progress must be True or False, got 'yes'"),
        ({"scheduler_monitor": ""}, ValueError, "scheduler_monitor must be a metric name"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_every_option_is_checked_under_its_own_name(kwargs, error, message):
    model = nn.Linear(4, 1)
    kwargs = {"loss_fn": F.mse_loss, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_one_error_lists_every_bad_option():
    with pytest.raises(ValueError) as info:
        linear_trainer(accumulate=0, progress=None, nonfinite="warn")
    assert str(info.value) == ("accumulate must be an int >= 1, got 0; progress must be True "
                               "or False, got None; nonfinite must be 'raise' or 'skip', got "
                               "'warn'")
