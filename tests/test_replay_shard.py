"""A replay shard in-process: bad payloads, the rate limiter, snapshots, and
the sample path (the legacy batch, decoding outside the lock)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import buffer_service.snapshot as snapshot_module
from buffer_service.rate_limiter import RateLimiter, RateLimiterTimeout
from buffer_service.shard import ReplayShard
from buffer_service.snapshot import read_latest
from buffer_service.storage import SampledBatch
from td3drive.bench.synthetic import SyntheticEpisode, chunked
from td3drive.contracts.codec import Chunk, CodecError, CompressedChunk, compress, encode, pack
from td3drive.contracts.config import ReplayConfig
from tests.conftest import wait_until

CHUNK = 16


def payloads(count: int, seed: int = 0, steps: int = CHUNK) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for episode in range(count):
        transitions = SyntheticEpisode(rng, episode, steps, "truncated", episode).transitions()
        out += [encode(c) for c in chunked(transitions, CHUNK)]
    return out


def make_shard(
    tmp_path: Path | None = None, restarted: bool = False, **overrides: object
) -> ReplayShard:
    fields: dict[str, object] = {
        "num_shards": 1,
        "chunk_steps": CHUNK,
        "min_size_to_sample": CHUNK,
        "replay_ratio": None,
        "rate_limit_timeout_s": 60.0,  # reached only by a real hang
        **overrides,
    }
    config = ReplayConfig(**fields)
    return ReplayShard(config, batch_size=8, snapshot_dir=tmp_path, restarted=restarted)


def contents(shard: ReplayShard) -> list[bytes]:
    return [pack(chunk) for _, chunk in shard._storage.chunks()]


# ------------------------------------------------------------ bad payloads
def test_bad_payloads_are_rejected_and_change_nothing() -> None:
    shard = make_shard()
    good = payloads(3)
    for payload in good[:2]:
        shard.insert(payload)
    before, size = contents(shard), shard.size()
    rng = np.random.default_rng(0)
    bad = [good[2][: len(good[2]) // 2], b"", b"TD3C" + bytes(40)]
    for _ in range(50):
        flipped = bytearray(good[2])
        flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        bad.append(bytes(flipped))
    bad.append(payloads(1, steps=CHUNK * 2, seed=9)[0][:-1])
    for payload in bad:
        with pytest.raises(CodecError):
            shard.insert(payload)
    assert shard.size() == size
    assert contents(shard) == before
    assert shard.stats()["rejected_payloads"] == len(bad)
    shard.insert(good[2])  # and the shard still works
    assert shard.size() == size + CHUNK


def test_chunk_longer_than_configured_is_rejected() -> None:
    shard = make_shard(chunk_steps=8, min_size_to_sample=8)
    with pytest.raises(CodecError, match="chunk_steps"):
        shard.insert(payloads(1)[0])
    assert shard.size() == 0


# ------------------------------------------------------------ rate limiter
def test_tolerance_too_small_to_be_deadlock_free_is_refused() -> None:
    with pytest.raises(ValueError, match="block each other"):
        RateLimiter(min_size_to_sample=10, ratio=4.0, tolerance=10, max_sample=32, max_insert=16)


def test_learner_waits_while_ahead_and_resumes_after_inserts() -> None:
    shard = make_shard(replay_ratio=1.0, replay_ratio_tolerance=16.0, min_size_to_sample=CHUNK)
    data = payloads(6)
    got: list[int] = []

    def learner() -> None:
        for _ in range(8):  # 8 x 8 = 64 sampled; needs ~48 + 16 inserted beyond min size
            got.append(shard.sample(8).ids.shape[0])

    thread = threading.Thread(target=learner)
    thread.start()
    wait_until(lambda: shard.stats()["waiting_samples"] == 1, "the learner to wait")
    assert got == []  # nothing inserted yet: the learner waits
    for payload in data[:2]:
        shard.insert(payload)
    # ratio 1: sampled <= (inserted - min) + tolerance = (32 - 16) + 16 = 32, so
    # the learner takes 4 samples and then waits again
    wait_until(lambda: len(got) == 4 and shard.stats()["waiting_samples"] == 1, "4 samples")
    assert len(got) == 4
    for payload in data[2:]:
        shard.insert(payload)
    thread.join(timeout=60)
    assert not thread.is_alive() and len(got) == 8
    stats = shard.stats()
    assert stats["sample_wait_s_total"] > 0 and stats["waiting_samples"] == 0
    assert stats["rate_limiter_sampled"] <= (stats["rate_limiter_inserted"] - CHUNK) + 16


def test_workers_wait_while_ahead_and_resume_after_samples() -> None:
    shard = make_shard(replay_ratio=1.0, replay_ratio_tolerance=16.0, min_size_to_sample=CHUNK)
    data = payloads(6)
    shard.insert(data[0])  # reaches min size
    shard.insert(data[1])  # debt 16 = tolerance: the next insert must wait
    done = threading.Event()

    def worker() -> None:
        shard.insert(data[2])
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    wait_until(lambda: shard.stats()["waiting_inserts"] == 1, "the insert to wait")
    assert not done.is_set(), "insert should wait for the learner"
    assert shard.size() == 2 * CHUNK
    shard.sample(8)
    shard.sample(8)  # debt back to 0: room for one chunk
    assert done.wait(60)
    thread.join()
    assert shard.size() == 3 * CHUNK
    stats = shard.stats()
    assert stats["insert_wait_s_total"] > 0 and stats["waiting_inserts"] == 0


def test_a_blocked_call_times_out_instead_of_hanging() -> None:
    shard = make_shard(rate_limit_timeout_s=0.3, min_size_to_sample=CHUNK)
    outcome: list[BaseException] = []

    def learner() -> None:
        try:
            shard.sample(8)
        except BaseException as exc:  # recorded for the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=learner)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "sample hung"
    assert len(outcome) == 1 and isinstance(outcome[0], RateLimiterTimeout)
    assert "sample waited" in str(outcome[0]) and "inserted=0" in str(outcome[0])
    assert shard.stats()["sample_timeouts"] == 1


# ------------------------------------------------------------ snapshots
def test_snapshot_round_trip_restores_chunks_counters_and_limiter(tmp_path: Path) -> None:
    shard = make_shard(tmp_path, replay_ratio=2.0, replay_ratio_tolerance=500.0, prioritized=True)
    for payload in payloads(4):
        shard.insert(payload)
    sampled = shard.sample(8)
    shard.update_priorities(sampled.ids, np.arange(8.0))
    shard.save()
    before_stats = shard.stats()

    restored = make_shard(
        tmp_path, replay_ratio=2.0, replay_ratio_tolerance=500.0, prioritized=True
    )
    assert restored.restored_from is not None
    assert contents(restored) == contents(shard)
    after = restored.stats()
    for key in (
        "size",
        "inserted_transitions",
        "sampled_transitions",
        "rate_limiter_inserted",
        "rate_limiter_sampled",
        "policy_version",
    ):
        assert after[key] == before_stats[key], key
    assert after["policy_version"] == 3
    np.testing.assert_array_equal(
        restored._storage.priorities_of_live(), shard._storage.priorities_of_live()
    )
    assert restored._storage.next_id == shard._storage.next_id


def test_crash_mid_write_leaves_the_previous_snapshot_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = make_shard(tmp_path)
    data = payloads(4)
    shard.insert(data[0])
    first = shard.save()
    shard.insert(data[1])

    calls = {"n": 0}
    real_pack = snapshot_module.pack

    def crash_after_one(chunk: object) -> bytes:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return real_pack(chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_module, "pack", crash_after_one)
    with pytest.raises(OSError, match="No space"):
        shard.save()
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [Path(first).name, Path(first).with_suffix(".done").name]
    )
    # A data file that was renamed but never got its done marker is ignored too.
    (tmp_path / "snapshot-00000099.td3r").write_bytes(b"half a snapshot")
    found = read_latest(tmp_path)
    assert found is not None and str(found[0]) == first
    restored = make_shard(tmp_path)
    assert restored.size() == CHUNK
    assert contents(restored) == contents(shard)[:1]


def test_only_the_newest_snapshot_is_kept(tmp_path: Path) -> None:
    shard = make_shard(tmp_path)
    for payload in payloads(3):
        shard.insert(payload)
        shard.save()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["snapshot-00000003.done", "snapshot-00000003.td3r"]
    assert shard.stats()["snapshots_written"] == 3


def test_concurrent_inserts_and_samples_never_see_partial_or_evicted_data() -> None:
    # Small capacity so eviction runs constantly while a sampler thread reads.
    shard = make_shard(capacity_transitions=3 * CHUNK, min_size_to_sample=CHUNK)
    data = payloads(30)
    errors: list[BaseException] = []
    stop = threading.Event()
    seen_versions: set[int] = set()

    def learner() -> None:
        try:
            while not stop.is_set():
                sampled = shard.sample(8)
                sampled.batch.validate()
                # Every row must be internally consistent: next_obs frames slide.
                np.testing.assert_array_equal(
                    sampled.batch.obs_image[:, 1:], sampled.batch.next_obs_image[:, :-1]
                )
                seen_versions.update(sampled.policy_versions.tolist())
        except BaseException as exc:  # reported below
            errors.append(exc)

    shard.insert(data[0])
    thread = threading.Thread(target=learner)
    thread.start()
    for payload in data[1:]:
        shard.insert(payload)
        assert shard.size() <= 3 * CHUNK
    stop.set()
    thread.join(timeout=60)
    assert not errors, errors
    assert seen_versions <= set(range(30))
    assert shard.stats()["evicted_chunks"] == 27


def test_releasing_the_rate_limit_wakes_a_blocked_insert() -> None:
    shard = make_shard(replay_ratio=1.0, replay_ratio_tolerance=16.0, min_size_to_sample=CHUNK)
    data = payloads(3)
    shard.insert(data[0])
    shard.insert(data[1])  # the next insert must wait for samples...
    done = threading.Event()

    def worker() -> None:
        shard.insert(data[2])
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    wait_until(lambda: shard.stats()["waiting_inserts"] == 1, "the insert to wait")
    assert not done.is_set()
    shard.release_rate_limit()  # ...unless collection is over
    assert done.wait(60)
    thread.join()
    assert shard.size() == 3 * CHUNK


# ------------------------------------------------------------ bad input and counting
@pytest.mark.parametrize(
    "payload",
    ["a str", None, 7, np.zeros((4, 100), np.uint8)[:, ::3]],
    ids=["str", "None", "int", "strided_array"],
)
def test_a_payload_that_is_not_bytes_is_rejected_and_counted(payload: object) -> None:
    shard = make_shard()
    with pytest.raises(CodecError, match="payload"):
        shard.insert(payload)  # type: ignore[arg-type]
    assert shard.stats()["rejected_payloads"] == 1 and shard.size() == 0
    shard.insert(payloads(1)[0])  # and the shard still works
    assert shard.size() == CHUNK


def test_a_chunk_with_rewards_beyond_the_codec_limit_is_rejected_and_counted() -> None:
    shard = make_shard(n_step=3)
    rng = np.random.default_rng(1)
    transitions = SyntheticEpisode(rng, 0, CHUNK, "truncated", 0).transitions()
    chunk = dataclasses.replace(
        Chunk.from_transitions(transitions),
        rewards=np.full(CHUNK, np.finfo(np.float32).max, np.float32),
    )
    with pytest.raises(CodecError, match="MAX_ABS_REWARD"):
        shard.insert(pack(compress_unchecked(chunk)))
    assert shard.stats()["rejected_payloads"] == 1 and shard.size() == 0


def compress_unchecked(chunk: Chunk) -> CompressedChunk:
    """``compress`` without its validation: what a buggy or hostile worker could send."""
    valid = compress(dataclasses.replace(chunk, rewards=np.zeros_like(chunk.rewards)))
    return dataclasses.replace(valid, rewards=chunk.rewards)


STATS_KEYS = {
    "shard",
    "pid",
    "decode_threads",
    "size",
    "chunks",
    "bytes_held",
    "bytes_per_transition",
    "compression_ratio",
    "capacity_transitions",
    "capacity_bytes",
    "inserted_transitions",
    "inserted_chunks",
    "sampled_transitions",
    "evicted_chunks",
    "evicted_transitions",
    "stale_priority_updates",
    "rejected_payloads",
    "insert_wait_s_total",
    "sample_wait_s_total",
    "insert_timeouts",
    "sample_timeouts",
    "snapshots_written",
    "restarts",
    "waiting_inserts",
    "waiting_samples",
    "restarted",
    "rate_limiter_inserted",
    "rate_limiter_sampled",
    "rate_limiter_debt",
    "policy_version",
    "restored_from",
}


def test_stats_has_exactly_the_documented_keys() -> None:
    # The driver and the Prometheus exporter read these; ReplayShard.stats documents them.
    stats = make_shard().stats()
    assert set(stats) == STATS_KEYS
    documented = ReplayShard.stats.__doc__ or ""
    assert all(f"``{key}``" in documented for key in STATS_KEYS), [
        key for key in STATS_KEYS if f"``{key}``" not in documented
    ]
    json.dumps(stats)  # JSON-able, for summary.json


def test_inserted_transitions_are_cumulative_over_restores(tmp_path: Path) -> None:
    shard = make_shard(tmp_path)
    data = payloads(5)
    for payload in data[:2]:
        shard.insert(payload)
    shard.save()
    shard.insert(data[2])  # acknowledged, then lost with the process: never snapshotted
    restored = make_shard(tmp_path, restarted=True)
    assert restored.stats()["inserted_transitions"] == 2 * CHUNK
    for payload in data[3:]:
        restored.insert(payload)
    stats = restored.stats()
    assert stats["inserted_transitions"] == 4 * CHUNK and stats["size"] == 4 * CHUNK
    # What the driver computes: pushed - rejected - inserted = the chunk the crash lost.
    assert 5 * CHUNK - 0 - stats["inserted_transitions"] == CHUNK


def test_restarts_are_counted_even_between_snapshots(tmp_path: Path) -> None:
    first = make_shard(tmp_path)
    first.insert(payloads(1)[0])
    first.save()
    assert first.stats()["restarts"] == 0 and first.stats()["restarted"] is False
    # Ray restarts the shard twice before it writes another snapshot: the
    # snapshot still says 0 restarts, restarts.json says how many there were.
    second = make_shard(tmp_path, restarted=True)
    assert second.stats()["restarts"] == 1 and second.stats()["restarted"] is True
    third = make_shard(tmp_path, restarted=True)
    assert third.stats()["restarts"] == 2
    third.save()  # the count also goes into the snapshot
    fourth = make_shard(tmp_path, restarted=True)
    assert fourth.stats()["restarts"] == 3 and fourth.stats()["size"] == CHUNK
    # A shard started afresh on the same directory (a resumed run) keeps the count.
    assert make_shard(tmp_path).stats()["restarts"] == 3
    # Without a snapshot directory only this restart is known.
    assert make_shard(None, restarted=True).stats()["restarts"] == 1


# ------------------------------------------------------------ the sample path
@pytest.mark.parametrize("decode_threads", [1, 2])
def test_sample_returns_exactly_the_legacy_batch(decode_threads: int) -> None:
    legacy = make_shard(n_step=3)
    ours = ReplayShard(legacy.config, batch_size=8, decode_threads=decode_threads)
    for payload in payloads(6):
        legacy.insert(payload)
        ours.insert(payload)
    for _ in range(3):
        want, got = legacy._sample_legacy(8), ours.sample(8)
        assert got.shard_size == want.shard_size == 6 * CHUNK
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.policy_versions, want.policy_versions)
        for name, value in want.batch.arrays().items():
            np.testing.assert_array_equal(getattr(got.batch, name), value, err_msg=name)
    assert ours.stats()["rate_limiter_sampled"] == legacy.stats()["rate_limiter_sampled"] == 24


def test_decode_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="decode_threads"):
        ReplayShard(make_shard().config, batch_size=8, decode_threads=0)


def test_inserts_and_size_queries_proceed_while_a_sample_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sample decodes outside the shard's lock: hold its decoding and
    # insert meanwhile. Under the legacy path the insert waited for the
    # whole batch's decoding.
    import buffer_service.storage as storage_module

    shard = make_shard()
    data = payloads(3)
    shard.insert(data[0])
    decoding, release = threading.Event(), threading.Event()
    real = storage_module.decompress_frames

    def held(*args: object, **kwargs: object) -> object:
        decoding.set()
        assert release.wait(60), "the test never released the decoder"
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(storage_module, "decompress_frames", held)
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(shard.sample(8)))
    thread.start()
    try:
        assert decoding.wait(60), "the sample never started decoding"
        shard.insert(data[1])  # would hang here if the sample held the lock
        assert shard.size() == 2 * CHUNK
        assert shard.stats()["sampled_transitions"] == 8  # counted when the ids were drawn
    finally:
        release.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and len(result) == 1
    sampled = result[0]
    assert isinstance(sampled, SampledBatch)
    assert sampled.shard_size == CHUNK  # the size when its ids were drawn
    assert sampled.ids.max() < CHUNK
    sampled.batch.validate()


def test_a_compressed_sample_is_the_batch_sample_would_have_returned() -> None:
    ours, twin = make_shard(), make_shard()
    for payload in payloads(4):
        ours.insert(payload)
        twin.insert(payload)
    want = twin.sample(8)
    got = ours.sample_compressed(8).decode()
    np.testing.assert_array_equal(got.ids, want.ids)
    for name, value in want.batch.arrays().items():
        np.testing.assert_array_equal(getattr(got.batch, name), value, err_msg=name)
    assert ours.stats()["sampled_transitions"] == 8
