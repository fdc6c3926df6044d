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


def draws():
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_seed_everything_reproduces_every_generator():
    assert tk.seed_everything(7) == 7
    first = draws()
    tk.seed_everything(7)
    assert draws() == first
    tk.seed_everything(8)
    assert draws() != first


@pytest.fixture
def restore_determinism():
    import os

    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(flags[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], flags[2]
    if flags[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_seed_everything_deterministic(restore_determinism):
    import os

    tk.seed_everything(0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.parametrize(
    ("seed", "error", "message"),
    [
        (-1, ValueError, r"seed must be in \[0, 2\*\*32 - 1\], got -1"),
        (2**32, ValueError, "seed must be in"),
        (1.0, TypeError, "seed must be an int, got float"),
        (True, TypeError, "seed must be an int, got bool"),
    ],
)
def test_seed_everything_rejects_bad_seeds(seed, error, message):
    with pytest.raises(error, match=message):
        tk.seed_everything(seed)


def test_rng_state_survives_a_weights_only_round_trip():
    import io

    state = tk.get_rng_state()
    expected = draws()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    tk.seed_everything(123)
    tk.set_rng_state(torch.load(buffer, weights_only=True))
    assert draws() == expected


def test_set_rng_state_restores_only_what_it_is_given():
    import random

    state = tk.get_rng_state()
    expected_torch = torch.rand(2)
    random.seed(5)
    expected_python = random.random()
    random.seed(5)
    tk.set_rng_state({"torch": state["torch"]})
    assert torch.equal(torch.rand(2), expected_torch)
    assert random.random() == expected_python
    with pytest.raises(KeyError, match=r"keys among \['cuda', 'numpy', 'python', 'torch'\]"):
        tk.set_rng_state({"jax": 1})
