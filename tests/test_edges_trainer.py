"""Issue 13: the Trainer's edges (state that leaked or vanished, new options, bad input)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchkit as tk


def data(n: int = 40, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x.sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def trainer(model: nn.Module | None = None, **kwargs) -> tk.Trainer:
    model = model or nn.Linear(4, 2)
    kwargs.setdefault("progress", False)
    return tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                      **kwargs)


# -- an infinite gradient with a finite loss --------------------------------------------------

class InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.inf)


class BadAt(tk.Trainer):
    bad_step = 3

    def train_step(self, batch):
        x, y = batch
        out = self.model(x)
        if self.global_step == self.bad_step:
            out = InfGrad.apply(out)
        return F.cross_entropy(out, y)


def test_an_infinite_gradient_with_a_finite_loss_raises_and_is_never_saved(tmp_path):
    model = nn.Linear(4, 2)
    manager = tk.CheckpointManager(tmp_path, keep_last=10)
    t = BadAt(model, torch.optim.SGD(model.parameters(), lr=0.1), progress=False,
              checkpoint=manager, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"weights became nan/inf at epoch 0, between "
                       r"batch 2 and batch 3 \(optimizer steps 3 to 4\)"):
        t.fit(data(), epochs=2)
    assert not torch.isfinite(model.weight).all()  # the bad step was applied...
    assert manager.checkpoints()  # ...but only the good ones were saved
    for path in manager.checkpoints():
        target = nn.Linear(4, 2)
        tk.load_checkpoint(path, {"model": target})
        assert all(torch.isfinite(p).all() for p in target.parameters()), path


def test_an_infinite_gradient_at_the_last_step_raises_at_the_epoch_end():
    model = nn.Linear(4, 2)
    t = BadAt(model, torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    t.bad_step = 4  # the epoch's last batch (5 batches)
    with pytest.raises(FloatingPointError,
                       match=r"between batch \d and batch 4 \(optimizer steps \d to 5\)"):
        t.fit(data(), epochs=1)


# -- EarlyStopping in the Trainer ------------------------------------------------------------

def test_early_stopping_reused_in_a_new_fit_starts_afresh():
    stopper = tk.EarlyStopping("train_loss", patience=1)
    t = trainer(callbacks=[stopper])
    t.fit(data(), epochs=3)
    first_best = stopper.best
    stopper.best, stopper.wait = -1.0, 5  # as if a run had ended badly
    model = nn.Linear(4, 2)
    t2 = trainer(model, callbacks=[stopper])
    history = t2.fit(data(), epochs=3)
    assert len(history) == 3 and not t2.should_stop
    assert stopper.num_steps == 3 and stopper.best == min(history["train_loss"])
    assert first_best is not None


def test_early_stopping_state_is_kept_on_resume(tmp_path):
    stopper = tk.EarlyStopping("train_loss", patience=5)
    manager = tk.CheckpointManager(tmp_path)
    trainer(callbacks=[stopper], checkpoint=manager).fit(data(), epochs=2)
    again = tk.EarlyStopping("train_loss", patience=5)
    trainer(callbacks=[again], checkpoint=tk.CheckpointManager(tmp_path)).fit(
        data(), epochs=3, resume="latest")
    assert again.num_steps == 3  # 2 restored + 1 new


class Worse(tk.Trainer):
    """Validation gets worse after epoch 1: the best weights are epoch 1's."""


def test_restore_best_at_the_end_of_a_fit_that_ran_to_its_last_epoch():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    stopper = tk.EarlyStopping("val_loss", patience=100, restore_best=True)
    snapshots = []

    class Snap(tk.Callback):
        def on_epoch_end(self, trainer, metrics):
            snapshots.append({k: v.clone() for k, v in trainer.module.state_dict().items()})

    t = trainer(model, callbacks=[Snap(), stopper])
    x, y = data().dataset.tensors
    val = DataLoader(TensorDataset(x, 1 - y), batch_size=8)  # learning makes it worse
    history = t.fit(data(), val, epochs=4)
    assert not t.should_stop
    best = history.best_epoch("val_loss")
    assert best < 3  # the last weights are not the best ones
    assert stopper.best_step == best
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[best][k], rtol=0, atol=0)


def test_restore_says_nothing_beat_the_baseline():
    net = nn.Linear(1, 1)
    stopper = tk.EarlyStopping(baseline=0.1, restore_best=True, patience=3)
    for v in (0.5, 0.4):
        stopper.step(v, net)
    with pytest.raises(RuntimeError, match=r"none of the 2 observation\(s\) of val_loss "
                       r"improved on baseline=0.1"):
        stopper.restore(net)


# -- metrics ----------------------------------------------------------------------------------

def test_confusion_matrix_metric_is_reported_and_has_scores():
    cm = tk.ConfusionMatrix(2)
    t = trainer(metrics={"cm": cm, "acc": tk.accuracy})
    result = t.evaluate(data())
    assert result["val_cm"].shape == (2, 2) and int(result["val_cm"].sum()) == 40
    assert cm.recall().item() == pytest.approx(
        float(result["val_cm"].diagonal().div(result["val_cm"].sum(1)).mean()))
    history = t.fit(data(), data(), epochs=1)
    assert "val_cm" in history.keys()  # noqa: SIM118 - History is not a dict


def test_a_metric_computing_something_else_raises_naming_it():
    class Odd:
        def update(self, o, t): pass
        def compute(self): return "seven"
        def reset(self): pass

    with pytest.raises(TypeError, match="metric 'odd' computed a str"):
        trainer(metrics={"odd": Odd()}).evaluate(data())


# -- predict ----------------------------------------------------------------------------------

def test_predict_on_a_bare_tensor_is_one_batch():
    t = trainer()
    x = torch.randn(3, 4)
    out = t.predict(x)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, t.module(x).detach())


def test_predict_under_bf16_returns_float32():
    out = trainer(precision="bf16").predict(data())
    assert out.dtype == torch.float32 and out.shape == (40, 2)


def test_predict_refuses_a_non_iterable():
    with pytest.raises(TypeError, match="data must be a DataLoader, an iterable of batches or a "
                       "tensor, got int"):
        trainer().predict(3)


# -- one epoch numbering ------------------------------------------------------------------------

def test_history_early_stopping_and_checkpoint_epochs_agree(tmp_path):
    stopper = tk.EarlyStopping("val_loss", patience=100)
    manager = tk.CheckpointManager(tmp_path, keep_last=10, keep_best=1, monitor="val_loss")
    t = trainer(callbacks=[stopper], checkpoint=manager)
    history = t.fit(data(), data(16), epochs=4)
    assert history["epoch"] == [0, 1, 2, 3]
    best = history.best_epoch("val_loss")
    assert stopper.best_step == best
    meta = tk.load_checkpoint(manager.best())
    assert meta["epoch"] == best
    epochs = [tk.load_checkpoint(p)["epoch"] for p in manager.checkpoints()]
    assert sorted(epochs) == [0, 1, 2, 3]


# -- empty data --------------------------------------------------------------------------------

def test_fit_on_an_empty_loader_raises():
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()), batch_size=8)
    with pytest.raises(ValueError, match="train_data yielded no batches in epoch 0"):
        trainer().fit(empty, epochs=1)


def test_a_zero_sample_batch_raises():
    batches = [(torch.zeros(0, 4), torch.zeros(0).long())]
    with pytest.raises(ValueError, match="batch 0 of epoch 0 has 0 samples"):
        trainer().fit(batches, epochs=1)


# -- the graph ---------------------------------------------------------------------------------

def test_fit_logs_the_graph_only_when_the_logger_asks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for option in (False, True):
        with tk.TensorBoardLogger(tmp_path / str(option), log_graph=option) as logger:
            trainer(logger=logger).fit(data(), epochs=1)
        events = EventAccumulator(str(tmp_path / str(option)))
        events.Reload()
        assert events.Tags()["graph"] is option


# -- new options -------------------------------------------------------------------------------

def test_train_metrics_are_reported_as_train_name():
    t = trainer(train_metrics={"acc": tk.accuracy, "cm": tk.ConfusionMatrix(2)})
    history = t.fit(data(), epochs=2)
    assert {"train_acc", "train_cm"} <= set(history.keys())
    assert int(history["train_cm"][0].sum()) == 40
    assert 0.0 <= history["train_acc"][0] <= 1.0


def test_train_metrics_match_a_hand_computation():
    model = nn.Linear(4, 2)
    nn.init.zeros_(model.weight)

    class Frozen(tk.Trainer):  # lr 0: outputs are those of the initial model each batch
        pass

    t = Frozen(model, torch.optim.SGD(model.parameters(), lr=0.0), F.cross_entropy,
               train_metrics={"acc": tk.accuracy}, progress=False)
    history = t.fit(data(), epochs=1)
    x, y = data().dataset.tensors
    assert history["train_acc"][0] == pytest.approx(float(tk.accuracy(model(x), y)))


class MemoryLogger(tk.Logger):
    def __init__(self):
        self.rows, self.hparams = [], None

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, hparams, metrics):
        self.hparams = dict(hparams)

    def flush(self):
        pass


def test_log_every_n_steps_logs_the_loss_since_the_last_log():
    logger = MemoryLogger()
    trainer(logger=logger, log_every_n_steps=2).fit(data(), epochs=1)  # 5 steps
    steps = [(s, m) for s, m in logger.rows if "lr_step" in m]
    assert [s for s, _ in steps] == [2, 4]
    assert all(math.isfinite(m["train_loss_step"]) for _, m in steps)
    epoch_rows = [m for s, m in logger.rows if "train_loss" in m]
    assert len(epoch_rows) == 1


def test_hparams_are_merged_into_what_the_logger_records():
    logger = MemoryLogger()
    trainer(logger=logger, hparams={"batch_size": 8, "lr": 0.5, "augment": "flip"}).fit(
        data(), epochs=1)
    assert logger.hparams["batch_size"] == 8 and logger.hparams["augment"] == "flip"
    assert logger.hparams["lr"] == 0.5  # the user's value wins
    assert logger.hparams["optimizer"] == "SGD"


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"accumulate": 0}, ValueError, "accumulate must be an int >= 1, got 0"),
    ({"max_grad_norm": -1}, ValueError, "max_grad_norm must be a positive number"),
    ({"scheduler": "s"}, ValueError, "scheduler must be an LR scheduler"),
    ({"logger": 3}, ValueError, "logger must be a torchkit Logger"),
    ({"callbacks": 3}, TypeError, "callbacks must be an iterable of torchkit.Callback objects, "
                                  "got int"),
    ({"callbacks": tk.EarlyStopping()}, TypeError, "wrap it in a list"),
    ({"metrics": 3}, TypeError, "metrics must be a dict of name -> metric"),
    ({"metrics": tk.accuracy}, TypeError, "wrap it"),
    ({"train_metrics": 3}, ValueError, "train_metrics must be a dict"),
    ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps must be an int >= 1"),
    ({"hparams": 3}, ValueError, "hparams must be a dict"),
    ({"hparams": {"a": [1]}}, ValueError, r"hparams\['a'\] must be a bool, int, float, str"),
])
def test_every_option_is_checked_under_its_own_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        trainer(**kwargs)


def test_fit_and_evaluate_arguments_are_checked_by_name():
    t = trainer()
    with pytest.raises(TypeError, match="resume must be 'latest', 'best', a checkpoint path or "
                       "None, got int"):
        t.fit(data(), epochs=1, resume=3)
    with pytest.raises(TypeError, match="prefix must be a str"):
        t.evaluate(data(), prefix=3)
    with pytest.raises(ValueError, match="prefix must be a non-empty str"):
        t.evaluate(data(), prefix="")


def test_a_model_without_trainable_parameters_is_refused_by_fit():
    model = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        trainer(model).fit(data(), epochs=1)
