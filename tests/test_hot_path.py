"""The hot paths: the non-finite check without host reads, the cheap zero_grad, no sync."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import torchkit as tk
from tests.conftest import make_model
from torchkit._grads import NonFiniteFlag


class ReadCounter:
    """Counts host reads of tensors (``bool(t)``, ``t.item()``) while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item

        def counted_bool(t: torch.Tensor) -> bool:
            self.reads += 1
            return real_bool(t)

        def counted_item(t: torch.Tensor) -> float:
            self.reads += 1
            return real_item(t)  # type: ignore[no-any-return]

        monkeypatch.setattr(torch.Tensor, "__bool__", counted_bool)
        monkeypatch.setattr(torch.Tensor, "item", counted_item)


class FlagReads:
    """Counts host reads of the accumulator's non-finite flag, whichever way each is done."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        real = NonFiniteFlag.read

        def counted(flag: NonFiniteFlag, found: torch.Tensor) -> bool:
            self.reads += 1
            return real(flag, found)

        monkeypatch.setattr(NonFiniteFlag, "read", counted)


def poisoned_run(opt_factory, *, steps=2, poison=(False, True, False, False)):
    model = make_model()
    opt = opt_factory(model.parameters())
    accum = tk.GradAccumulator(opt, steps)
    x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 3)
    results = []
    for bad in poison:
        with accum.accumulate():
            loss = F.mse_loss(model(x), y)
        results.append(accum.backward(loss * math.nan if bad else loss))
    return model, opt, accum, results, (x, y)


def clean_reference(opt_factory, x, y):
    """What the weights must be: only one clean window applied."""
    model = make_model()
    opt = opt_factory(model.parameters())
    F.mse_loss(model(x), y).backward()
    opt.step()
    return model, opt


def assert_same_state(model, opt, expected, expected_opt):
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.equal(p, q)
        for key, value in expected_opt.state[q].items():  # momentum / moments / step
            assert torch.equal(opt.state[p][key], value), key


FUSED = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_optimizer_skips_on_the_device_without_a_host_read(name, monkeypatch):
    reads, flag_reads = ReadCounter(monkeypatch), FlagReads(monkeypatch)
    # The first window is clean (fused SGD needs its first step; see the next test).
    model, opt, accum, results, (x, y) = poisoned_run(
        FUSED[name], poison=(False, False, True, False))
    monkeypatch.undo()
    # No read at all, except fused SGD's first window (its first step must be known).
    assert flag_reads.reads == (1 if name == "sgd" else 0)
    assert reads.reads == 0  # (that one read is through the CPU flag's NumPy view)
    assert results == [False, True, False, True]  # the step was issued at each window end
    assert accum.skipped_steps == 1 and accum.num_steps == 2
    assert_same_state(model, opt, *clean_reference(FUSED[name], x, y))
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    assert accum.state_dict()["skipped_steps"] == 1


@pytest.mark.parametrize("name", sorted(FUSED))
def test_skip_on_device_false_reads_each_step_and_knows_each_skip(name, monkeypatch):
    flag_reads, tensor_reads = FlagReads(monkeypatch), ReadCounter(monkeypatch)
    model = make_model()
    opt = FUSED[name](model.parameters())
    accum = tk.GradAccumulator(opt, 2, skip_on_device=False)
    x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), torch.zeros(4, 3)
    results, skipped = [], []
    for bad in (False, False, True, False, False, False):
        with accum.accumulate():
            loss = F.mse_loss(model(x), y)
        results.append(accum.backward(loss * math.nan if bad else loss))
        skipped.append(accum.skipped_steps)
    monkeypatch.undo()
    assert flag_reads.reads == 3  # one per window, through the CPU flag's NumPy view
    # Each skip was booked at its step: reading skipped_steps had no device count to read.
    assert tensor_reads.reads == 0
    assert results == [False, True, False, False, False, True]
    assert skipped == [0, 0, 0, 1, 1, 1]
    reference = make_model()  # only the two clean windows applied
    reference_opt = FUSED[name](reference.parameters())
    for _ in range(2):
        reference_opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        reference_opt.step()
    assert_same_state(model, opt, reference, reference_opt)


@pytest.mark.parametrize("flag", ["skip_nonfinite", "global_weights", "skip_on_device"])
def test_the_bool_options_refuse_other_values(flag):
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'yes'"):
        tk.GradAccumulator(opt, 1, **{flag: "yes"})


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_optimizer_with_a_skipped_first_step_stays_exact(name):
    model, opt, accum, results, (x, y) = poisoned_run(FUSED[name])
    assert accum.skipped_steps == 1 and results[-1]
    assert_same_state(model, opt, *clean_reference(FUSED[name], x, y))


def test_plain_optimizer_reads_the_flag_once_per_optimizer_step(monkeypatch):
    tensor_reads, flag_reads = ReadCounter(monkeypatch), FlagReads(monkeypatch)
    model = make_model()
    accum = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    x = torch.randn(4, 6)
    for _ in range(6):
        with accum.accumulate():
            loss = model(x).square().mean()
        accum.backward(loss)
    monkeypatch.undo()
    assert flag_reads.reads == 3  # one per window, none per micro-batch
    # On the CPU the flag is read through its NumPy view: no tensor read (no dispatch).
    assert tensor_reads.reads == 0
    assert accum.skipped_steps == 0


def test_without_numpy_the_flag_is_read_as_a_tensor(monkeypatch):
    def no_numpy(self: torch.Tensor) -> None:
        raise RuntimeError("Numpy is not available")

    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    tensor_reads = ReadCounter(monkeypatch)
    factory = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    model, _, accum, results, (x, y) = poisoned_run(factory)
    monkeypatch.undo()
    assert tensor_reads.reads == 2  # each window's flag, read as a tensor
    assert results == [False, False, False, True] and accum.skipped_steps == 1
    expected, _ = clean_reference(factory, x, y)
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.equal(p, q)


@settings(max_examples=25, deadline=None)
@given(poison=st.lists(st.booleans(), min_size=1, max_size=8),
       fused=st.booleans(), steps=st.sampled_from([1, 2]))
def test_any_pattern_of_bad_windows_skips_exactly_those(poison, fused, steps):
    """The reused flag is re-armed after a bad window and stays clear after good ones."""
    factory = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=fused))  # noqa: E731
    micro = [bad for bad in poison for _ in range(steps)]  # a window is bad or clean whole
    model, opt, accum, results, (x, y) = poisoned_run(factory, steps=steps, poison=micro)
    expected = make_model()
    expected_opt = factory(expected.parameters())
    for bad in poison:
        if not bad:  # only the clean windows reach the reference
            expected_opt.zero_grad()
            F.mse_loss(expected(x), y).backward()
            expected_opt.step()
    assert accum.skipped_steps == sum(poison) and accum.num_steps == len(poison)
    if not fused:  # a fused optimizer skips on the device: backward cannot know
        assert results[steps - 1::steps] == [not bad for bad in poison]
    assert_same_state(model, opt, expected, expected_opt)


def test_plain_optimizer_still_skips_nonfinite_windows_by_default():
    factory = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
    model, _, accum, results, (x, y) = poisoned_run(factory)
    assert results == [False, False, False, True] and accum.skipped_steps == 1
    expected, _ = clean_reference(factory, x, y)
    for p, q in zip(model.parameters(), expected.parameters()):
        assert torch.equal(p, q)


def test_device_side_count_survives_a_state_round_trip():
    _, opt, accum, _, _ = poisoned_run(FUSED["sgd"], poison=(True, True, True, True), steps=1)
    state = accum.state_dict()
    fresh = tk.GradAccumulator(opt, 1)
    fresh.load_state_dict(state)
    assert state["skipped_steps"] == 4 and fresh.skipped_steps == 4


def test_accumulator_equals_the_canonical_loop_bitwise():
    """accumulate=1 with plain SGD: the same bits as zero_grad/backward/step by hand."""
    data = [(torch.randn(8, 6), torch.randn(8, 3)) for _ in range(5)]
    ours, theirs = make_model(), make_model()
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    accum = tk.GradAccumulator(opt_a, 1)
    for x, y in data:
        with accum.accumulate():
            loss = F.mse_loss(ours(x), y)
        accum.backward(loss, batch_size=len(x))
        opt_b.zero_grad(set_to_none=True)
        F.mse_loss(theirs(x), y).backward()
        opt_b.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q) and p.grad is None


def test_zero_grad_is_the_real_call_when_overridden_or_profiled():
    calls = []

    class SGD(torch.optim.SGD):
        def zero_grad(self, set_to_none=True):
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    model = make_model()
    accum = tk.GradAccumulator(SGD(model.parameters(), lr=0.1), 1)
    accum.backward(model(torch.randn(2, 6)).sum())
    assert calls == [True]

    plain = tk.GradAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        plain.backward(model(torch.randn(2, 6)).sum())
    names = {e.name for e in prof.events()}
    assert "Optimizer.zero_grad#SGD.zero_grad" in names
    assert all(p.grad is None for p in model.parameters())


def test_trainer_skip_policy_books_each_skip_with_a_fused_optimizer():
    """nonfinite="skip" needs to know at once: the Trainer keeps the host read there."""

    class Poison(tk.Trainer):
        def train_step(self, batch):
            loss = super().train_step(batch)
            return loss * math.nan if self.batch_idx == 1 else loss

    model = make_model()
    data = [(torch.randn(4, 6), torch.randn(4, 3)) for _ in range(4)]
    trainer = Poison(model, torch.optim.SGD(model.parameters(), lr=0.1, fused=True),
                     F.mse_loss, nonfinite="skip", progress=False, device="cpu")
    history = trainer.fit(data, epochs=1)
    assert trainer.accumulator.skipped_steps == 1
    assert math.isfinite(history["train_loss"][-1])


def test_the_flag_is_zeroed_again_after_anything_but_a_clean_read(monkeypatch):
    import torchkit._grads as grads

    flag, one = NonFiniteFlag(), torch.ones(1)
    clean, bad = [torch.ones(3)], [torch.tensor([1.0, math.inf])]
    assert flag.read(flag.check(bad, one)) is True  # a read of 1.0
    assert flag.read(flag.check(clean, one)) is False
    flag.check(bad, one)  # not read (a fused optimizer's step reads it on the device)
    assert flag.read(flag.check(clean, one)) is False
    real = grads._FUSED

    def fails_half_way(g: list[torch.Tensor], found: torch.Tensor, inv: torch.Tensor) -> None:
        found.fill_(1.0)
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(grads, "_FUSED", fails_half_way)
    with pytest.raises(RuntimeError, match="kernel failed"):
        flag.check(clean, one)  # right after a clean read: the flag was known to be zero
    monkeypatch.setattr(grads, "_FUSED", real)
    assert flag.read(flag.check(clean, one)) is False


def test_the_flag_gives_another_device_a_fresh_buffer():
    flag, one = NonFiniteFlag(), torch.ones(1)
    first = flag.check([torch.ones(2)], one)
    other = flag.check([torch.ones(2, device="meta")], torch.ones(1, device="meta"))
    assert other.device.type == "meta" and other is not first
    assert flag.read(flag.check([torch.ones(2)], one)) is False
