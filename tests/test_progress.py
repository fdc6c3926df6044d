"""ProgressBar: bounded refresh rate with a fake clock, output, disabled bars, errors."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
import tqdm.auto
from torch import nn

import torchkit as tk
from torchkit import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


def last_line(out: io.StringIO) -> str:
    return out.getvalue().rsplit("\r", 1)[-1].strip()


def test_metrics_are_read_at_a_bounded_rate(clock):
    calls = []

    def metrics():
        calls.append(clock.now)
        return {"loss": torch.tensor(0.5)}

    out = io.StringIO()
    bar = tk.ProgressBar(1000, file=out, refresh_interval_s=0.5)
    for _ in range(1000):
        clock.now += 0.01  # 1000 steps of 10 ms: 10 s in all
        bar.update(1, metrics=metrics)
    assert 19 <= len(calls) <= 20  # once per 0.5 s, not once per step
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(calls))
    bar.close()  # steps after the last redraw: their metrics are read once more
    assert len(calls) <= 21
    assert "1000/1000" in last_line(out) and "loss=0.5" in last_line(out)


def test_no_refresh_due_means_no_metrics_call(clock):
    out = io.StringIO()
    bar = tk.ProgressBar(10, file=out)
    calls = []
    for step in range(10):
        bar.update(1, metrics=lambda step=step: calls.append(step) or {"step_loss": step})
    assert calls == [] and bar.n == 10
    bar.close()
    assert calls == [9]  # the latest callable, once, at close
    assert last_line(out).startswith("100%") and "step_loss=9" in last_line(out)


def test_output_shows_formatted_metrics_and_desc():
    out = io.StringIO()
    loss = torch.tensor(0.123456)
    with tk.ProgressBar(3, desc="epoch 2", file=out, refresh_interval_s=0) as bar:
        for _ in range(3):
            bar.update(1, metrics=lambda: {"loss": loss, "acc": 0.5, "lr": 1e-4, "n": 7})
    line = last_line(out)
    assert line.startswith("epoch 2: 100%")
    assert "3/3" in line
    assert line.endswith("loss=0.1235, acc=0.5, lr=0.0001, n=7]")


def test_set_metrics_forces_the_final_postfix(clock):
    out = io.StringIO()
    bar = tk.ProgressBar(file=out, unit="batch")
    for _ in range(5):
        bar.update(1, metrics=lambda: pytest.fail("set_metrics replaces pending metrics"))
    bar.set_metrics({"val_acc": torch.tensor(0.875)})
    assert "5batch" in last_line(out) and last_line(out).endswith("val_acc=0.875]")
    bar.close()
    bar.close()  # idempotent
    assert repr(bar) == "ProgressBar(n=5, closed)"


def test_disabled_bar_writes_nothing_and_creates_no_tqdm(monkeypatch):
    def no_tqdm(*args, **kwargs):
        raise AssertionError("a disabled bar must not create a tqdm")

    monkeypatch.setattr(tqdm.auto, "tqdm", no_tqdm)
    out = io.StringIO()
    with tk.ProgressBar(100, file=out, enabled=False) as bar:
        for _ in range(100):
            bar.update(1, metrics=lambda: pytest.fail("a disabled bar reads no metrics"))
        bar.set_metrics({"loss": 1.0})
        assert bar.n == 0 and repr(bar) == "ProgressBar(n=0, disabled)"
    assert out.getvalue() == ""


def test_an_exception_inside_the_bar_does_not_read_metrics_again(clock):
    out = io.StringIO()
    with pytest.raises(ZeroDivisionError), tk.ProgressBar(file=out) as bar:
        bar.update(1, metrics=lambda: pytest.fail("not read while unwinding"))
        1 / 0  # noqa: B018
    assert "1it" in last_line(out)


def test_hand_written_loop_shows_the_last_loss(tiny_model, tiny_loader):
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    out = io.StringIO()
    losses = []
    for epoch in range(3):
        with tk.ProgressBar(len(tiny_loader), desc=f"epoch {epoch}", file=out) as bar:
            for inputs, targets in tiny_loader:
                loss = nn.functional.cross_entropy(tiny_model(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update(1, metrics=lambda loss=loss: {"loss": loss.detach()})
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert last_line(out).endswith(f"loss={losses[-1]:.4g}]")


def test_errors():
    with pytest.raises(TypeError, match="total must be None or an int, got 1.5; refresh_interval_s "
                                        "must be a number, got '1'; desc must be a str, got 3"):
        tk.ProgressBar(1.5, refresh_interval_s="1", desc=3)
    with pytest.raises(TypeError, match="unit must be a str, got None"):
        tk.ProgressBar(unit=None)
    with pytest.raises(ValueError, match="got total=-1 and refresh_interval_s=0.5"):
        tk.ProgressBar(-1)
    with pytest.raises(ValueError, match="got total=None and refresh_interval_s=nan"):
        tk.ProgressBar(refresh_interval_s=float("nan"))
    out = io.StringIO()
    bar = tk.ProgressBar(file=out, refresh_interval_s=0)
    with pytest.raises(TypeError, match="metrics must be a zero-argument callable.*got dict; "
                                        r"use set_metrics\(mapping\)"):
        bar.update(1, metrics={"loss": 1.0})
    with pytest.raises(TypeError, match=r"loss='high', acc=tensor\(\[1., 2.\]\), ok=True"):
        bar.set_metrics({"loss": "high", "acc": torch.tensor([1.0, 2.0]), "ok": True})
    with pytest.raises(TypeError, match="metrics must be a mapping of names to numbers, got list"):
        bar.update(1, metrics=lambda: [0.5])
    bar.close()
    with pytest.raises(RuntimeError, match=r"update\(\) on a closed ProgressBar"):
        bar.update()
    with pytest.raises(RuntimeError, match=r"set_metrics\(\) on a closed ProgressBar"):
        bar.set_metrics({})
