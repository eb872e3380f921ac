"""The rollout worker in-process: chunks, exploration, weights, crashes."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

import rollout_workers
from learner.td3 import TD3Learner
from rollout_workers.worker import (
    EnvironmentFailure,
    EnvironmentSpecError,
    RolloutWorker,
    WeightsSource,
)
from td3drive.contracts.codec import Chunk, decode
from td3drive.contracts.config import LearnerConfig, RolloutConfig

LEARNER = LearnerConfig(
    device="cpu", features_dim=64, actor_hidden=(32,), critic_hidden=(32,), random_shift_pad=0
)
CHUNK = 16


def make_worker(
    pushed: list[bytes], weights: WeightsSource | None = None, **rollout: Any
) -> RolloutWorker:
    fields: dict[str, Any] = {"warmup_steps": 20, "weights_poll_steps": 8, **rollout}
    return RolloutWorker(
        rollout=RolloutConfig(**fields),
        chunk_steps=CHUNK,
        learner=LEARNER,
        push=pushed.append,
        weights_source=weights,
    )


def decoded(pushed: list[bytes]) -> list[Chunk]:
    return [decode(p).decompress() for p in pushed]


def test_chunks_are_consecutive_steps_and_episodes_end_flagged() -> None:
    pushed: list[bytes] = []
    worker = make_worker(pushed)
    stats = worker.run(120)
    worker.flush()
    chunks = decoded(pushed)
    assert sum(c.num_steps for c in chunks) == 120 == stats["total_steps"]
    assert all(c.num_steps <= CHUNK for c in chunks)
    # Consecutive chunks of one episode continue where the previous ended.
    for previous, current in itertools.pairwise(chunks):
        if current.episode_id == previous.episode_id:
            assert current.first_step == previous.first_step + previous.num_steps
            np.testing.assert_array_equal(current.frames[:4], previous.frames[-4:])
        else:
            assert previous.terminated[-1] or previous.truncated[-1] or previous is chunks[-1]
    assert stats["episodes"], "random driving should end some episodes in 120 steps"
    assert {"return", "route_completion", "mean_speed_kmh"} <= set(stats["episodes"][0])


def test_warmup_is_uniform_with_forward_bias_then_policy_plus_noise() -> None:
    pushed: list[bytes] = []
    learner = TD3Learner(LEARNER)
    version, weights = learner.policy_weights()
    worker = make_worker(
        pushed,
        weights=lambda g, v: (0, version, weights) if v < version else None,
        warmup_steps=40,
        warmup_throttle_min=0.0,
        exploration_noise=0.1,
    )
    worker.run(80)
    worker.flush()
    actions = np.concatenate([c.actions for c in decoded(pushed)])
    warmup = actions[:40]
    assert warmup[:, 1].min() >= 0.0  # never brakes while warming up
    assert warmup[:, 0].std() > 0.4  # uniform steer
    # After warm-up: the deterministic policy plus N(0, 0.1) noise.
    chunks = decoded(pushed)
    steps = [(c, t) for c in chunks for t in range(c.num_steps)][40:]
    deviations = np.asarray(
        [chunk.actions[t] - worker.policy_action(chunk.obs(t)) for chunk, t in steps]
    )
    assert 0.05 < deviations.std() < 0.2
    assert np.abs(deviations.mean()) < 0.05


def test_new_weights_are_loaded_and_tag_transitions() -> None:
    pushed: list[bytes] = []
    learner = TD3Learner(LEARNER)
    board: dict[str, Any] = {}

    def source(generation: int, held: int) -> tuple[int, int, Any] | None:
        if "weights" in board and board["version"] > held:
            return 0, board["version"], board["weights"]
        return None

    worker = make_worker(pushed, weights=source, warmup_steps=0)
    worker.run(16)
    assert worker.policy_version == -1  # nothing published: keeps exploring
    board["version"], board["weights"] = 7, learner.policy_weights()[1]
    worker.run(32)
    worker.flush()
    assert worker.policy_version == 7
    versions = np.concatenate([c.versions for c in decoded(pushed)])
    assert versions[0] == 0 and versions[-1] == 7
    obs = decoded(pushed)[-1].obs(0)
    with torch.no_grad():
        expected = learner.actor(
            torch.from_numpy(obs["image"].copy())[None],
            torch.from_numpy(obs["vector"].copy())[None],
        )[0].numpy()
    np.testing.assert_array_equal(worker.policy_action(obs), expected)


def test_a_crashing_environment_is_rebuilt_and_its_partial_chunk_is_truncated() -> None:
    pushed: list[bytes] = []
    worker = make_worker(
        pushed,
        env_id=rollout_workers.FAULTY_ID,
        env_kwargs={"fail_on_steps": [5]},
        warmup_throttle_min=0.3,
    )
    first_env = worker.env
    stats = worker.run(12)  # each environment instance crashes on its 5th step
    worker.flush()
    assert stats["env_restarts"] == 2
    assert worker.env is not first_env
    chunks = decoded(pushed)
    assert [c.num_steps for c in chunks] == [4, 4, 4]
    assert chunks[0].truncated[-1] and chunks[1].truncated[-1]  # crashed episodes: truncated
    assert not chunks[0].terminated.any()
    assert chunks[1].first_step == 0 and chunks[1].episode_id != chunks[0].episode_id


def test_an_environment_that_always_fails_stops_the_worker() -> None:
    worker = make_worker([], env_id=rollout_workers.FAULTY_ID, env_kwargs={"fail_on_steps": [1]})
    with pytest.raises(EnvironmentFailure, match="in a row"):
        worker.run(5)


def test_an_environment_with_other_spaces_is_refused() -> None:
    with pytest.raises(EnvironmentSpecError, match="observation space"):
        make_worker([], env_id="CartPole-v1")


def test_each_worker_gets_its_own_carla_server_ports() -> None:
    from rollout_workers.worker import worker_env_kwargs

    base: dict[str, Any] = {
        "carla": {"host": "h", "port": 2000, "tm_port": 8000, "seed": 5},
        "other": 1,
    }
    second = worker_env_kwargs(base, 2)
    assert (second["carla"]["port"], second["carla"]["tm_port"], second["carla"]["seed"]) == (
        2006,
        8002,
        7,
    )
    assert second["other"] == 1 and base["carla"]["port"] == 2000  # the base is untouched
    assert worker_env_kwargs({"other": 1}, 3) == {"other": 1}
