"""The data contract as code: spaces, transitions and batches (DESIGN.md §2)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from td3drive.contracts import spec
from td3drive.contracts.spec import Batch, SpecError, Transition
from tests.conftest import random_batch


def test_observation_space_matches_the_contract() -> None:
    space = spec.observation_space()
    assert isinstance(space, gym.spaces.Dict)
    assert set(space.spaces) == set(spec.OBS_KEYS)
    image, vector = space["image"], space["vector"]
    assert image.shape == (4, 84, 84) and image.dtype == np.uint8
    assert vector.shape == (23,) and vector.dtype == np.float32
    sample = space.sample()
    assert space.contains(sample)


def test_vector_layout_names_every_entry() -> None:
    assert spec.VECTOR_DIM == 23
    assert spec.VECTOR_LAYOUT[:3] == ("speed", "lateral_deviation", "heading_error")
    assert spec.VECTOR_LAYOUT[3:5] == ("waypoint_0_x", "waypoint_0_y")
    assert spec.VECTOR_LAYOUT[-1] == "waypoint_9_y"
    assert len(set(spec.VECTOR_LAYOUT)) == 23


def test_action_space_is_steer_and_throttle_brake_in_unit_box() -> None:
    space = spec.action_space()
    assert space.shape == (2,) and space.dtype == np.float32
    np.testing.assert_array_equal(space.low, [-1, -1])
    np.testing.assert_array_equal(space.high, [1, 1])
    assert (spec.STEER, spec.THROTTLE_BRAKE) == (0, 1)


def test_valid_batch_passes_and_reports_size() -> None:
    batch = random_batch(size=5)
    assert batch.validate() is batch
    assert batch.size == 5
    assert "weight" not in batch.arrays()


def test_batch_with_weights_validates() -> None:
    batch = random_batch(size=3)
    weighted = Batch(**{**batch.arrays(), "weight": np.ones(3, np.float32)})
    weighted.validate()
    assert "weight" in weighted.arrays()


def test_empty_batch_is_rejected() -> None:
    batch = random_batch(size=2)
    empty = Batch(**{k: v[:0] for k, v in batch.arrays().items()})
    with pytest.raises(SpecError, match="empty"):
        empty.validate()


def test_from_transitions_keeps_dtypes_and_discounts() -> None:
    space = spec.observation_space()
    space.seed(0)
    steps = [
        Transition(space.sample(), np.zeros(2, np.float32), 1.0, space.sample(), False, False),
        Transition(space.sample(), np.ones(2, np.float32), -1.0, space.sample(), True, False),
        Transition(space.sample(), -np.ones(2, np.float32), 0.5, space.sample(), False, True),
    ]
    batch = Batch.from_transitions(steps, gamma=0.5).validate()
    assert batch.obs_image.dtype == np.uint8 and batch.obs_image.shape == (3, 4, 84, 84)
    np.testing.assert_array_equal(batch.discount, np.float32([0.5, 0.0, 0.5]))
    np.testing.assert_array_equal(batch.reward, np.float32([1.0, -1.0, 0.5]))
    with pytest.raises(SpecError, match="gamma"):
        Batch.from_transitions(steps, gamma=1.5)
    with pytest.raises(SpecError, match="at least one"):
        Batch.from_transitions([], gamma=0.9)


def test_typed_errors_survive_pickling_across_ray() -> None:
    import pickle

    from learner.td3 import NonFiniteLossError
    from rollout_workers.carla import CarlaConnectionError, CarlaTimeoutError

    for error in (
        SpecError("batch.reward", "contains NaN"),
        NonFiniteLossError("critic", 3, {"losses/critic": float("nan")}),
        CarlaConnectionError("h:2000", "refused", retryable=False),
        CarlaTimeoutError("h:2000", "tick"),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
