"""Shared fixtures: a tiny seeded model and data that train in milliseconds on CPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Hypothesis examples train tiny models: allow them a little more time than the default.
settings.register_profile(
    "torchkit", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("torchkit")

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine (CI runs
# multi-process tests) OpenMP threads fighting for cores make each op ~50x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_determinism():
    """Guides and examples call seed_everything(deterministic=True): keep it per test."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


@pytest.fixture
def tiny_model() -> nn.Module:
    return make_model()


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


@pytest.fixture
def tiny_loader(tiny_batch: tuple[torch.Tensor, torch.Tensor]) -> DataLoader:
    return DataLoader(TensorDataset(*tiny_batch), batch_size=8, shuffle=False)
