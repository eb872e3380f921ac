"""Shared fixtures: small random batches that satisfy the data contract."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from td3drive.contracts.spec import Batch

# Two cores on the development and CI machines; keep torch from oversubscribing.
torch.set_num_threads(2)


def random_batch(size: int = 8, seed: int = 0, discount: float = 0.99) -> Batch:
    """A contract-valid batch of ``size`` random transitions."""
    rng = np.random.default_rng(seed)
    return Batch(
        obs_image=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        obs_vector=rng.standard_normal((size, 23), dtype=np.float32),
        action=rng.uniform(-1, 1, (size, 2)).astype(np.float32),
        reward=rng.standard_normal(size).astype(np.float32),
        discount=np.full(size, discount, dtype=np.float32),
        next_obs_image=rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8),
        next_obs_vector=rng.standard_normal((size, 23), dtype=np.float32),
    )


@pytest.fixture
def batch() -> Batch:
    return random_batch()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``carla`` need a CARLA server: they run only when
    ``CARLA_HOST`` (and optionally ``CARLA_PORT``) name one."""
    if os.environ.get("CARLA_HOST"):
        return
    skip = pytest.mark.skip(reason="needs a CARLA server: set CARLA_HOST (and CARLA_PORT)")
    for item in items:
        if "carla" in item.keywords:
            item.add_marker(skip)
