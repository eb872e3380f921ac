"""Shared fixtures and helpers: small random batches that satisfy the data
contract, and :func:`wait_until`, the one way tests wait for something."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from td3drive.contracts.spec import Batch

# Two cores on the development and CI machines; keep torch from oversubscribing.
torch.set_num_threads(2)

HANG_S = 600.0
"""How long :func:`wait_until` waits by default, s: only a real hang gets there
(CI machines are shared and noisy; a test never depends on their speed)."""


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout_s: float = HANG_S,
    poll_s: float = 0.05,
) -> None:
    """Poll ``condition`` every ``poll_s`` seconds until it is truthy.

    Raises:
        AssertionError: naming ``what``, when ``timeout_s`` passed first.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s:g} s")
        time.sleep(poll_s)


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
