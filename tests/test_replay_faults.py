"""Replay faults on a real local Ray instance: a replay that gives no data ends
the learner's ``train`` with a typed error (it spun forever), the sampler can be
restarted, and a SIGKILLed shard comes back counting its restart, with
cumulative counters from which the driver computes the transitions lost."""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray.exceptions import RayTaskError

from buffer_service.ray_actor import (
    ReplaySampler,
    ReplayTimeoutError,
    ReplayWriter,
    remote_shard_class,
)
from learner.ray_actor import remote_learner_actor_class
from rollout_workers.ray_actor import remote_weights_board_class
from td3drive.bench.synthetic import SyntheticEpisode, chunked
from td3drive.contracts.codec import encode
from td3drive.contracts.config import LearnerConfig, ReplayConfig, RunConfig, TD3DriveConfig
from tests.conftest import wait_until

CHUNK = 16
BATCH = 16
HANG_S = 120  # a wait that only a real hang reaches
SHORT_TIMEOUT_S = 2.0  # replay.rate_limit_timeout_s where the test needs it to expire


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def payloads(count: int, first_episode: int = 0) -> list[bytes]:
    out: list[bytes] = []
    for episode in range(first_episode, first_episode + count):
        rng = np.random.default_rng(episode)
        transitions = SyntheticEpisode(rng, episode, CHUNK, "truncated", 0).transitions()
        out += [encode(c) for c in chunked(transitions, CHUNK)]
    return out


# ------------------------------------------------------------ the typed error
def test_replay_timeout_error_survives_pickling_and_a_ray_task() -> None:
    error = ReplayTimeoutError(2.5, "the replay shards did not answer a size query")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ReplayTimeoutError and isinstance(copy, TimeoutError)
    assert (copy.timeout_s, copy.reason, str(copy)) == (error.timeout_s, error.reason, str(error))
    assert "\n" not in str(error) and "replay.rate_limit_timeout_s" in str(error)


@ray.remote(num_cpus=0)
def _raises_replay_timeout() -> None:
    raise ReplayTimeoutError(1.0, "no data")


def test_replay_timeout_error_crosses_ray_as_its_own_type(ray_instance: None) -> None:
    with pytest.raises(ReplayTimeoutError) as info:
        ray.get(_raises_replay_timeout.remote(), timeout=HANG_S)
    assert isinstance(info.value, RayTaskError)
    assert isinstance(info.value.cause, ReplayTimeoutError)
    assert info.value.cause.reason == "no data"


# ------------------------------------------------------------ the sampler
def test_a_failed_sampler_raises_on_every_call_until_reset(ray_instance: None) -> None:
    config = ReplayConfig(
        num_shards=1,
        chunk_steps=CHUNK,
        min_size_to_sample=CHUNK,
        rate_limit_timeout_s=SHORT_TIMEOUT_S,
    )
    shard = remote_shard_class(num_cpus=0).remote(config, BATCH, 0)
    sampler = ReplaySampler([shard], BATCH, timeout_s=SHORT_TIMEOUT_S)
    try:
        # No data: the shard's sample times out, and the sampler says so, with
        # the shard's rate-limiter state, instead of timing out on every poll.
        deadline = time.monotonic() + HANG_S
        with pytest.raises(ReplayTimeoutError, match=r"too little data.*inserted=0"):
            while time.monotonic() < deadline:
                assert sampler.poll(timeout_s=0.2) is None
        assert isinstance(sampler.error, ReplayTimeoutError)
        for _ in range(3):  # the prefetch thread is gone: every call raises, at once
            with pytest.raises(ReplayTimeoutError, match="too little data"):
                sampler.poll(timeout_s=HANG_S)
        with pytest.raises(ReplayTimeoutError):
            sampler.next(timeout_s=HANG_S)

        ray.get([shard.insert.remote(p) for p in payloads(2)], timeout=HANG_S)
        sampler.reset()
        assert sampler.error is None and sampler.resets == 1
        sample = sampler.next(timeout_s=HANG_S)
        assert sample.sampled.ids.shape == (BATCH,)
    finally:
        sampler.close()
        ray.kill(shard)


# ------------------------------------------------------------ the learner
def test_learner_train_ends_with_a_replay_timeout_instead_of_spinning(
    ray_instance: None,
) -> None:
    # The shard never gets data. train() used to catch the sampler's
    # TimeoutError and poll again forever, the prefetch thread long gone.
    config = TD3DriveConfig(
        learner=LearnerConfig(
            device="cpu",
            features_dim=32,
            actor_hidden=(32,),
            critic_hidden=(32,),
            batch_size=BATCH,
            random_shift_pad=0,
        ),
        replay=ReplayConfig(
            num_shards=1,
            chunk_steps=CHUNK,
            min_size_to_sample=CHUNK,
            replay_ratio=None,
            rate_limit_timeout_s=SHORT_TIMEOUT_S,
        ),
        run=RunConfig(publish_every_updates=100),
    )
    shard = remote_shard_class(num_cpus=0).remote(config.replay, BATCH, 0)
    board = remote_weights_board_class().remote()
    learner = remote_learner_actor_class(num_cpus=1).remote(config, [shard], board)
    try:
        with pytest.raises(ReplayTimeoutError) as info:
            ray.get(learner.train.remote(5), timeout=HANG_S)
        assert isinstance(info.value, RayTaskError)
        assert isinstance(info.value.cause, ReplayTimeoutError)
        assert "replay.rate_limit_timeout_s" in str(info.value.cause)
        # Every later call fails the same way (no silent spin) until the driver
        # resets the sampler.
        with pytest.raises(ReplayTimeoutError):
            ray.get(learner.train.remote(5), timeout=HANG_S)
        # The driver's retry: data arrives, a fresh sampler, training goes on.
        ray.get([shard.insert.remote(p) for p in payloads(2)], timeout=HANG_S)
        ray.get(learner.reset_sampler.remote(), timeout=HANG_S)
        stats = ray.get(learner.train.remote(2), timeout=HANG_S)
        assert stats["done"] == 2
    finally:
        ray.get(learner.close.remote(), timeout=HANG_S)
        for actor in (learner, board, shard):
            ray.kill(actor)


# ------------------------------------------------------------ a killed shard
def _kill_and_wait_for_restart(shard: Any) -> dict[str, Any]:
    """SIGKILL the shard's process (found by its own ``os.getpid()``) and wait
    until Ray has restarted it; returns the new process's stats."""
    pid = ray.get(shard.stats.remote(), timeout=HANG_S)["pid"]
    os.kill(pid, signal.SIGKILL)
    stats: dict[str, Any] = {}

    def restarted() -> bool:
        try:
            stats.update(ray.get(shard.stats.remote(), timeout=HANG_S))
        except ray.exceptions.RayActorError:
            return False  # a call that was in flight when it died
        return bool(stats["pid"] != pid)

    wait_until(restarted, "Ray to restart the shard")
    return stats


def test_a_killed_shard_counts_its_restart_and_the_loss_is_computable(
    ray_instance: None, tmp_path: Path
) -> None:
    config = ReplayConfig(
        num_shards=1,
        chunk_steps=CHUNK,
        min_size_to_sample=CHUNK,
        replay_ratio=1.0,
        replay_ratio_tolerance=24.0,
        rate_limit_timeout_s=600,
    )
    shard = remote_shard_class(num_cpus=0).remote(config, BATCH, 0, str(tmp_path))
    writer = ReplayWriter([shard], max_in_flight=2)
    data = payloads(4)
    for payload in data[:2]:  # min size, then tolerance: both inserted
        writer.push(payload, timeout_s=HANG_S)
    writer.flush(timeout_s=HANG_S)
    ray.get(shard.save.remote(), timeout=HANG_S)
    ray.get(shard.sample.remote(BATCH), timeout=HANG_S)  # room for one more chunk
    writer.push(data[2], timeout_s=HANG_S)  # inserted, never snapshotted
    writer.push(data[3], timeout_s=HANG_S)  # held by the rate limiter when the shard dies
    wait_until(
        lambda: ray.get(shard.stats.remote())["waiting_inserts"] == 1, "the fourth push to wait"
    )
    before = ray.get(shard.stats.remote(), timeout=HANG_S)
    assert before["inserted_transitions"] == 3 * CHUNK and before["restarts"] == 0

    stats = _kill_and_wait_for_restart(shard)
    assert stats["restarted"] is True and stats["restarts"] == 1
    assert stats["restored_from"] is not None
    # Cumulative, as of the snapshot: the third chunk died with the process.
    assert stats["inserted_transitions"] == 2 * CHUNK and stats["size"] == 2 * CHUNK
    writer.flush(timeout_s=HANG_S)  # the held push's shard died: lost, not raised
    assert writer.lost == 1 and writer.lost_transitions == CHUNK
    assert writer.pushed_transitions == 4 * CHUNK and writer.rejected_transitions == 0
    # What the driver reports as lost: pushed - rejected - inserted.
    lost = writer.pushed_transitions - writer.rejected_transitions - stats["inserted_transitions"]
    assert lost == 2 * CHUNK  # the acknowledged third chunk and the in-flight fourth

    # Killed again before any new snapshot: still counted.
    again = _kill_and_wait_for_restart(shard)
    assert again["restarts"] == 2 and again["inserted_transitions"] == 2 * CHUNK
    ray.kill(shard)
