"""The batch helpers on the hot path: device moves and sample counts of every batch shape."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from torchkit._batches import batch_size, to_device

CPU, META = torch.device("cpu"), torch.device("meta")
Pair = namedtuple("Pair", "x y")


@pytest.mark.parametrize("kind", [tuple, list])
def test_a_sequence_already_in_place_is_returned_as_is(kind):
    batch = kind([torch.ones(3, 2), torch.zeros(3)])
    assert to_device(batch, CPU) is batch  # no copy of the container


@pytest.mark.parametrize("kind", [tuple, list])
def test_a_sequence_elsewhere_is_moved_whole_and_keeps_its_type(kind):
    batch = kind([torch.ones(3, 2), torch.zeros(3), "id"])
    moved = to_device(batch, META)
    assert type(moved) is kind and moved is not batch
    assert [t.device for t in moved[:2]] == [META, META] and moved[2] == "id"


def test_a_sequence_with_a_non_tensor_keeps_its_items_in_place():
    batch = (torch.ones(2), 3)
    moved = to_device(batch, CPU)
    assert type(moved) is tuple and moved[0] is batch[0] and moved[1] == 3


def test_tensors_dicts_and_namedtuples_are_moved():
    t = torch.ones(2)
    assert to_device(t, CPU) is t
    assert to_device(t, META).device == META
    moved = to_device({"inputs": t, "targets": [t, t]}, META)
    assert moved["inputs"].device == META and moved["targets"][1].device == META
    pair = to_device(Pair(t, t), META)
    assert isinstance(pair, Pair) and pair.y.device == META


@pytest.mark.parametrize(("batch", "expected"), [
    ((torch.ones(5, 2), torch.zeros(5)), 5),
    ([torch.ones(4), torch.zeros(4)], 4),
    ((torch.tensor(1.0), torch.zeros(3)), 1),  # a 0-dim first tensor is one sample
    (torch.ones(7, 3), 7),
    (torch.tensor(2.0), 1),
    ({"inputs": torch.ones(6, 1), "targets": torch.zeros(6)}, 6),
    (("ids", torch.ones(2, 1)), 2),  # the first tensor found
    (Pair(torch.ones(3), torch.ones(3)), 3),
    (("no", "tensors"), 0),
    ((), 0),
])
def test_batch_size_is_the_first_tensors_first_dimension(batch, expected):
    size = batch_size(batch)
    assert size == expected and type(size) is int
