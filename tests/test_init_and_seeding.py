"""init_weights and replace_head(init=); seed_worker and loader_generator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import torchkit as tk


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Flatten(),
                         nn.Linear(64 * 4, 512), nn.Linear(512, 4))


def test_init_weights_methods_statistics_and_selection():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = tk.init_weights(net, ["0", "3"], exclude="3.bias", method="kaiming_normal",
                            bias=0.1)
    assert names == ["0.weight", "0.bias", "3.weight"]
    assert torch.equal(net[0].bias, torch.full((64,), 0.1))
    assert torch.equal(net[3].bias, before["3.bias"])  # excluded
    assert torch.equal(net[4].weight, before["4.weight"])  # not selected
    std = net[3].weight.std().item()
    assert std == pytest.approx((2 / 256) ** 0.5, rel=0.05)  # kaiming: sqrt(2 / fan_in)
    tk.init_weights(net, "4.weight", method="xavier_uniform")
    bound = (6 / (512 + 4)) ** 0.5
    assert net[4].weight.abs().max().item() <= bound
    tk.init_weights(net, "1", method="zeros", bias=0.5)
    assert torch.equal(net[1].weight, torch.ones(64))  # a norm's scale goes to 1
    assert torch.equal(net[1].bias, torch.full((64,), 0.5))
    assert tk.init_weights(net, "3.weight", method="trunc_normal") == ["3.weight"]
    assert net[3].weight.abs().max().item() <= 0.04


def test_init_weights_is_seeded_by_torch():
    a, b = _net(), _net()
    torch.manual_seed(7)
    tk.init_weights(a, method="orthogonal")
    torch.manual_seed(7)
    tk.init_weights(b, method="orthogonal")
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_init_weights_errors():
    with pytest.raises(ValueError, match="method must be one of 'kaiming_normal'"):
        tk.init_weights(_net(), method="he")
    with pytest.raises(ValueError, match=r"pattern\(s\) 'fc' match no parameter"):
        tk.init_weights(_net(), "fc")
    with pytest.raises(ValueError, match="bias must be a finite number"):
        tk.init_weights(_net(), bias=float("nan"))
    with pytest.raises(TypeError, match="include must be a glob pattern"):
        tk.init_weights(_net(), 3)  # type: ignore[arg-type]


def test_replace_head_init():
    net = _net()
    torch.manual_seed(1)
    head = tk.replace_head(net, 10, init="zeros")
    assert torch.equal(head.weight, torch.zeros(10, 512)) and torch.equal(head.bias,
                                                                          torch.zeros(10))
    head = tk.replace_head(net, nn.Linear(512, 3), init="kaiming_uniform")
    assert head.weight.abs().max().item() <= (6 / 512) ** 0.5
    with pytest.raises(ValueError, match="init must be None or one of"):
        tk.replace_head(net, 3, init="he")


class Noisy(Dataset[tuple[float, float, float]]):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), torch.rand(()).item()


def _epoch(seed: int, workers: int) -> list[list[float]]:
    loader = DataLoader(Noisy(), batch_size=2, shuffle=True, num_workers=workers,
                        worker_init_fn=tk.seed_worker, generator=tk.loader_generator(seed))
    return [torch.stack(b).tolist() for b in loader]


def test_seeded_workers_repeat_and_differ():
    first = _epoch(0, 2)
    torch.manual_seed(123)  # the global RNG does not matter: the generator decides
    random.seed(9)
    assert _epoch(0, 2) == first
    assert _epoch(1, 2) != first
    python_draws = [row for batch in first for row in batch[0]]
    assert len(set(python_draws)) == len(python_draws)  # workers do not repeat each other


def test_seed_worker_in_process_and_loader_generator_errors():
    torch.manual_seed(42)
    tk.seed_worker(0)
    a, b = random.random(), float(np.random.rand())
    random.seed(42)
    np.random.seed(42)
    assert (a, b) == (random.random(), float(np.random.rand()))
    assert torch.equal(torch.randperm(6, generator=tk.loader_generator(3)),
                       torch.randperm(6, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\), got -1"):
        tk.loader_generator(-1)
