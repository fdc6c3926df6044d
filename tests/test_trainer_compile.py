"""Trainer(compile=...): torch.compile after any DDP wrap, plain checkpoints, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchkit as tk
from tests.conftest import make_model


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


class Recording:
    """A torch.compile backend that runs the graph eagerly and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def make_trainer(compile, model=None, **kwargs):
    torch._dynamo.reset()
    model = model or make_model()
    return tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                      device="cpu", progress=False, compile=compile, **kwargs)


def test_compile_is_off_by_default():
    model = make_model()
    trainer = tk.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.mse_loss,
                         device="cpu", progress=False)
    assert trainer.model is model


def test_compiled_training_matches_eager_and_runs_compiled():
    backend = Recording()
    compiled = make_trainer({"backend": backend})
    assert compiled.model is not compiled.module and compiled.module is not None
    compiled.fit(batches(), epochs=2)
    assert backend.graphs >= 1
    eager = make_trainer(False)
    eager.fit(batches(), epochs=2)
    for p, q in zip(compiled.module.parameters(), eager.module.parameters()):
        torch.testing.assert_close(p, q)
    assert compiled.history["train_loss"] == pytest.approx(eager.history["train_loss"])


def test_evaluate_and_predict_run_the_compiled_module():
    backend = Recording()
    trainer = make_trainer({"backend": backend})
    before = backend.graphs
    metrics = trainer.evaluate(batches())
    assert backend.graphs > before  # evaluation compiled (and ran) a graph
    after_eval = backend.graphs
    out = trainer.predict([x for x, _ in batches()])
    assert out.shape == (32, 3) and backend.graphs >= after_eval
    eager = make_trainer(False)
    assert metrics["val_loss"] == pytest.approx(eager.evaluate(batches())["val_loss"])
    torch.testing.assert_close(out, eager.predict([x for x, _ in batches()]))


def test_checkpoint_of_a_compiled_run_loads_into_a_plain_model(tmp_path):
    manager = tk.CheckpointManager(tmp_path)
    trainer = make_trainer({"backend": "eager"}, checkpoint=manager)
    trainer.fit(batches(), epochs=1)
    path = manager.latest()
    assert path is not None
    plain = make_model()
    tk.load_checkpoint(path, {"model": plain})
    for p, q in zip(plain.parameters(), trainer.module.parameters()):
        assert torch.equal(p, q)
    assert all("_orig_mod" not in k for k in plain.state_dict())


def test_resume_of_a_compiled_run_is_bitwise(tmp_path):
    whole = make_trainer({"backend": "eager"})
    whole.fit(batches(), epochs=2)
    first = make_trainer({"backend": "eager"}, checkpoint=tk.CheckpointManager(tmp_path))
    first.fit(batches(), epochs=1)
    second = make_trainer({"backend": "eager"}, checkpoint=tk.CheckpointManager(tmp_path))
    second.fit(batches(), epochs=2, resume="latest")
    for p, q in zip(second.module.parameters(), whole.module.parameters()):
        assert torch.equal(p, q)


def test_a_compile_failure_names_the_option():
    def broken(gm, example_inputs):
        raise RuntimeError("this backend is broken")

    trainer = make_trainer({"backend": broken})
    with pytest.raises(RuntimeError, match=r"Trainer\(compile=.*torch.compile failed"):
        trainer.fit(batches(), epochs=1)
    with pytest.raises(RuntimeError, match=r"Trainer\(compile=.*torch.compile failed"):
        trainer.evaluate(batches())


def test_an_unknown_backend_is_refused_at_once():
    with pytest.raises(RuntimeError, match=r"Trainer\(compile=\{'backend': 'no-such'\}\)"):
        make_trainer({"backend": "no-such"})


@pytest.mark.parametrize("bad, message", [
    ("yes", "compile must be False, True or a dict of torch.compile options"),
    ({"fullgraf": True}, r"unknown option\(s\) \['fullgraf'\]"),
])
def test_bad_compile_option(bad, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(bad)


def test_user_errors_inside_a_compiled_model_are_not_relabelled():
    class Boom(nn.Linear):
        def forward(self, x):
            raise KeyError("user bug")

    trainer = make_trainer({"backend": "eager"}, model=Boom(6, 3))
    with pytest.raises(KeyError, match="user bug"):
        trainer.predict([torch.zeros(2, 6)])
