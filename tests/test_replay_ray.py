"""The replay service on a real local Ray instance: 2 shards, 2 pushers,
1 sampler; back-pressure; blocked inserts never delay other calls; bad
payloads over the wire.

Nothing here depends on the machine's speed: tests wait on counts a shard
reports (``waiting_inserts``, ``size``), with timeouts only a real hang reaches.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray

from buffer_service.ray_actor import (
    ReplaySampler,
    ReplayWriter,
    remote_shard_class,
    sample_threads,
    split_proportionally,
)
from td3drive.bench.synthetic import SyntheticEpisode, chunked
from td3drive.contracts.codec import encode
from td3drive.contracts.config import ReplayConfig
from tests.conftest import wait_until

CHUNK = 16
BATCH = 32
HANG_S = 60  # a wait that only a real hang reaches


def stat(shard: Any, key: str) -> Any:
    return ray.get(shard.stats.remote(), timeout=HANG_S)[key]


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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


def test_every_shard_method_has_a_concurrency_group() -> None:
    # A public method left in Ray's default group would share its threads with
    # nothing in particular; inserts and samples must each have their own.
    import buffer_service.ray_actor as ray_actor
    import buffer_service.shard as plain

    public = [n for n, v in vars(plain.ReplayShard).items() if callable(v) and n[0] != "_"]
    groups = {
        name: getattr(vars(ray_actor.ReplayShard).get(name), "__ray_concurrency_group__", None)
        for name in public
    }
    assert groups.pop("insert") == "insert" and groups.pop("sample") == "sample"
    assert groups.pop("sample_compressed") == "sample"
    assert set(groups.values()) == {"control"}, groups


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
    # Round-robin spreads every pusher's chunks over both shards, but not
    # evenly on a loaded machine: a push skips a shard that still holds this
    # writer's last one. Each pusher's first push goes to its first shard.
    assert sum(sizes) == 256 and min(sizes) >= CHUNK, sizes

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
        rate_limit_timeout_s=HANG_S,
    )
    shard = remote_shard_class(num_cpus=0).remote(config, 16, 0)
    writer = ReplayWriter([shard], max_in_flight=2)
    data = episode_payloads(range(10), 0)
    # Two chunks are accepted (min size, then tolerance), the next two wait in
    # the shard for a learner; the pushes themselves wait for slots as needed.
    for payload in data[:4]:
        writer.push(payload, timeout_s=HANG_S)
        assert writer.in_flight <= 2
    wait_until(lambda: stat(shard, "waiting_inserts") == 2, "two inserts held by the shard")
    assert ray.get(shard.size.remote()) == 2 * CHUNK
    assert writer.in_flight == 2 and writer.pushed == 4
    # Both slots are held by inserts the shard holds: the next push cannot be
    # sent, whatever the machine's speed, and is not queued in memory either.
    waited = writer.wait_s_total
    with pytest.raises(TimeoutError, match="no push slot"):
        writer.push(data[4], timeout_s=0.5)
    assert writer.pushed == 4 and writer.in_flight == 2
    assert writer.pushed_transitions == 4 * CHUNK
    assert writer.wait_s_total - waited >= 0.5
    # The learner catches up; the waiting pushes land.
    for _ in range(4):
        ray.get(shard.sample.remote(16), timeout=HANG_S)
    writer.flush(timeout_s=HANG_S)
    assert ray.get(shard.size.remote()) == 4 * CHUNK
    assert writer.in_flight == 0 and writer.in_flight_transitions == 0


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
        rate_limit_timeout_s=HANG_S,
    )
    shard_class = remote_shard_class(num_cpus=0)
    shards = [shard_class.remote(config, 16, index) for index in range(2)]
    data = episode_payloads(range(10), 0)
    ray.get([shards[0].insert.remote(p) for p in data[:2]], timeout=HANG_S)
    held = shards[0].insert.remote(data[2])  # min size, tolerance, then held
    wait_until(lambda: stat(shards[0], "waiting_inserts") == 1, "shard 0 to hold a push")

    writer = ReplayWriter(shards, max_in_flight=2, first_shard=0)
    for payload in data[3:7]:
        writer.push(payload, timeout_s=HANG_S)  # round-robin hung on the fourth
    assert writer.in_flight_per_shard()[0] == 1  # one push waits on shard 0, no more
    # Shard 1 took two chunks and holds the fourth push.
    wait_until(lambda: stat(shards[1], "waiting_inserts") == 1, "shard 1 to hold a push")
    assert ray.get(shards[1].size.remote()) == 2 * CHUNK
    # The learner samples both shards; every held push lands.
    for _ in range(3):
        ray.get([shard.sample.remote(16) for shard in shards], timeout=HANG_S)
    ray.get(held, timeout=HANG_S)
    writer.flush(timeout_s=HANG_S)
    assert ray.get([shard.size.remote() for shard in shards]) == [4 * CHUNK, 3 * CHUNK]


def test_blocked_inserts_beyond_the_insert_threads_never_delay_other_calls(
    ray_instance: None,
) -> None:
    # Two insert threads and five inserts held by the rate limiter (two in
    # threads, three queued). With one thread pool for every method, the
    # learner's size/sample, stats, save and release queued behind them until
    # the inserts timed out (rate_limit_timeout_s later; here never, within
    # the test's waits).
    config = ReplayConfig(
        num_shards=1,
        chunk_steps=CHUNK,
        min_size_to_sample=CHUNK,
        replay_ratio=1.0,
        replay_ratio_tolerance=24.0,
        rate_limit_timeout_s=600,
    )
    shard = remote_shard_class(max_concurrency=2, num_cpus=0).remote(config, 16, 0)
    data = episode_payloads(range(4), 0)
    ray.get([shard.insert.remote(p) for p in data[:2]], timeout=HANG_S)  # min size, tolerance
    held = [shard.insert.remote(p) for p in data[2:7]]
    wait_until(lambda: stat(shard, "waiting_inserts") == 2, "both insert threads to block")
    ready, _ = ray.wait(held, num_returns=len(held), timeout=0)
    assert not ready
    # Every other call answers while the inserts stay blocked.
    assert ray.get(shard.size.remote(), timeout=HANG_S) == 2 * CHUNK
    assert stat(shard, "rejected_payloads") == 0
    assert ray.get(shard.priorities.remote(), timeout=HANG_S) is None
    sampled = ray.get(shard.sample.remote(16), timeout=HANG_S)  # debt 16 -> 0: one chunk may land
    assert sampled.ids.shape == (16,)
    wait_until(lambda: ray.get(shard.size.remote()) == 3 * CHUNK, "one held insert to land")
    # Collection ends: release wakes every held insert, queued ones included.
    ray.get(shard.release_rate_limit.remote(), timeout=HANG_S)
    ray.get(held, timeout=HANG_S)
    assert ray.get(shard.size.remote(), timeout=HANG_S) == 7 * CHUNK
    ray.kill(shard)


def test_the_sample_group_runs_prefetch_plus_one_samples_at_once(ray_instance: None) -> None:
    # The pipelined sampler keeps `prefetch` samples in flight per shard: with
    # too few sample threads they would queue in Ray behind each other instead
    # of decoding in parallel, and an abandoned sample could hold the last one.
    prefetch = 3
    config = ReplayConfig(
        num_shards=1,
        chunk_steps=CHUNK,
        min_size_to_sample=2 * CHUNK,
        replay_ratio=None,
        rate_limit_timeout_s=600,
        prefetch_batches=prefetch,
    )
    shard_class = remote_shard_class(num_cpus=0, sample_concurrency=sample_threads(prefetch))
    shard = shard_class.remote(config, 16, 0)
    samples = [shard.sample.remote(8) for _ in range(prefetch + 2)]
    wait_until(lambda: stat(shard, "waiting_samples") == prefetch + 1, "4 samples to block")
    assert stat(shard, "waiting_samples") == prefetch + 1  # the fifth waits in Ray's queue
    for payload in episode_payloads(range(1), 0):  # 2 chunks: min_size_to_sample reached
        ray.get(shard.insert.remote(payload), timeout=HANG_S)
    assert [s.ids.shape for s in ray.get(samples, timeout=HANG_S)] == [(8,)] * (prefetch + 2)
    ray.kill(shard)


def test_sample_group_size_is_checked() -> None:
    with pytest.raises(ValueError, match="sample_concurrency"):
        remote_shard_class(num_cpus=0, sample_concurrency=0)


@pytest.mark.parametrize("decode_threads", [1, 2])
def test_compressed_transport_gives_exactly_the_decoded_batches(
    ray_instance: None, decode_threads: int
) -> None:
    # Two identical pairs of shards (same seeds, same chunks in the same
    # order): one serves decoded samples, the other compressed ones that the
    # sampler decodes. prefetch=1 keeps one sample per shard in flight, so
    # both pairs draw in the same order.
    config = ReplayConfig(
        num_shards=2, chunk_steps=CHUNK, min_size_to_sample=CHUNK, replay_ratio=None
    )
    data = episode_payloads(range(3), 5)
    pairs = []
    for _ in range(2):
        shard_class = remote_shard_class(num_cpus=0)
        shards = [shard_class.remote(config, BATCH, index) for index in range(2)]
        for payload in data:  # in order: concurrent inserts could land in any order
            ray.get([s.insert.remote(payload) for s in shards], timeout=HANG_S)
        pairs.append(shards)
    decoded = ReplaySampler(pairs[0], BATCH, prefetch=1, timeout_s=HANG_S)
    compressed = ReplaySampler(
        pairs[1],
        BATCH,
        prefetch=1,
        timeout_s=HANG_S,
        transport="compressed",
        decode_threads=decode_threads,
    )
    try:
        for _ in range(3):
            want, got = decoded.next(), compressed.next()
            np.testing.assert_array_equal(got.shard_index, want.shard_index)
            np.testing.assert_array_equal(got.sampled.ids, want.sampled.ids)
            np.testing.assert_array_equal(got.sampled.policy_versions, want.sampled.policy_versions)
            assert got.sampled.shard_size == want.sampled.shard_size == 2 * len(data) * CHUNK
            for name, array in want.sampled.batch.arrays().items():
                np.testing.assert_array_equal(got.sampled.batch.arrays()[name], array, name)
    finally:
        decoded.close()
        compressed.close()
    for actor in (*pairs[0], *pairs[1]):
        ray.kill(actor)


def test_sampler_refuses_an_unknown_transport() -> None:
    with pytest.raises(ValueError, match="transport"):
        ReplaySampler([], BATCH, transport="raw")
    with pytest.raises(ValueError, match="decode_threads"):
        ReplaySampler([], BATCH, transport="compressed", decode_threads=0)


def test_invalid_payload_over_the_wire_is_counted_not_fatal(ray_instance: None) -> None:
    config = ReplayConfig(num_shards=1, chunk_steps=CHUNK, min_size_to_sample=CHUNK)
    shard = remote_shard_class(num_cpus=0).remote(config, 16, 0)
    writer = ReplayWriter([shard], max_in_flight=1)
    good = episode_payloads(range(1), 0)[0]
    writer.push(good[:-10], timeout_s=HANG_S)  # truncated: its header still says 16 steps
    writer.push("not bytes", timeout_s=HANG_S)  # type: ignore[arg-type]
    writer.push(good, timeout_s=HANG_S)
    writer.flush(timeout_s=HANG_S)
    assert writer.pushed == 3 and writer.rejected == 2
    assert writer.pushed_transitions == 2 * CHUNK and writer.rejected_transitions == CHUNK
    stats = ray.get(shard.stats.remote())
    assert stats["rejected_payloads"] == 2 and stats["size"] == CHUNK
    assert stats["inserted_transitions"] == CHUNK
    # pushed - rejected - inserted: nothing lost
    assert writer.pushed_transitions - writer.rejected_transitions == stats["inserted_transitions"]


def filled_shards(count: int, chunks_per_shard: list[int]) -> list[Any]:
    config = ReplayConfig(
        num_shards=count,
        chunk_steps=CHUNK,
        min_size_to_sample=count * CHUNK,  # one chunk per shard
        replay_ratio=None,
        rate_limit_timeout_s=HANG_S,
    )
    shard_class = remote_shard_class(num_cpus=0)
    shards = [shard_class.remote(config, BATCH, index) for index in range(count)]
    data = episode_payloads(range(10), 0)
    for index, chunks in enumerate(chunks_per_shard):
        ray.get([shards[index].insert.remote(p) for p in data[:chunks]], timeout=HANG_S)
    return shards


def sampled_total(shards: list[Any]) -> int:
    return sum(s["sampled_transitions"] for s in ray.get([s.stats.remote() for s in shards]))


def test_sampler_sends_one_call_per_shard_per_batch_and_prefetches(ray_instance: None) -> None:
    shards = filled_shards(2, [2, 6])
    sampler = ReplaySampler(shards, BATCH, prefetch=3, timeout_s=HANG_S)
    try:
        for _ in range(4):
            sample = sampler.next()
            assert np.abs(np.bincount(sample.shard_index) - [BATCH // 4, 3 * BATCH // 4]).max() <= 1
            assert sample.sampled.shard_size == 8 * CHUNK  # the sizes come back with the sample
        # Sizes were asked once, when the thread started; every later batch
        # took one sample call per shard. With the learner idle, the thread
        # holds `prefetch` ready batches and one more, no further.
        wait_until(lambda: sampled_total(shards) == (4 + 3 + 1) * BATCH, "the prefetch to fill")
        assert sampler.size_queries == 2
        assert sampler.sample_requests == 2 * (4 + 3 + 1)
    finally:
        sampler.close()
    assert sampled_total(shards) == (4 + 3 + 1) * BATCH
    for shard in shards:
        ray.kill(shard)


def test_sampler_tracks_a_shard_that_fills_later(ray_instance: None) -> None:
    # Shard 1 is empty at first: its share is 0, and it is asked its size with
    # every batch until it holds data, then sampled in proportion.
    shards = filled_shards(2, [2, 0])
    sampler = ReplaySampler(shards, BATCH, prefetch=1, timeout_s=HANG_S)
    try:
        first = sampler.next()
        assert set(first.shard_index.tolist()) == {0}
        ray.get([shards[1].insert.remote(p) for p in episode_payloads(range(1), 3)])
        deadline = time.monotonic() + HANG_S
        while 1 not in set(sampler.next().shard_index.tolist()):
            assert time.monotonic() < deadline, "shard 1 was never sampled"
        assert sampler.size_queries >= 3  # both at the start, then shard 1 with its 0 share
    finally:
        sampler.close()
    for shard in shards:
        ray.kill(shard)
