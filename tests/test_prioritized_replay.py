"""Prioritized replay end to end (Schaul et al. 2016, proportional): importance
weights joined over shards, TD errors routed back to the shard each sample came
from with bounded in-flight updates, stale ids skipped, and a LearnerActor on a
real local Ray instance moving the priorities of both shards."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import ray

from buffer_service.ray_actor import ReplaySampler, ShardedSample, concatenate, remote_shard_class
from buffer_service.storage import ReplayStorage, SampledBatch
from learner.ray_actor import remote_learner_actor_class
from rollout_workers.ray_actor import remote_weights_board_class
from td3drive.bench.synthetic import SyntheticEpisode
from td3drive.contracts import metric_names as M
from td3drive.contracts.codec import Chunk, compress, encode
from td3drive.contracts.config import LearnerConfig, ReplayConfig, RunConfig, TD3DriveConfig
from tests.conftest import random_batch

CHUNK = 16
BATCH = 16
ALPHA, BETA, EPS = 0.6, 0.4, 1e-6


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def chunks(count: int, first_episode: int = 0) -> list[Chunk]:
    out = []
    for episode in range(first_episode, first_episode + count):
        rng = np.random.default_rng(episode)
        transitions = SyntheticEpisode(rng, episode, CHUNK, "truncated", 0).transitions()
        out.append(Chunk.from_transitions(transitions))
    return out


def replay_config(**overrides: object) -> ReplayConfig:
    fields = {
        "num_shards": 2,
        "chunk_steps": CHUNK,
        "min_size_to_sample": 2 * CHUNK,
        "replay_ratio": None,
        "rate_limit_timeout_s": 60,
        "prioritized": True,
        "priority_alpha": ALPHA,
        "priority_beta": BETA,
        "priority_eps": EPS,
        **overrides,
    }
    return ReplayConfig(**fields)


def filled_shards(config: ReplayConfig, chunks_per_shard: int) -> list:
    shard_class = remote_shard_class(num_cpus=0)
    shards = [shard_class.remote(config, BATCH, index) for index in range(2)]
    for index, shard in enumerate(shards):
        data = chunks(chunks_per_shard, first_episode=100 * index)
        ray.get([shard.insert.remote(encode(c)) for c in data], timeout=60)
    return shards


# ----------------------------------------------------- weights joined over shards
def _storage(steps_per_chunk_errors: list[float], seed: int) -> ReplayStorage:
    storage = ReplayStorage(
        10**4, 10**9, prioritized=True, priority_alpha=1.0, priority_beta=0.5, seed=seed
    )
    for chunk in chunks(len(steps_per_chunk_errors), first_episode=seed):
        storage.insert(compress(chunk))
    ids = np.arange(storage.oldest_id, storage.next_id)
    errors = np.repeat(steps_per_chunk_errors, CHUNK) + 0.1 * (ids % CHUNK)
    storage.update_priorities(ids, errors)
    return storage


def test_concatenate_puts_importance_weights_of_all_shards_on_one_scale() -> None:
    # Shard sizes 64 and 32, very different priority spreads: each shard's own
    # normalisation (its max weight = 1) is not the joint one.
    storages = [_storage([1.0, 2.0, 30.0, 4.0], seed=1), _storage([5.0, 5.0], seed=2)]
    parts = [storages[0].sample(20), storages[1].sample(10)]
    joined = concatenate(parts)

    # Global probability of a draw: (N_s / N) P_s(i); w = (N q)^-β / max over all live.
    raw, worst = [], []
    for storage, part in zip(storages, parts, strict=True):
        priorities = storage.priorities_of_live()
        assert priorities is not None
        probability = priorities / priorities.sum()
        raw.append((storage.size * probability[part.ids - storage.oldest_id]) ** -0.5)
        worst.append((storage.size * probability.min()) ** -0.5)
        assert part.batch.weight is not None and part.weight_scale is not None
        np.testing.assert_allclose(part.batch.weight * part.weight_scale, raw[-1], rtol=1e-5)
    expected = np.concatenate(raw) / max(worst)
    assert joined.batch.weight is not None and joined.batch.weight.dtype == np.float32
    np.testing.assert_allclose(joined.batch.weight, expected, rtol=1e-5)
    assert joined.weight_scale == pytest.approx(max(worst))
    assert concatenate(parts[:1]) is parts[0]  # one shard: its own weights, untouched


def test_concatenate_refuses_to_join_prioritized_and_uniform_samples() -> None:
    prioritized = _storage([1.0, 2.0], seed=1).sample(4)
    uniform = ReplayStorage(10**4, 10**9)
    uniform.insert(compress(chunks(1)[0]))
    with pytest.raises(ValueError, match="prioritized and uniform"):
        concatenate([prioritized, uniform.sample(4)])


# ------------------------------------------------ routing, bounds, stale ids
class _HeldShard:
    """A shard stand-in whose priority updates wait until released."""

    def __init__(self) -> None:
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.received = 0

    def update_priorities(self, ids: np.ndarray, td_errors: np.ndarray) -> int:
        with self._lock:
            self.received += 1
        self._released.wait(60)
        return len(ids)

    def release(self) -> None:
        self._released.set()

    def calls(self) -> int:
        return self.received


# Threaded, so release() runs while an update waits (Ray's stubs omit max_concurrency).
HeldShard = ray.remote(num_cpus=0, max_concurrency=4)(_HeldShard)  # type: ignore[call-overload]


def _sample(size: int, shard_index: np.ndarray) -> ShardedSample:
    sampled = SampledBatch(
        batch=random_batch(size), ids=np.arange(size), policy_versions=np.zeros(size, np.int64)
    )
    return ShardedSample(sampled=sampled, shard_index=shard_index)


def test_priority_updates_in_flight_are_bounded_and_bad_errors_never_sent(
    ray_instance: None,
) -> None:
    held = HeldShard.remote()
    # The held shard answers nothing until release(), so the wait below can only
    # time out: 0.5 s is how long the test spends on it, not a race with work.
    sampler = ReplaySampler([held], 4, timeout_s=0.5, max_priority_batches_in_flight=1)
    sample = _sample(4, np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="NaN"):
        sampler.update_priorities(sample, np.array([1.0, np.nan, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        sampler.update_priorities(sample, np.ones(3))
    assert sampler.priority_batches == 0

    sampler.update_priorities(sample, np.ones(4))  # sent, not awaited
    assert sampler.priority_batches_in_flight == 1
    # The shard holds the first update: the second waits for it, then gives up
    # without sending anything.
    with pytest.raises(TimeoutError, match="priority updates"):
        sampler.update_priorities(sample, np.ones(4))
    assert sampler.priority_batches == 1 and sampler.priority_batches_in_flight == 1

    ray.get(held.release.remote())
    sampler.flush_priorities(timeout_s=60)  # the held batch settles; nothing left to wait on
    assert sampler.priority_batches_in_flight == 0
    sampler.update_priorities(sample, np.ones(4))
    sampler.flush_priorities(timeout_s=60)
    assert sampler.priority_batches_in_flight == 0
    assert sampler.priority_batches == 2 and sampler.priority_transitions_updated == 8
    # Two calls reached the shard: the NaN, misshapen and timed-out ones never did.
    assert ray.get(held.calls.remote()) == 2
    ray.kill(held)


def test_td_errors_go_to_the_shard_and_id_each_sample_came_from(ray_instance: None) -> None:
    shards = filled_shards(replay_config(), chunks_per_shard=2)
    sampler = ReplaySampler(shards, BATCH, timeout_s=60)
    try:
        sample = sampler.next()
    finally:
        sampler.close()
    ids, where = sample.sampled.ids, sample.shard_index
    assert set(np.unique(where).tolist()) == {0, 1}
    # A function of (shard, id), so repeated draws of a transition agree.
    errors = 0.05 + 0.01 * ids + 0.5 * where
    sampler.update_priorities(sample, -errors)  # the sign is ignored
    sampler.flush_priorities(timeout_s=30)
    assert sampler.priority_transitions_updated == BATCH

    for index, shard in enumerate(shards):
        priorities = ray.get(shard.priorities.remote())
        assert priorities is not None and priorities.shape == (2 * CHUNK,)
        expected = np.ones(2 * CHUNK)  # untouched: the initial max priority
        mine = where == index
        expected[ids[mine]] = (errors[mine] + EPS) ** ALPHA
        np.testing.assert_allclose(priorities, expected, rtol=1e-6)
        assert ray.get(shard.stats.remote())["stale_priority_updates"] == 0
    for shard in shards:
        ray.kill(shard)


def test_updates_of_evicted_transitions_are_skipped(ray_instance: None) -> None:
    # One shard holds two chunks; a third evicts the first (ids 0..15).
    config = replay_config(capacity_transitions=4 * CHUNK)
    shards = filled_shards(config, chunks_per_shard=2)
    sampler = ReplaySampler(shards, BATCH, timeout_s=60)
    try:
        sample = sampler.next()
    finally:
        sampler.close()
    for index, shard in enumerate(shards):
        ray.get(shard.insert.remote(encode(chunks(1, first_episode=50 + index)[0])))
    sampler.update_priorities(sample, np.ones(BATCH))
    sampler.flush_priorities(timeout_s=30)

    evicted = int((sample.sampled.ids < CHUNK).sum())
    assert sampler.priority_transitions_updated == BATCH - evicted
    stats = ray.get([shard.stats.remote() for shard in shards])
    assert sum(s["stale_priority_updates"] for s in stats) == evicted
    for shard in shards:
        priorities = ray.get(shard.priorities.remote())
        assert priorities is not None and priorities.shape == (2 * CHUNK,)
        ray.kill(shard)


# ------------------------------------------------------------ the learner actor
def small_learner_config(replay: ReplayConfig) -> TD3DriveConfig:
    """A CPU learner with small networks over ``replay``."""
    return TD3DriveConfig(
        learner=LearnerConfig(
            device="cpu",
            features_dim=32,
            actor_hidden=(32,),
            critic_hidden=(32,),
            batch_size=BATCH,
            random_shift_pad=0,
        ),
        replay=replay,
        run=RunConfig(publish_every_updates=100),
    )


@pytest.mark.parametrize("transport", ["decoded", "compressed"])
def test_sample_transport_and_decode_threads_reach_the_learner_and_shards(
    ray_instance: None, transport: str
) -> None:
    config = small_learner_config(
        replay_config(sample_transport=transport, sample_decode_threads=2)
    )
    shards = filled_shards(config.replay, chunks_per_shard=2)
    board = remote_weights_board_class().remote()
    learner = remote_learner_actor_class(num_cpus=1).remote(config, shards, board)
    settings = ray.get(learner.sampler_settings.remote(), timeout=300)
    assert settings == {"transport": transport, "decode_threads": 2, "prefetch": 2}
    # The shards decode only when they send decoded samples.
    want_shard_threads = 2 if transport == "decoded" else 1
    assert [ray.get(s.stats.remote())["decode_threads"] for s in shards] == [want_shard_threads] * 2
    stats = ray.get(learner.train.remote(3), timeout=300)
    assert stats["done"] == 3
    sampled = [ray.get(s.stats.remote())["sampled_transitions"] for s in shards]
    assert sum(sampled) >= 3 * BATCH
    ray.get(learner.close.remote())
    for actor in (learner, board, *shards):
        ray.kill(actor)


@pytest.mark.parametrize("prioritized", [True, False])
def test_learner_actor_moves_the_priorities_of_both_shards(
    ray_instance: None, prioritized: bool
) -> None:
    config = small_learner_config(replay_config(prioritized=prioritized))
    shards = filled_shards(config.replay, chunks_per_shard=2)
    board = remote_weights_board_class().remote()
    learner = remote_learner_actor_class(num_cpus=1).remote(config, shards, board)
    updates = 5
    stats = ray.get(learner.train.remote(updates), timeout=300)
    assert stats["done"] == updates

    if not prioritized:
        assert stats["priority_updates"] == 0 and M.PRIORITY_UPDATES not in stats["metrics"]
        assert ray.get([s.priorities.remote() for s in shards]) == [None, None]
    else:
        assert stats["priority_updates"] == updates
        assert stats["metrics"][M.PRIORITY_UPDATES] == float(updates)
        # train() waits for the shards' acknowledgements; nothing was evicted.
        assert stats["priority_transitions_updated"] == updates * BATCH
        assert stats["priority_transitions_lost"] == 0
        for shard in shards:
            priorities = ray.get(shard.priorities.remote())
            assert priorities is not None and np.isfinite(priorities).all()
            moved = priorities != 1.0  # every transition was inserted at max priority 1
            assert moved.any(), "no priority of this shard moved"
            assert ray.get(shard.stats.remote())["stale_priority_updates"] == 0
    ray.get(learner.close.remote())
    for actor in (learner, board, *shards):
        ray.kill(actor)
