"""Root pytest configuration: the namespace every docstring example runs in.

Doctests in ``src/torchkit`` (collected by ``--doctest-modules``) can use ``torch``,
``nn`` and ``tk`` without importing them. Every test, each docstring's examples included,
starts from ``torch.manual_seed(0)``, so what the examples print is deterministic. Test
fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import torchkit as tk


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict[str, Any]) -> None:
    doctest_namespace.update(torch=torch, nn=nn, tk=tk)
    torch.manual_seed(0)

