"""warmup_cosine / warmup_linear / warmup_constant: closed-form values and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import torchkit as tk


def _opt(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, opt: torch.optim.Optimizer,
         steps: int, group: int = 0) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[group]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_values_at_chosen_steps():
    base, w, total, floor, f0 = 0.4, 5, 25, 0.01, 0.1
    opt = _opt(base)
    lrs = _lrs(tk.warmup_cosine(opt, total, warmup_steps=w, min_lr=floor,
                                warmup_start_factor=f0), opt, 30)
    for s in (0, 1, 4):
        assert lrs[s] == pytest.approx(base * (f0 + (1 - f0) * s / w), rel=1e-12)
    for s in (5, 10, 15, 24):
        expect = floor + (base - floor) * (1 + math.cos(math.pi * (s - w) / (total - w))) / 2
        assert lrs[s] == pytest.approx(expect, rel=1e-12)
    assert lrs[5] == pytest.approx(base)
    assert lrs[25:] == pytest.approx([floor] * 5)  # held after total_steps


def test_warmup_linear_and_constant_values():
    opt = _opt(1.0, 0.5)
    lrs = _lrs(tk.warmup_linear(opt, 10, warmup_steps=2, min_lr=0.1), opt, 13, group=1)
    base = 0.5  # each group warms up and decays from its own base LR
    assert lrs[:2] == pytest.approx([0.0, base / 2])
    for s in (2, 6, 9):
        assert lrs[s] == pytest.approx(base - (base - 0.1) * (s - 2) / 8)
    assert lrs[10:] == pytest.approx([0.1] * 3)
    opt = _opt(2.0)
    assert _lrs(tk.warmup_constant(opt, warmup_steps=4), opt, 6) == pytest.approx(
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.0])
    opt = _opt(2.0)
    assert _lrs(tk.warmup_constant(opt, warmup_steps=0), opt, 2) == [2.0, 2.0]


@given(cut=st.integers(0, 14), warmup=st.integers(0, 8), f0=st.floats(0, 1))
def test_resume_mid_warmup_is_exact(cut, warmup, f0):
    opt = _opt(0.3)
    straight = _lrs(tk.warmup_cosine(opt, 12, warmup_steps=warmup, min_lr=0.001,
                                     warmup_start_factor=f0), opt, 15)
    opt = _opt(0.3)
    sched = tk.warmup_cosine(opt, 12, warmup_steps=warmup, min_lr=0.001, warmup_start_factor=f0)
    first = _lrs(sched, opt, cut)
    state = {"sched": sched.state_dict(), "opt": opt.state_dict()}
    opt2 = _opt(0.3)
    sched2 = tk.warmup_cosine(opt2, 12, warmup_steps=warmup, min_lr=0.001,
                              warmup_start_factor=f0)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert first + _lrs(sched2, opt2, 15 - cut) == straight  # exactly, not approximately


def test_resume_mid_warmup_through_checkpoint_manager(tmp_path):
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = _opt(0.2)
        return opt, tk.warmup_linear(opt, 20, warmup_steps=8)

    opt, sched = build()
    straight = _lrs(sched, opt, 12)
    opt, sched = build()
    _lrs(sched, opt, 3)
    manager = tk.CheckpointManager(tmp_path)
    manager.save({"optimizer": opt, "scheduler": sched}, step=3)
    opt, sched = build()
    manager.load("latest", {"optimizer": opt, "scheduler": sched})
    assert _lrs(sched, opt, 9) == straight[3:]


def test_schedule_errors():
    opt = _opt(0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        tk.warmup_cosine("sgd", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total_steps must be an int >= 1, got 0"):
        tk.warmup_cosine(opt, 0)
    with pytest.raises(ValueError, match="warmup_steps must be <= total_steps=5, got 6"):
        tk.warmup_linear(opt, 5, warmup_steps=6)
    with pytest.raises(ValueError, match="min_lr must be a finite number >= 0.*"
                                         "warmup_start_factor must be a number in"):
        tk.warmup_cosine(opt, 5, min_lr=-1.0, warmup_start_factor=2.0)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        tk.warmup_constant(opt, warmup_steps=-1)


def test_groups_added_later_join_the_schedule_and_resume(tmp_path):
    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = _opt(1.0)
        return opt, tk.warmup_cosine(opt, 10, warmup_steps=2)

    opt, sched = build()
    _lrs(sched, opt, 4)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5})
    opt.step()
    sched.step()  # step 5
    factor = (1 + math.cos(math.pi * 3 / 8)) / 2
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * factor)
    assert opt.param_groups[0]["lr"] == pytest.approx(factor)
    manager = tk.CheckpointManager(tmp_path)
    manager.save({"optimizer": opt, "scheduler": sched}, step=5)
    after = _lrs(sched, opt, 3, group=1)
    opt, sched = build()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5})
    manager.load("latest", {"optimizer": opt, "scheduler": sched})
    assert _lrs(sched, opt, 3, group=1) == after
