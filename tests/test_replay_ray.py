"""The replay service on a real local Ray instance: 2 shards, 2 pushers,
1 sampler; back-pressure; bad payloads over the wire."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import ray

from buffer_service.codec import encode
from buffer_service.ray_actor import (
    ReplaySampler,
    ReplayWriter,
    remote_shard_class,
    split_proportionally,
)
from buffer_service.synthetic import SyntheticEpisode, chunked
from td3drive.config import ReplayConfig

CHUNK = 16
BATCH = 32


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def episode_payloads(episode_ids: range, version: int) -> list[bytes]:
    out = []
    for episode in episode_ids:
        rng = np.random.default_rng(episode)
        transitions = SyntheticEpisode(rng, episode, 2 * CHUNK, "terminated", version).transitions()
        out += [encode(c) for c in chunked(transitions, CHUNK)]
    return out


@ray.remote(num_cpus=0)
def pusher(shards: list, first_episode: int, version: int, first_shard: int) -> dict:
    writer = ReplayWriter(shards, max_in_flight=2, first_shard=first_shard)
    for payload in episode_payloads(range(first_episode, first_episode + 4), version):
        writer.push(payload, timeout_s=60)
    writer.flush(timeout_s=60)
    return {"pushed": writer.pushed, "rejected": writer.rejected}


def test_split_is_proportional_and_exact() -> None:
    assert split_proportionally(32, [100, 300]) == [8, 24]
    assert sum(split_proportionally(33, [1, 1, 1])) == 33
    assert split_proportionally(4, [0, 0]) == [2, 2]
    assert split_proportionally(10, [0, 5]) == [0, 10]


def test_two_shards_two_pushers_one_sampler(ray_instance: None) -> None:
    config = ReplayConfig(
        num_shards=2,
        chunk_steps=CHUNK,
        min_size_to_sample=64,
        replay_ratio=None,
        rate_limit_timeout_s=60,
    )
    shard_class = remote_shard_class(num_cpus=0)
    shards = [shard_class.remote(config, BATCH, index) for index in range(2)]
    results = ray.get(
        [pusher.remote(shards, 0, 7, 0), pusher.remote(shards, 100, 8, 1)], timeout=120
    )
    assert [r["pushed"] for r in results] == [8, 8]
    assert all(r["rejected"] == 0 for r in results)
    sizes = ray.get([s.size.remote() for s in shards])
    # Round-robin spreads every pusher's chunks over both shards (not always
    # exactly evenly: a push skips a shard that still holds this writer's last).
    assert sum(sizes) == 256 and min(sizes) >= 96, sizes

    sampler = ReplaySampler(shards, BATCH, prefetch=2, timeout_s=60)
    try:
        for _ in range(3):
            sample = sampler.next()
            sample.sampled.batch.validate()
            assert sample.sampled.ids.shape == (BATCH,)
            assert set(np.unique(sample.shard_index)) == {0, 1}
            expected = [round(BATCH * size / sum(sizes)) for size in sizes]
            assert np.abs(np.bincount(sample.shard_index) - expected).max() <= 1  # by size
            assert set(sample.sampled.policy_versions.tolist()) <= {7, 8}
    finally:
        sampler.close()
    stats = ray.get([s.stats.remote() for s in shards])
    assert sum(s["sampled_transitions"] for s in stats) >= 3 * BATCH
    assert all(s["rejected_payloads"] == 0 for s in stats)


def test_writer_waits_instead_of_queueing_when_the_shard_is_full(ray_instance: None) -> None:
    # ratio 1 with no learner: after min size + tolerance the shard takes no more.
    config = ReplayConfig(
        num_shards=1,
        chunk_steps=CHUNK,
        min_size_to_sample=CHUNK,
        replay_ratio=1.0,
        replay_ratio_tolerance=24.0,
        rate_limit_timeout_s=60,
    )
    shard = remote_shard_class(num_cpus=0).remote(config, 16, 0)
    writer = ReplayWriter([shard], max_in_flight=2)
    data = episode_payloads(range(10), 0)
    pushed = 0
    with pytest.raises(TimeoutError, match="no push slot"):
        for payload in data:
            writer.push(payload, timeout_s=1.0)
            pushed += 1
            assert writer.in_flight <= 2
    # Two chunks were accepted (min size, then tolerance), two wait in flight,
    # and the rest were never sent: the writer holds at most 2 payloads.
    assert ray.get(shard.size.remote()) == 2 * CHUNK
    assert writer.in_flight == 2 and pushed == 4
    assert writer.wait_s_total >= 1.0
    # The learner catches up; the waiting pushes land.
    for _ in range(4):
        ray.get(shard.sample.remote(16))
    writer.flush(timeout_s=30)
    assert ray.get(shard.size.remote()) == 4 * CHUNK


def test_writer_routes_around_a_shard_that_holds_its_pushes(ray_instance: None) -> None:
    # Shard 0 is ahead on inserts (the learner has not sampled it), so it holds
    # further pushes. Strict round-robin put every second push there until
    # both of the writer's slots waited on shard 0 and shard 1 starved: with a
    # learner that needs both shards for a batch, a deadlock mid-training.
    config = ReplayConfig(
        num_shards=2,
        chunk_steps=CHUNK,
        min_size_to_sample=2 * CHUNK,  # one chunk per shard
        replay_ratio=1.0,
        replay_ratio_tolerance=24.0,
        rate_limit_timeout_s=60,
    )
    shard_class = remote_shard_class(num_cpus=0)
    shards = [shard_class.remote(config, 16, index) for index in range(2)]
    data = episode_payloads(range(10), 0)
    ray.get([shards[0].insert.remote(p) for p in data[:2]], timeout=30)
    held = shards[0].insert.remote(data[2])  # min size, tolerance, then held
    ready, _ = ray.wait([held], timeout=1.0)
    assert not ready, "shard 0 should hold this push"

    writer = ReplayWriter(shards, max_in_flight=2, first_shard=0)
    for payload in data[3:7]:
        writer.push(payload, timeout_s=5.0)  # round-robin timed out on the fourth
    assert writer.in_flight_per_shard()[0] == 1  # one push waits on shard 0, no more
    deadline = time.monotonic() + 30
    while ray.get(shards[1].size.remote()) < 2 * CHUNK and time.monotonic() < deadline:
        time.sleep(0.05)  # the shard is threaded: a size call may overtake an insert
    assert ray.get(shards[1].size.remote()) == 2 * CHUNK
    # Shard 1 is now ahead too and holds the fourth push. The learner samples
    # both shards; every held push lands.
    for _ in range(3):
        ray.get([shard.sample.remote(16) for shard in shards], timeout=30)
    ray.get(held, timeout=30)
    writer.flush(timeout_s=30)
    assert ray.get([shard.size.remote() for shard in shards]) == [4 * CHUNK, 3 * CHUNK]


def test_invalid_payload_over_the_wire_is_counted_not_fatal(ray_instance: None) -> None:
    config = ReplayConfig(num_shards=1, chunk_steps=CHUNK, min_size_to_sample=CHUNK)
    shard = remote_shard_class(num_cpus=0).remote(config, 16, 0)
    writer = ReplayWriter([shard], max_in_flight=1)
    good = episode_payloads(range(1), 0)[0]
    writer.push(good[:-10])
    writer.push(good)
    writer.flush(timeout_s=30)
    assert writer.rejected == 1
    stats = ray.get(shard.stats.remote())
    assert stats["rejected_payloads"] == 1 and stats["size"] == CHUNK
