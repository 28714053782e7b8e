"""Shared fixtures: tiny real models of every family, a padded batch, and an independent routing reference."""

from __future__ import annotations

import os

import pytest
import torch

from moepatch.testing import tiny

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = tiny.TINY_FAMILIES
ROUTER_PATH = "mlp.gate"  # where every tiny family keeps its router (checked against the specs in test_registry)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str) -> torch.nn.Module:
    return tiny.tiny_model(family, seed=0)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return tiny.demo_batch()
