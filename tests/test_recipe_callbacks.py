"""on_optimizer_step, TimeLimit and fit(max_steps=), Throughput, UnfreezeSchedule; resume."""

from __future__ import annotations

import datetime

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torchkit as tk
import torchkit.callbacks as callbacks_module


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(n: int = 10, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def _trainer(model: nn.Module, callbacks: list[tk.Callback], opt: torch.optim.Optimizer | None
             = None, **kwargs: object) -> tk.Trainer:
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    return tk.Trainer(model, opt, F.cross_entropy, callbacks=callbacks, progress=False,
                      **kwargs)  # type: ignore[arg-type]


class Steps(tk.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_optimizer_step(self, trainer):
        self.seen.append((trainer.epoch, trainer.global_step))


def test_on_optimizer_step_sees_every_step_and_the_flushed_window():
    steps = Steps()
    _trainer(_net(), [steps], accumulate=3).fit(_data(10), epochs=2)
    assert steps.seen == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (1, 6), (1, 7), (1, 8)]


class Clock:
    """A fake monotonic clock that a callback advances by 3 s per batch."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tick(tk.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer, batch, batch_idx):
        self.clock.now += 3.0


def test_time_limit_stops_at_a_step_boundary_saves_and_resumes(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    straight = _net()
    _trainer(straight, [tk.TimeLimit(1e6), Tick(clock)], accumulate=2).fit(_data(), epochs=3)

    model = _net()
    limit = tk.TimeLimit(10.0)
    manager = tk.CheckpointManager(tmp_path)
    trainer = _trainer(model, [limit, Tick(clock)], accumulate=2, checkpoint=manager)
    history = trainer.fit(_data(), epochs=3)  # returns normally: a planned stop
    assert trainer.should_stop and "time limit of 10 s" in (trainer.stop_reason or "")
    assert trainer.global_step == 2  # 12 s after the second step (6 s after the first)
    assert history.records == []
    assert manager.latest() is not None
    assert limit.state_dict() == {"elapsed_s": 12.0}

    again = _trainer(_net(), [tk.TimeLimit(10.0), Tick(clock)], accumulate=2, checkpoint=manager)
    again.fit(_data(), epochs=3, resume="latest")  # past the limit already: returns at once
    assert again.global_step == 2 and again.should_stop

    model = _net()
    longer = tk.TimeLimit("00:01:40")
    resumed = _trainer(model, [longer, Tick(clock)], accumulate=2, checkpoint=manager)
    resumed.fit(_data(), epochs=3, resume="latest")
    assert not resumed.should_stop and resumed.global_step == 15
    assert longer.elapsed_s() == pytest.approx(12.0 + 3.0 * 26)  # counted on, not restarted
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_time_limit_without_save_and_its_arguments(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(callbacks_module.time, "monotonic", clock)
    manager = tk.CheckpointManager(tmp_path)
    trainer = _trainer(_net(), [tk.TimeLimit(5, save=False), Tick(clock)], checkpoint=manager)
    trainer.fit(_data(), epochs=1)
    assert trainer.global_step == 2 and manager.latest() is None
    assert tk.TimeLimit(datetime.timedelta(minutes=2)).duration_s == 120.0
    with pytest.raises(ValueError, match="duration must be seconds, a timedelta or 'HH:MM:SS'"):
        tk.TimeLimit("1:30")
    with pytest.raises(TypeError, match="duration must be seconds"):
        tk.TimeLimit([1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duration must be positive, got 0"):
        tk.TimeLimit(0)
    with pytest.raises(TypeError, match="save must be True or False"):
        tk.TimeLimit(1, save="yes")  # type: ignore[arg-type]


@given(elapsed=st.floats(0, 1e6), duration=st.floats(1e-3, 1e6))
def test_time_limit_state_round_trip(elapsed, duration):
    a, b = tk.TimeLimit(duration), tk.TimeLimit(duration)
    a.load_state_dict({"elapsed_s": elapsed})
    b.load_state_dict(a.state_dict())
    assert b.elapsed_s() == elapsed and b.expired() == (elapsed >= duration)


def test_max_steps_ends_fit_and_resume_continues_exactly(tmp_path):
    straight = _net()
    _trainer(straight, []).fit(_data(), epochs=2)
    model = _net()
    manager = tk.CheckpointManager(tmp_path)
    trainer = _trainer(model, [], checkpoint=manager)
    trainer.fit(_data(), epochs=2, max_steps=13)
    assert trainer.global_step == 13 and trainer.stop_reason == "max_steps=13 reached"
    model = _net()
    _trainer(model, [], checkpoint=manager).fit(_data(), epochs=2, resume="latest")
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_steps must be an int >= 1 or None, got 0"):
        _trainer(_net(), []).fit(_data(), epochs=1, max_steps=0)


def test_throughput_by_hand_and_as_callback(monkeypatch):
    ticks = iter(range(1000))
    monkeypatch.setattr(callbacks_module.time, "perf_counter", lambda: float(next(ticks)))
    meter = tk.Throughput(window=2, flops_per_sample=10.0, peak_flops=100.0)
    assert meter.compute() == {}
    for samples in (4, 8, 12):
        meter.update(samples)
    # window of 2 steps: from t=1 to t=3, 20 samples
    assert meter.compute() == {"samples_per_s": 10.0, "steps_per_s": 1.0,
                               "flops_per_s": 100.0, "mfu": 1.0}
    meter = tk.Throughput(window=100)
    _trainer(_net(), [meter], accumulate=2).fit(_data(10, size=8), epochs=1)
    assert meter._points[-1][1:] == (80, 5)
    assert set(meter.last) == {"samples_per_s", "steps_per_s"}
    with pytest.raises(ValueError, match="window must be an int >= 1.*peak_flops needs"):
        tk.Throughput(window=0, peak_flops=1.0)
    with pytest.raises(ValueError, match="flops_per_sample must be a positive number"):
        tk.Throughput(flops_per_sample=-1)


def _frozen_net() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _net()
    tk.freeze(model, "0")
    return model, torch.optim.AdamW(tk.trainable_parameters(model), lr=1e-2)


def test_unfreeze_schedule_adds_a_group_at_its_epoch():
    model, opt = _frozen_net()
    first = model[0].weight.clone()
    unfreeze = tk.UnfreezeSchedule({1: "0.*"}, lr=1e-3)
    steps = Steps()
    trainer = _trainer(model, [unfreeze, steps], opt)
    trainer.fit(_data(4), epochs=1)
    assert torch.equal(model[0].weight, first) and len(opt.param_groups) == 1
    trainer.fit(_data(4), epochs=2)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    assert not torch.equal(model[0].weight, first)
    assert unfreeze.state_dict() == {"applied": [1]}


def test_unfreeze_schedule_resumes_with_its_groups_before_the_optimizer(tmp_path):
    straight, opt = _frozen_net()
    _trainer(straight, [tk.UnfreezeSchedule({1: "0.*"})], opt).fit(_data(), epochs=3)
    manager = tk.CheckpointManager(tmp_path)
    model, opt = _frozen_net()
    _trainer(model, [tk.UnfreezeSchedule({1: "0.*"})], opt, checkpoint=manager).fit(
        _data(), epochs=3, max_steps=15)  # stops in epoch 1, after unfreezing
    model, opt = _frozen_net()
    _trainer(model, [tk.UnfreezeSchedule({1: "0.*"})], opt, checkpoint=manager).fit(
        _data(), epochs=3, resume="latest")
    assert len(opt.param_groups) == 2
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)


def test_unfreeze_schedule_by_hand_with_restore_and_errors():
    model, opt = _frozen_net()
    schedule = tk.UnfreezeSchedule({0: ["0.weight"], 2: "0.bias"}, optimizer=opt)
    assert schedule.step(3, model) == ["0.weight", "0.bias"]  # catches up on both epochs
    assert len(opt.param_groups) == 3
    fresh, fresh_opt = _frozen_net()
    again = tk.UnfreezeSchedule({0: ["0.weight"], 2: "0.bias"}, optimizer=fresh_opt)
    again.load_state_dict(schedule.state_dict())
    again.restore(fresh)
    fresh_opt.load_state_dict(opt.state_dict())  # the groups line up
    assert all(p.requires_grad for p in fresh.parameters())
    with pytest.raises(TypeError, match="schedule must map epochs to glob patterns"):
        tk.UnfreezeSchedule(["0.*"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule keys must be epochs"):
        tk.UnfreezeSchedule({"1": "0.*"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="schedule epochs must be >= 0, got -1"):
        tk.UnfreezeSchedule({-1: "0.*"})
    with pytest.raises(ValueError, match="lr must be a finite number >= 0 or None"):
        tk.UnfreezeSchedule({1: "0.*"}, lr=-1.0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None"):
        tk.UnfreezeSchedule({1: "0.*"}, optimizer="adam")  # type: ignore[arg-type]


@given(applied=st.lists(st.integers(0, 5), unique=True))
def test_unfreeze_schedule_state_round_trip(applied):
    a = tk.UnfreezeSchedule({e: "x" for e in range(6)})
    a.applied = list(applied)
    b = tk.UnfreezeSchedule({e: "x" for e in range(6)})
    b.load_state_dict(a.state_dict())
    assert b.applied == applied
