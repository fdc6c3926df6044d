"""EarlyStopping: the contract in DESIGN.md, checked against a plain reference."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchkit as tk


def reference(values, *, mode="min", patience=5, min_delta=0.0, baseline=None, start_after=0):
    """The contract, written as plainly as possible: (decisions, best, best_step, wait)."""
    best, best_step, wait, decisions = baseline, None, 0, []
    for i, v in enumerate(values):
        if i < start_after:
            decisions.append(False)
            continue
        if not math.isfinite(v):
            wait += 1
            decisions.append(True)
            continue
        if mode == "min":
            improved = best is None or v < best - min_delta
        else:
            improved = best is None or v > best + min_delta
        if improved:
            best, best_step, wait = v, i, 0
        else:
            wait += 1
        decisions.append(not improved and wait >= patience)
    return decisions, best, best_step, wait


values_st = st.lists(
    st.one_of(st.floats(-100, 100), st.sampled_from([1.0, 2.0, 3.0])), min_size=1, max_size=30
)


@given(
    values=values_st,
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(0, 4),
    min_delta=st.sampled_from([0.0, 0.5, 2.0]),
    baseline=st.one_of(st.none(), st.floats(-50, 50)),
    start_after=st.integers(0, 4),
)
def test_matches_reference(values, mode, patience, min_delta, baseline, start_after):
    stopper = tk.EarlyStopping(
        mode=mode, patience=patience, min_delta=min_delta, baseline=baseline,
        start_after=start_after,
    )
    decisions = [stopper.step(v) for v in values]
    ref_decisions, best, best_step, wait = reference(
        values, mode=mode, patience=patience, min_delta=min_delta, baseline=baseline,
        start_after=start_after,
    )
    assert decisions == ref_decisions
    assert (stopper.best, stopper.best_step, stopper.wait) == (best, best_step, wait)
    assert stopper.num_steps == len(values)
    assert stopper.stopped == decisions[-1]
    assert (stopper.reason is None) == (not stopper.stopped)


@given(values=st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=40), patience=st.integers(0, 5))
def test_state_round_trip_does_not_change_decisions(values, patience):
    a, b = tk.EarlyStopping(patience=patience), tk.EarlyStopping(patience=patience)
    half = len(values) // 2
    for v in values[:half]:
        a.step(v)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert [a.step(v) for v in values[half:]] == [b.step(v) for v in values[half:]]
    assert a.state_dict() == b.state_dict()


def test_patience_zero_stops_at_first_non_improvement():
    stopper = tk.EarlyStopping(patience=0)
    assert [stopper.step(v) for v in [3.0, 2.0, 1.0, 1.0]] == [False, False, False, True]
    assert stopper.reason == "val_loss did not improve for 1 observation; best 1 at observation 2"


def test_min_delta_requires_a_large_enough_improvement():
    stopper = tk.EarlyStopping(patience=2, min_delta=0.1)
    assert [stopper.step(v) for v in [1.0, 0.95, 0.92]] == [False, False, True]
    assert stopper.best == 1.0
    assert stopper.best_step == 0


def test_max_mode():
    stopper = tk.EarlyStopping("val_acc", mode="max", patience=1)
    assert [stopper.step(v) for v in [0.5, 0.7, 0.6]] == [False, False, True]
    assert stopper.best == 0.7
    assert stopper.reason.startswith("val_acc did not improve")


def test_baseline_must_be_beaten():
    stopper = tk.EarlyStopping(patience=2, baseline=0.5)
    assert stopper.best == 0.5
    assert [stopper.step(v) for v in [0.6, 0.55]] == [False, True]
    assert stopper.best == 0.5 and stopper.best_step is None
    stopper = tk.EarlyStopping(patience=2, baseline=0.5)
    assert stopper.step(0.4) is False
    assert (stopper.best, stopper.best_step, stopper.wait) == (0.4, 0, 0)


def test_start_after_ignores_warmup_entirely():
    stopper = tk.EarlyStopping(patience=0, start_after=3)
    assert [stopper.step(v) for v in [5.0, float("nan"), 9.0]] == [False] * 3
    assert (stopper.best, stopper.wait, stopper.num_steps) == (None, 0, 3)
    assert stopper.step(4.0) is False
    assert stopper.best_step == 3
    assert stopper.step(4.5) is True


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_stops_at_once(bad):
    stopper = tk.EarlyStopping(patience=10)
    stopper.step(1.0)
    assert stopper.step(bad) is True
    assert "not a finite number" in stopper.reason
    assert stopper.best == 1.0


def test_nonfinite_is_a_plain_miss_when_asked():
    stopper = tk.EarlyStopping(patience=2, stop_on_nonfinite=False)
    assert [stopper.step(v) for v in [1.0, float("-inf"), float("nan")]] == [False, False, True]
    assert stopper.best == 1.0


def test_improvement_after_a_stop_resets_the_decision():
    stopper = tk.EarlyStopping(patience=1)
    assert [stopper.step(v) for v in [1.0, 2.0, 0.5]] == [False, True, False]
    assert not stopper.stopped and stopper.reason is None and stopper.wait == 0


def test_accepts_tensors_and_call_alias():
    stopper = tk.EarlyStopping(patience=1)
    assert stopper(torch.tensor(1.0)) is False
    assert stopper(torch.tensor([2.0])) is True
    assert isinstance(stopper.best, float)


def test_restore_best_keeps_a_cpu_copy_and_restores_it():
    model = nn.Linear(3, 1)
    stopper = tk.EarlyStopping(patience=1, restore_best=True)
    with torch.no_grad():
        model.weight.fill_(1.0)
    stopper.step(0.1, model)
    with torch.no_grad():
        model.weight.fill_(2.0)  # the copy must not alias the live weights
    kept = stopper.state_dict()["best_weights"]
    assert kept["weight"].device.type == "cpu"
    torch.testing.assert_close(kept["weight"], torch.ones(1, 3))
    assert stopper.step(0.2, model) is True
    torch.testing.assert_close(model.weight.detach(), torch.ones(1, 3))


def test_restore_best_on_a_training_run():
    """Train past the best validation loss; stopping gives back the best weights."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    xv, yv = torch.randn(16, 4), torch.randn(16, 1)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # big steps: val loss bounces
    stopper = tk.EarlyStopping(patience=3, restore_best=True)
    best_val, epochs = math.inf, 0
    while epochs < 200:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            val = nn.functional.mse_loss(model(xv), yv).item()
        best_val = min(best_val, val)
        epochs += 1
        if stopper.step(val, model):
            break
    assert stopper.stopped and epochs < 200
    assert stopper.best == best_val
    with torch.no_grad():
        restored = nn.functional.mse_loss(model(xv), yv).item()
    assert restored == pytest.approx(best_val, rel=1e-6)


def test_restore_errors():
    with pytest.raises(ValueError, match="restore_best=True needs the model"):
        tk.EarlyStopping(restore_best=True).step(1.0)
    with pytest.raises(RuntimeError, match="no best weights to restore"):
        tk.EarlyStopping().restore(nn.Linear(1, 1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "lowest"}, "mode must be 'min' or 'max', got 'lowest'"),
        ({"patience": -1}, "patience must be an int >= 0, got -1"),
        ({"patience": 2.5}, "patience must be an int >= 0, got 2.5"),
        ({"min_delta": -0.1}, r"min_delta must be a number >= 0, got -0.1"),
        ({"baseline": float("nan")}, "baseline must be a finite number or None, got nan"),
        ({"start_after": -2}, "start_after must be an int >= 0, got -2"),
        ({"monitor": 3}, "monitor must be a metric name"),
    ],
)
def test_bad_config_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tk.EarlyStopping(**kwargs)


def test_bad_config_reports_every_problem_at_once():
    with pytest.raises(ValueError, match="mode must.*; patience must"):
        tk.EarlyStopping(mode="x", patience=-1)


@pytest.mark.parametrize("bad", ["1.0", None, torch.ones(2), True])
def test_bad_values_raise_type_error(bad):
    with pytest.raises(TypeError, match="value must be a number or a one-element tensor"):
        tk.EarlyStopping().step(bad)


def test_load_state_dict_checks_keys():
    with pytest.raises(KeyError, match=r"missing keys \['best_step'"):
        tk.EarlyStopping().load_state_dict({"best": 1.0, "wait": 0})
    with pytest.raises(TypeError, match="expects a mapping"):
        tk.EarlyStopping().load_state_dict([1, 2])


def test_state_holds_progress_not_configuration():
    state = tk.EarlyStopping(patience=7, mode="max").state_dict()
    assert "patience" not in state and "mode" not in state
    assert set(state) == {
        "best", "best_step", "wait", "stopped", "reason", "num_steps", "best_weights"
    }


def test_repr():
    assert repr(tk.EarlyStopping(patience=2)) == (
        "EarlyStopping(monitor='val_loss', mode='min', patience=2, best=None, wait=0)"
    )
