"""The learner behind a real local Ray instance: the same object, called remotely."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import ray
import torch

from learner.ray_actor import remote_learner_class
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import LearnerConfig
from td3drive.contracts.networks import load_policy_weights, policy_for
from tests.conftest import random_batch


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_remote_learner_updates_and_publishes_numpy_weights(ray_instance: None) -> None:
    config = LearnerConfig(
        device="cpu", features_dim=64, actor_hidden=(32,), critic_hidden=(32,), policy_delay=1
    )
    learner = remote_learner_class(num_cpus=1).remote(config)
    batch = random_batch(size=4)
    metrics = ray.get(learner.update.remote(batch))
    assert metrics[M.LEARNER_UPDATES] == 1.0
    # Arrays that crossed the object store are read-only; the learner must cope.
    stored = ray.get(ray.put(batch))
    assert not stored.obs_image.flags.writeable
    assert ray.get(learner.update.remote(stored))[M.LEARNER_UPDATES] == 2.0
    assert np.isfinite(metrics[M.CRITIC_LOSS])

    version, weights = ray.get(learner.policy_weights.remote())
    assert version == 2
    weights_ref = ray.put((version, weights))  # how the driver publishes a version
    got_version, got = ray.get(weights_ref)
    assert got_version == 2
    policy = policy_for(config)
    load_policy_weights(policy, got)
    with torch.no_grad():
        action = policy(torch.from_numpy(batch.obs_image), torch.from_numpy(batch.obs_vector))
    assert action.shape == (4, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_policy_weights(policy_for(config.model_copy(update={"features_dim": 32})), got)
    ray.kill(learner)
