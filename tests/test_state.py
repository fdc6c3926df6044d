"""The Stateful protocol and the key check every stateful piece uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkit as tk
from torchkit._utils import check_keys, require


@pytest.mark.parametrize(
    "obj",
    [
        tk.EarlyStopping(),
        tk.GradAccumulator(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), 2),
        nn.Linear(1, 1),
        torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
        torch.amp.GradScaler("cpu"),
    ],
)
def test_pieces_and_torch_objects_are_stateful(obj):
    assert isinstance(obj, tk.Stateful)


def test_other_objects_are_not_stateful():
    assert not isinstance(object(), tk.Stateful)
    assert not isinstance({"state_dict": 1}, tk.Stateful)


def test_check_keys_lists_missing_and_unexpected():
    check_keys({"a": 1, "b": 2}, expected=("a", "b"), owner="Piece")
    with pytest.raises(KeyError, match=r"missing keys \['b'\] and unexpected keys \['c'\]"):
        check_keys({"a": 1, "c": 2}, expected=("a", "b"), owner="Piece")


def test_require_names_the_extra():
    assert require("math", extra="none").sqrt(4.0) == 2.0
    with pytest.raises(ImportError, match=r'pip install "torchkit\[plot\]"'):
        require("surely_not_a_module_xyz", extra="plot")
