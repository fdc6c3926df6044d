"""Callback: every hook exists, does nothing by default, and state round-trips."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchkit as tk
from torchkit.callbacks import TrainerView

HOOKS = [
    "on_fit_start", "on_fit_end", "on_epoch_start", "on_epoch_end", "on_train_batch_start",
    "on_train_batch_end", "on_validation_end", "on_checkpoint_save", "on_checkpoint_load",
    "on_exception", "on_optimizer_step",  # the last added in 0.2 (DESIGN, training recipes)
]


def test_every_documented_hook_exists_and_takes_the_trainer_first():
    for name in HOOKS:
        params = list(inspect.signature(getattr(tk.Callback, name)).parameters)
        assert params[:2] == ["self", "trainer"], name


def test_the_trainer_calls_exactly_the_hooks_of_callback(tmp_path):
    on_methods = {name for name in dir(tk.Callback) if name.startswith("on_")}
    assert set(HOOKS) == on_methods == set(tk.callbacks.HOOKS)

    called = []

    class Every(tk.Callback):
        pass

    for name in on_methods:  # override every hook; each records that it ran
        setattr(Every, name, lambda self, trainer, *args, _name=name: called.append(_name))
    model = nn.Linear(2, 1)
    data = [(torch.ones(2, 2), torch.zeros(2, 1))]
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         callbacks=[Every()], progress=False,
                         checkpoint=tk.CheckpointManager(tmp_path))
    assert set(trainer._hooks) == on_methods
    assert isinstance(trainer, TrainerView)
    trainer.fit(data, data, epochs=1)
    resumed = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         callbacks=[Every()], progress=False,
                         checkpoint=tk.CheckpointManager(tmp_path))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # on_exception
        resumed.fit([(torch.ones(2, 3), torch.zeros(2, 1))], epochs=2, resume="latest")
    assert set(called) == on_methods


def test_default_hooks_do_nothing():
    cb = tk.Callback()
    checkpoint = {"model": 1}
    cb.on_checkpoint_save(object(), checkpoint)
    assert checkpoint == {"model": 1}
    assert cb.state_dict() == {}
    cb.load_state_dict({})
    assert isinstance(cb, tk.Stateful)


def test_a_subclass_overrides_only_what_it_needs():
    class Counter(tk.Callback):
        def __init__(self):
            self.epochs = 0

        def on_epoch_end(self, trainer, metrics):
            self.epochs += 1

        def state_dict(self):
            return {"epochs": self.epochs}

        def load_state_dict(self, state_dict):
            self.epochs = state_dict["epochs"]

    a, b = Counter(), Counter()
    a.on_epoch_end(None, {})
    b.load_state_dict(a.state_dict())
    assert b.epochs == 1
