"""Replay storage: stacks and n-step targets against a naive reference,
eviction, capacity, prioritized sampling; the gather sample path against the
legacy per-row loop."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import buffer_service.storage as storage_module
import td3drive.contracts.codec as codec_module
from buffer_service.storage import CapacityError, ReplayStorage, SampledBatch, nstep_targets
from td3drive.bench.synthetic import SyntheticEpisode, chunked
from td3drive.contracts.codec import MAX_ABS_REWARD, Chunk, compress
from td3drive.contracts.spec import Transition

GAMMA = 0.9


def episodes(seed: int = 0) -> list[list[Transition]]:
    """Episodes ending every way: terminated, truncated, and cut without a flag."""
    rng = np.random.default_rng(seed)
    plan = [(37, "terminated"), (21, "truncated"), (16, None), (5, "terminated"), (1, "truncated")]
    return [
        SyntheticEpisode(rng, episode_id=i, length=n, end=end, policy_version=100 + i).transitions()
        for i, (n, end) in enumerate(plan)
    ]


def naive_reference(
    eps: list[list[Transition]], chunk_steps: int, n: int, gamma: float
) -> list[dict[str, object]]:
    """Every transition's expected sample, computed step by step from the
    uncompressed transitions (the n-step window stops at the chunk's end and
    at a terminal)."""
    out = []
    for transitions in eps:
        for start in range(0, len(transitions), chunk_steps):
            chunk = transitions[start : start + chunk_steps]
            for t, step in enumerate(chunk):
                k = min(n, len(chunk) - t)
                reward = 0.0
                discount = 1.0
                terminal = False
                for j in range(k):
                    reward += discount * chunk[t + j].reward
                    discount *= gamma
                    terminal = chunk[t + j].terminated
                out.append(
                    {
                        "obs": step.obs,
                        "action": step.action,
                        "reward": reward,
                        "discount": 0.0 if terminal else discount,
                        "next_obs": chunk[t + k - 1].next_obs,
                        "version": step.policy_version,
                    }
                )
    return out


@pytest.mark.parametrize("n_step", [1, 3])
def test_samples_equal_the_naive_reference(n_step: int) -> None:
    eps = episodes()
    chunk_steps = 8
    storage = ReplayStorage(10_000, 10**9, n_step=n_step, gamma=GAMMA, seed=1)
    for transitions in eps:
        for chunk in chunked(transitions, chunk_steps):
            storage.insert(compress(chunk))
    reference = naive_reference(eps, chunk_steps, n_step, GAMMA)
    assert storage.size == len(reference) == 80

    sampled = storage.sample(400)
    batch = sampled.batch.validate()
    assert len(set(sampled.ids.tolist())) > 60  # covers most transitions
    for row, transition_id in enumerate(sampled.ids.tolist()):
        want = reference[transition_id]
        obs, next_obs = want["obs"], want["next_obs"]
        assert isinstance(obs, dict) and isinstance(next_obs, dict)
        np.testing.assert_array_equal(batch.obs_image[row], obs["image"])
        np.testing.assert_array_equal(batch.obs_vector[row], obs["vector"])
        np.testing.assert_array_equal(batch.next_obs_image[row], next_obs["image"])
        np.testing.assert_array_equal(batch.next_obs_vector[row], next_obs["vector"])
        np.testing.assert_array_equal(batch.action[row], want["action"])
        assert batch.reward[row] == pytest.approx(want["reward"], rel=1e-5, abs=1e-6)
        assert batch.discount[row] == pytest.approx(want["discount"], rel=1e-6)
        assert sampled.policy_versions[row] == want["version"]


def test_nstep_by_hand() -> None:
    rewards = np.array([1, 2, 3, 4], np.float32)
    reward, discount, k = nstep_targets(rewards, terminated_at_end=True, n=3, gamma=0.5)
    np.testing.assert_allclose(reward, [1 + 1 + 0.75, 2 + 1.5 + 1, 3 + 2, 4])
    np.testing.assert_allclose(discount, [0.125, 0, 0, 0])  # terminal inside the window
    np.testing.assert_array_equal(k, [3, 3, 2, 1])
    # Truncated (or cut): the same returns, but they bootstrap.
    reward, discount, _ = nstep_targets(rewards, terminated_at_end=False, n=3, gamma=0.5)
    np.testing.assert_allclose(reward, [2.75, 4.5, 5, 4])
    np.testing.assert_allclose(discount, [0.125, 0.125, 0.25, 0.5])
    # n = 1 is the one-step target.
    reward, discount, _ = nstep_targets(rewards, terminated_at_end=True, n=1, gamma=0.5)
    np.testing.assert_allclose(reward, rewards)
    np.testing.assert_allclose(discount, [0.5, 0.5, 0.5, 0])


def test_nstep_returns_of_extreme_finite_rewards_never_overflow_float32() -> None:
    # Three rewards near float32's maximum: their float32 sum is inf, and an
    # inf reward in a batch poisons the critic. The codec refuses such rewards
    # (test_codec), so only a chunk that bypassed it can carry them; the
    # storage still keeps the return finite.
    big = np.finfo(np.float32).max
    rewards = np.array([big, big, big, -big, -big, -big, 1.0], np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(rewards[:3].sum(dtype=np.float32))  # the overflow this guards against
    reward, discount, _ = nstep_targets(rewards, terminated_at_end=False, n=3, gamma=0.99)
    assert np.isfinite(reward).all() and reward.dtype == np.float32
    assert reward[0] == big and reward[3] == -big  # clipped at float32's range
    assert np.isfinite(discount).all()


def test_nstep_returns_at_the_codec_reward_limit_are_exact() -> None:
    limit = MAX_ABS_REWARD
    rewards = np.array([limit, limit, -limit, limit], np.float32)
    reward, _, _ = nstep_targets(rewards, terminated_at_end=True, n=3, gamma=0.5)
    np.testing.assert_allclose(reward, np.array([1.25, 0.75, -0.5, 1.0]) * limit)


def test_a_chunk_of_extreme_rewards_samples_finite_returns() -> None:
    # Through the storage's insert and sample, with n = 3, as a shard does.
    rng = np.random.default_rng(5)
    chunk = Chunk.from_transitions(SyntheticEpisode(rng, 0, 8, "truncated").transitions())
    extreme = np.full(8, np.finfo(np.float32).max, np.float32)
    compressed = dataclasses.replace(compress(chunk), rewards=extreme)
    storage = ReplayStorage(100, 10**9, n_step=3, gamma=0.99, seed=0)
    storage.insert(compressed)
    batch = storage.sample(64).batch
    assert np.isfinite(batch.reward).all()
    batch.validate()


def test_terminated_sample_does_not_bootstrap_truncated_does() -> None:
    rng = np.random.default_rng(3)
    storage = ReplayStorage(100, 10**9, n_step=1, gamma=GAMMA)
    ended = SyntheticEpisode(rng, 0, 1, "terminated").transitions()
    cut = SyntheticEpisode(rng, 1, 1, "truncated").transitions()
    storage.insert(compress(Chunk.from_transitions(ended)))
    storage.insert(compress(Chunk.from_transitions(cut)))
    sampled = storage.sample(64)
    discounts = {int(i): float(d) for i, d in zip(sampled.ids, sampled.batch.discount, strict=True)}
    assert discounts == {0: 0.0, 1: pytest.approx(GAMMA)}


def test_eviction_keeps_bytes_within_capacity_and_samples_only_live_data() -> None:
    rng = np.random.default_rng(4)
    first = compress(next(chunked(SyntheticEpisode(rng, 0, 16, None).transitions(), 16)))
    capacity_bytes = 3 * (first.nbytes + 2000)
    storage = ReplayStorage(10_000, capacity_bytes, seed=2)
    for episode in range(20):
        transitions = SyntheticEpisode(rng, episode, 16, None, policy_version=episode).transitions()
        evicted = storage.insert(compress(Chunk.from_transitions(transitions)))
        assert storage.bytes_held <= capacity_bytes
        assert evicted <= 1
        live_versions = {int(chunk.versions[0]) for _, chunk in storage.chunks()}
        sampled = storage.sample(32)
        assert set(sampled.policy_versions.tolist()) <= live_versions
        assert sampled.ids.min() >= storage.oldest_id
        assert sampled.ids.max() < storage.next_id
    assert storage.counters["evicted_chunks"] == 20 - len(storage.chunks())
    assert storage.size == 16 * len(storage.chunks())
    # Held bytes are what the chunks take, not a constant.
    assert storage.stats()["bytes_per_transition"] > 0


def test_transition_capacity_evicts_whole_chunks_fifo() -> None:
    rng = np.random.default_rng(5)
    storage = ReplayStorage(40, 10**9)
    for episode in range(6):
        storage.insert(
            compress(Chunk.from_transitions(SyntheticEpisode(rng, episode, 16, None).transitions()))
        )
        assert storage.size <= 40
    assert [chunk.episode_id for _, chunk in storage.chunks()] == [4, 5]
    assert storage.oldest_id == 64 and storage.next_id == 96


def test_chunk_larger_than_capacity_is_refused_and_changes_nothing() -> None:
    rng = np.random.default_rng(6)
    storage = ReplayStorage(8, 10**9)
    chunk = compress(Chunk.from_transitions(SyntheticEpisode(rng, 0, 9, None).transitions()))
    with pytest.raises(CapacityError, match="exceeds"):
        storage.insert(chunk)
    assert storage.size == 0 and storage.next_id == 0


def test_empty_storage_cannot_sample() -> None:
    with pytest.raises(ValueError, match="empty"):
        ReplayStorage(10, 10**6).sample(1)


# ------------------------------------------------------------ prioritized
def _filled(prioritized: bool, episodes_: int = 4, seed: int = 7) -> ReplayStorage:
    rng = np.random.default_rng(seed)
    storage = ReplayStorage(
        64, 10**9, prioritized=prioritized, priority_alpha=1.0, priority_beta=0.5
    )
    for episode in range(episodes_):
        transitions = SyntheticEpisode(rng, episode, 16, None).transitions()
        storage.insert(compress(Chunk.from_transitions(transitions)))
    return storage


def test_prioritized_sampling_follows_priorities_and_weights() -> None:
    storage = _filled(prioritized=True)
    ids = np.arange(storage.oldest_id, storage.next_id)
    errors = np.full(ids.shape, 1.0)
    errors[ids == 10] = 63.0  # p = |e| + eps with alpha 1: id 10 has half the total mass
    assert storage.update_priorities(ids, errors) == 64
    sampled = storage.sample(4000)
    share = float((sampled.ids == 10).mean())
    assert share == pytest.approx(63 / (63 + 63), abs=0.03)
    weight = sampled.batch.weight
    assert weight is not None and weight.max() == pytest.approx(1.0)
    # w = (P / P_min)^-beta: the heavy transition has weight (63)^-0.5.
    assert float(weight[sampled.ids == 10][0]) == pytest.approx(63**-0.5, rel=1e-4)


def test_new_transitions_get_the_max_priority_and_stale_updates_are_counted() -> None:
    storage = _filled(prioritized=True)
    storage.update_priorities(np.array([0]), np.array([9.0]))
    rng = np.random.default_rng(8)
    for episode in range(4, 8):  # evicts ids 0..63
        transitions = SyntheticEpisode(rng, episode, 16, None).transitions()
        storage.insert(compress(Chunk.from_transitions(transitions)))
    live = storage.priorities_of_live()
    assert live is not None and np.allclose(live, 9.0 + 1e-6)
    assert storage.update_priorities(np.array([3, 70]), np.array([1.0, 1.0])) == 1
    assert storage.counters["stale_priority_updates"] == 1
    with pytest.raises(ValueError, match="NaN"):
        storage.update_priorities(np.array([70]), np.array([np.nan]))


def test_uniform_storage_refuses_priority_updates() -> None:
    with pytest.raises(ValueError, match="prioritized"):
        _filled(prioritized=False).update_priorities(np.array([0]), np.array([1.0]))


# ------------------------------------------------------------ the gather sample path
def _twin(n_step: int, prioritized: bool, capacity: int = 120) -> ReplayStorage:
    """A storage holding episodes of every length and end, the oldest evicted
    (ids start past 0, partial chunks); prioritized ones re-prioritised."""
    storage = ReplayStorage(
        capacity, 10**9, n_step=n_step, gamma=GAMMA, prioritized=prioritized, seed=11
    )
    for transitions in [*episodes(), *episodes(seed=1)]:
        for chunk in chunked(transitions, 8):
            storage.insert(compress(chunk))
    if prioritized:
        ids = np.arange(storage.oldest_id, storage.next_id)
        storage.update_priorities(ids, np.random.default_rng(2).random(ids.shape[0]) * 5)
    return storage


def assert_same_sample(got: SampledBatch, want: SampledBatch) -> None:
    """Every array bit for bit, with its dtype and shape, and every field."""
    for name in [f.name for f in dataclasses.fields(want.batch)]:
        a, b = getattr(got.batch, name), getattr(want.batch, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in ("ids", "policy_versions"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert got.weight_scale == want.weight_scale
    assert got.shard_size == want.shard_size


@pytest.mark.parametrize("prioritized", [False, True], ids=["uniform", "prioritized"])
@pytest.mark.parametrize("n_step", [1, 3])
def test_gather_path_returns_exactly_the_legacy_batch(n_step: int, prioritized: bool) -> None:
    legacy, ours = _twin(n_step, prioritized), _twin(n_step, prioritized)
    assert legacy.oldest_id > 0 and legacy.counters["evicted_chunks"] > 0
    for batch_size in (1, 7, 300):  # one row, a few chunks, every chunk many times
        want = legacy.sample(batch_size, method="legacy")
        got = ours.sample(batch_size)
        assert_same_sample(got, want)
        got.batch.validate()
    assert ours.counters == legacy.counters


def test_a_plan_outlives_the_eviction_of_its_chunks() -> None:
    # A shard plans under its lock and gathers after it: inserts may evict the
    # plan's chunks in between. Chunks are immutable; the plan keeps them.
    legacy, ours = _twin(3, False), _twin(3, False)
    want = legacy.sample(64, method="legacy")
    plan = ours.plan_sample(64)
    rng = np.random.default_rng(9)
    for episode in range(20):  # evicts every chunk the plan refers to
        transitions = SyntheticEpisode(rng, 100 + episode, 16, None).transitions()
        ours.insert(compress(Chunk.from_transitions(transitions)))
    assert ours.oldest_id > int(plan.ids.max())
    assert_same_sample(plan.gather(), want)


def test_gather_decodes_each_frame_once_and_on_a_pool_the_same() -> None:
    storage = _twin(1, False)
    plan = storage.plan_sample(300)
    calls: list[int] = []
    real = codec_module.decompress_frames

    def counting(chunks: object, chunk_index: np.ndarray, *args: object) -> np.ndarray:
        calls.append(int(chunk_index.shape[0]))
        return real(chunks, chunk_index, *args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage_module, "decompress_frames", counting)
        serial = plan.gather()
    # At n = 1 a row needs 5 distinct frames; many rows share chunks and frames.
    frames_held = sum(chunk.num_steps + 4 for _, chunk in storage.chunks())
    assert len(calls) == 1 and calls[0] <= min(5 * 300, frames_held)
    with ThreadPoolExecutor(3) as pool:
        assert_same_sample(plan.gather(pool, parts=3), serial)


def test_decompress_frames_matches_frame_by_frame() -> None:
    rng = np.random.default_rng(4)
    chunks = [
        compress(Chunk.from_transitions(SyntheticEpisode(rng, e, 6, None).transitions()))
        for e in range(3)
    ]
    which = np.array([2, 0, 0, 1, 2, 2])
    index = np.array([9, 0, 9, 4, 3, 0])
    want = np.stack([chunks[c].frame(i) for c, i in zip(which, index, strict=True)])
    with ThreadPoolExecutor(2) as pool:
        for got in (
            codec_module.decompress_frames(chunks, which, index),
            codec_module.decompress_frames(chunks, which, index, pool, parts=4),
        ):
            assert got.dtype == np.uint8 and got.shape == (6, 84, 84)
            np.testing.assert_array_equal(got, want)
    assert codec_module.decompress_frames(chunks, which[:0], index[:0]).shape == (0, 84, 84)
    with pytest.raises(IndexError):
        codec_module.decompress_frames(chunks, np.array([0]), np.array([10]))


def test_unknown_sample_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        _twin(1, False).sample(4, method="fast")


@pytest.mark.parametrize("prioritized", [False, True], ids=["uniform", "prioritized"])
def test_a_compressed_sample_decodes_to_the_gathered_batch(prioritized: bool) -> None:
    storage = _twin(3, prioritized)
    plan = storage.plan_sample(200)
    want = plan.gather()
    shipped = plan.compressed()
    assert_same_sample(shipped.decode(), want)
    with ThreadPoolExecutor(2) as pool:
        assert_same_sample(shipped.decode(pool, parts=2), want)
    # Each distinct frame travels once, compressed: far fewer bytes than the batch.
    raw = sum(a.nbytes for a in want.batch.arrays().values())
    assert shipped.nbytes < raw / 3
    assert shipped.frame_offsets[-1] == len(shipped.frame_data)
