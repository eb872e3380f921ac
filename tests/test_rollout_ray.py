"""Rollout workers on a real local Ray instance with the embedded simulator."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import ray
import torch

import rollout_workers
from buffer_service.ray_actor import remote_shard_class
from learner.td3 import TD3Learner
from rollout_workers.ray_actor import remote_weights_board_class, remote_worker_class
from td3drive.contracts.config import TD3DriveConfig, config_from_dict

CHUNK = 16


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_config(**rollout: object) -> TD3DriveConfig:
    return config_from_dict(
        {
            "learner": {
                "device": "cpu",
                "features_dim": 64,
                "actor_hidden": [32],
                "critic_hidden": [32],
                "batch_size": 16,
            },
            "replay": {
                "num_shards": 2,
                "chunk_steps": CHUNK,
                "min_size_to_sample": 32,
                "replay_ratio": None,
                "rate_limit_timeout_s": 60,
            },
            "rollout": {"num_workers": 2, "warmup_steps": 0, "weights_poll_steps": 8, **rollout},
        }
    )


def test_two_workers_fill_two_shards_and_pick_up_new_weights(ray_instance: None) -> None:
    config = run_config()
    shard_class = remote_shard_class(num_cpus=0)
    shards = [shard_class.remote(config.replay, 16, i) for i in range(2)]
    board = remote_weights_board_class().remote()
    worker_class = remote_worker_class(num_cpus=0)
    workers = [worker_class.remote(config, shards, board, i) for i in range(2)]

    learner = TD3Learner(config.learner)
    version, weights = learner.policy_weights()
    ray.get(board.publish.remote(version, [ray.put(weights)]))
    first = ray.get([w.run.remote(64) for w in workers], timeout=120)
    assert all(stats["policy_version"] == 0 for stats in first)

    # The learner moves on; a new version is published mid-run.
    batch = ray.get(shards[0].sample.remote(16))
    learner.update(batch.batch)
    learner.update(batch.batch)
    version, weights = learner.policy_weights()
    assert version == 2
    assert ray.get(board.publish.remote(version, [ray.put(weights)]))
    second = ray.get([w.run.remote(64) for w in workers], timeout=120)
    ray.get([w.flush.remote() for w in workers], timeout=60)
    assert all(stats["policy_version"] == 2 for stats in second)
    assert all(stats["weight_updates"] == 2 for stats in second)

    sizes = ray.get([s.size.remote() for s in shards])
    assert sum(sizes) == 2 * 128 and min(sizes) > 0
    # Transitions are tagged with the version that acted.
    sampled = ray.get(shards[1].sample.remote(64))
    assert set(sampled.policy_versions.tolist()) <= {0, 2}
    assert 2 in set(sampled.policy_versions.tolist())

    # The workers act exactly as the learner's actor does.
    obs = {"image": sampled.batch.obs_image[0], "vector": sampled.batch.obs_vector[0]}
    with torch.no_grad():
        expected = learner.actor(
            torch.from_numpy(obs["image"].copy())[None],
            torch.from_numpy(obs["vector"].copy())[None],
        )[0].numpy()
    for worker in workers:
        np.testing.assert_array_equal(ray.get(worker.policy_action.remote(obs)), expected)


def test_a_worker_survives_an_environment_that_raises(ray_instance: None) -> None:
    config = run_config(env_id=rollout_workers.FAULTY_ID, env_kwargs={"fail_on_steps": [10]})
    shards = [remote_shard_class(num_cpus=0).remote(config.replay, 16, i) for i in range(2)]
    worker = remote_worker_class(num_cpus=0).remote(config, shards, None, 0)
    stats = ray.get(worker.run.remote(40), timeout=120)
    ray.get(worker.flush.remote(), timeout=60)
    assert stats["env_restarts"] == 4  # each rebuilt env fails on its 10th step
    assert stats["total_steps"] == 40
    assert sum(ray.get([s.size.remote() for s in shards])) == 40
    assert stats["rejected"] == 0
