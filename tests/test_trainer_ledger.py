"""The Trainer's loss ledger: sample-weighted means, the non-finite policies, round trips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchkit.trainer._ledger import make_ledger

CPU = torch.device("cpu")
batches = st.lists(st.tuples(st.floats(-1e3, 1e3, width=32), st.integers(1, 64)),
                   min_size=1, max_size=150)


def book(ledger, entries, start=0):
    for i, (loss, size) in enumerate(entries, start):
        ledger.add(torch.tensor(loss), size, i, i)
        ledger.end_window(True, epoch=0, batch_idx=i, step=i + 1)


@pytest.mark.parametrize("policy", ["raise", "skip"])
@given(entries=batches)
def test_the_epoch_loss_is_the_sample_weighted_mean(policy, entries):
    ledger = make_ledger(policy, device=CPU, scaled=False)
    book(ledger, entries)
    expected = math.fsum(loss * size for loss, size in entries) / sum(s for _, s in entries)
    assert ledger.close_epoch() == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert not ledger.nonfinite()


@pytest.mark.parametrize("policy", ["raise", "skip"])
@given(entries=batches, cut=st.integers(0, 150))
def test_state_round_trip_does_not_change_the_sums(policy, entries, cut):
    a, b = (make_ledger(policy, device=CPU, scaled=False) for _ in range(2))
    cut = min(cut, len(entries))
    book(a, entries[:cut])
    b.load_state_dict(a.state_dict())
    book(a, entries[cut:], cut)
    book(b, entries[cut:], cut)
    assert a.close_epoch() == b.close_epoch()  # bitwise: the same sums in the same order


def test_raise_finds_the_first_nonfinite_loss_and_names_where():
    ledger = make_ledger("raise", device=CPU, scaled=False)
    book(ledger, [(1.0, 2), (math.inf, 2), (math.nan, 2)])
    assert ledger.nonfinite()
    with pytest.raises(FloatingPointError, match="at epoch 3, batch 1, optimizer step 1"):
        raise ledger.error(3, here=True)
    with pytest.raises(FloatingPointError, match="on another rank in epoch 3"):
        raise ledger.error(3, here=False)


def test_skip_leaves_a_skipped_step_out_of_the_epoch(caplog):
    ledger = make_ledger("skip", device=CPU, scaled=False)
    ledger.add(torch.tensor(1.0), 4, 0, 0)
    ledger.end_window(True, epoch=0, batch_idx=0, step=1)
    ledger.add(torch.tensor(math.nan), 4, 1, 1)
    ledger.end_window(False, epoch=0, batch_idx=1, step=2)
    assert ledger.close_epoch() == 1.0
    assert "skipped the optimizer step at epoch 0, batch 1, optimizer step 2" in caplog.text
    assert not ledger.nonfinite()  # nothing to check: skipped steps never reach the sums
