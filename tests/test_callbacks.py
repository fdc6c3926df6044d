"""Callback: every hook exists, does nothing by default, and state round-trips."""

from __future__ import annotations

import inspect

import torchkit as tk

HOOKS = [
    "on_fit_start", "on_fit_end", "on_epoch_start", "on_epoch_end", "on_train_batch_start",
    "on_train_batch_end", "on_validation_end", "on_checkpoint_save", "on_checkpoint_load",
    "on_exception",
]


def test_every_documented_hook_exists_and_takes_the_trainer_first():
    for name in HOOKS:
        params = list(inspect.signature(getattr(tk.Callback, name)).parameters)
        assert params[:2] == ["self", "trainer"], name


def test_default_hooks_do_nothing():
    cb = tk.Callback()
    checkpoint = {"model": 1}
    assert cb.on_fit_start(object()) is None
    assert cb.on_checkpoint_save(object(), checkpoint) is None
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
