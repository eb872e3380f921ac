"""``td3drive bench replay``: a shard's memory and speed against a naive buffer,
and its sample path against the original per-row one.

The memory baseline stores obs and next_obs as uint8 arrays, one row per
transition, as SB3's ``DictReplayBuffer`` does (with
``optimize_memory_usage=False``, the only mode it supports for Dict
observations), and adds transitions one at a time as SB3's ``add`` does. Both
sides are filled with the same transitions in the same run, single-threaded.

The sample-path comparison runs on one filled shard (plus an identical copy
built with a decode thread pool): batches/s of the legacy path (per-row loop,
decoding under the lock) and of the gather path (ids under the lock, each
frame decoded once outside it), with 1 and 2 threads calling ``sample`` at
once as a Ray shard's ``sample`` group does; then the insert rate of the full
shard (each insert evicts a chunk) alone and while one thread samples it as
fast as it can with each path, and with ``sample_compressed`` (what the shard
does under ``replay.sample_transport: compressed``: ids drawn under the lock,
the compressed frames joined, nothing decoded in the shard). Last, the
alternative of shipping a sample's frames compressed (each distinct frame
once) and decoding them where the batch is used: the shard's cost, the bytes
against the decoded batch's, and the receiver's decoding rate with each decode
pool size. Every figure comes from the same run and process, so their ratios
hold on the machine that ran it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from buffer_service.shard import ReplayShard
from td3drive.app.arguments import positive_int, positive_int_list
from td3drive.bench.sources import SOURCES, encode_chunks, episodes_source_for, make_transitions
from td3drive.contracts import spec
from td3drive.contracts.codec import payload_steps
from td3drive.contracts.config import ReplayConfig
from td3drive.contracts.spec import Batch, Transition

Progress = Callable[[str], None]

INSERT_SAMPLING = (None, "legacy", "gather", "compressed")
"""The ``insert_while_sampling`` rows: no sampler, then one thread sampling
flat out with ``ReplayShard._sample_legacy``, ``sample`` (the gather path) or
``sample_compressed`` (``replay.sample_transport: compressed``)."""

HELP = (
    "replay shard memory, insert and sample speed vs a naive uint8 buffer and "
    "the legacy sample path"
)
DESCRIPTION = (
    "Fills one replay shard (compressed chunks, frames stored once) and a "
    "naive buffer that stores obs and next_obs as uint8 arrays (SB3's "
    "DictReplayBuffer layout) with the same transitions, and reports "
    "bytes_per_transition, naive_bytes_per_transition, memory_ratio, "
    "insert_transitions_per_s and sample_batches_per_s for both. On the same filled "
    "shard it then compares the sample paths side by side: sample_paths lists "
    "batches/s of the legacy path (per-row loop, decoding under the shard's lock) and "
    "the gather path (each frame decoded once, outside the lock) for each number of "
    "threads sampling at once and each decode pool size, with speedup_vs_legacy; "
    "insert_while_sampling gives the insert rate of the full shard alone and while "
    "one thread samples it flat out with each path and with sample_compressed "
    "(sampling 'compressed': what a shard does under replay.sample_transport "
    "compressed, draw under the lock and join the compressed frames, no decoding), "
    "with insert_rate_vs_alone; "
    "compressed_shipping measures sending the frames compressed and decoding them at "
    "the receiver (bytes_ratio, shard_batches_per_s, receiver_decode). "
    "sample_batches_per_s is the gather path with 1 thread, "
    "legacy_sample_batches_per_s the legacy one, sample_speedup their ratio."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``td3drive bench replay``."""
    parser.add_argument(
        "--source",
        choices=SOURCES,
        default="synthetic",
        help="frames: synthetic driving-like frames, or the embedded simulator's "
        "(driven by the scripted lane follower with steering noise)",
    )
    parser.add_argument(
        "--transitions", type=positive_int, default=8192, help="transitions in each buffer"
    )
    parser.add_argument("--chunk-steps", type=positive_int, default=64, help="steps per chunk")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="sample size")
    parser.add_argument(
        "--sample-batches",
        type=positive_int,
        default=40,
        help="batches timed per sampling thread and row",
    )
    parser.add_argument(
        "--sampler-threads",
        type=positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated counts of threads calling sample at once",
    )
    parser.add_argument(
        "--decode-threads",
        type=positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated decode pool sizes of the gather path (1 = no pool)",
    )
    parser.add_argument(
        "--insert-passes",
        type=positive_int,
        default=2,
        help="times every chunk is re-inserted into the full shard per insert-rate row",
    )
    parser.add_argument(
        "--insert-time-limit-s",
        type=float,
        default=60.0,
        help="an insert-rate row stops inserting after this many seconds (the original "
        "sample path holds the shard's lock almost all the time, so inserts beside it "
        "crawl); the row reports the rate of what it inserted",
    )


def run(args: argparse.Namespace, progress: Progress = print) -> dict[str, Any]:
    """:func:`run_replay_benchmark` with the options of :func:`add_arguments`.

    Raises:
        ValueError: as :func:`run_replay_benchmark`.
    """
    return run_replay_benchmark(
        transitions=args.transitions,
        chunk_steps=args.chunk_steps,
        batch_size=args.batch_size,
        sample_batches=args.sample_batches,
        source=args.source,
        episodes_source=episodes_source_for(args.source),
        sampler_threads=args.sampler_threads,
        decode_threads=args.decode_threads,
        insert_passes=args.insert_passes,
        insert_time_limit_s=args.insert_time_limit_s,
        progress=progress,
    )


class NaiveReplay:
    """Uncompressed ring buffer of Dict transitions (the SB3 layout)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.obs_image = np.zeros((capacity, *spec.IMAGE_SHAPE), dtype=np.uint8)
        self.next_obs_image = np.zeros_like(self.obs_image)
        self.obs_vector = np.zeros((capacity, spec.VECTOR_DIM), dtype=np.float32)
        self.next_obs_vector = np.zeros_like(self.obs_vector)
        self.action = np.zeros((capacity, spec.ACTION_DIM), dtype=np.float32)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.discount = np.zeros(capacity, dtype=np.float32)
        self.capacity = capacity
        self.position = 0
        self.size = 0
        self._rng = np.random.default_rng(seed)

    @property
    def nbytes(self) -> int:
        """Bytes the buffer's arrays take (its full capacity, allocated up front)."""
        arrays = (
            self.obs_image,
            self.next_obs_image,
            self.obs_vector,
            self.next_obs_vector,
            self.action,
            self.reward,
            self.discount,
        )
        return sum(a.nbytes for a in arrays)

    def add(self, step: Transition, gamma: float = 0.99) -> None:
        """Store one transition (1-step, ``discount = 0`` if terminated else
        ``gamma``), overwriting the oldest when full."""
        i = self.position
        self.obs_image[i] = step.obs["image"]
        self.next_obs_image[i] = step.next_obs["image"]
        self.obs_vector[i] = step.obs["vector"]
        self.next_obs_vector[i] = step.next_obs["vector"]
        self.action[i] = step.action
        self.reward[i] = step.reward
        self.discount[i] = 0.0 if step.terminated else gamma
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement, as a
        :class:`Batch` (images ``uint8[B, 4, 84, 84]``, vectors ``float32[B, 23]``).

        Raises:
            ValueError: the buffer is empty.
        """
        index = self._rng.integers(0, self.size, size=batch_size)
        return Batch(
            obs_image=self.obs_image[index],
            obs_vector=self.obs_vector[index],
            action=self.action[index],
            reward=self.reward[index],
            discount=self.discount[index],
            next_obs_image=self.next_obs_image[index],
            next_obs_vector=self.next_obs_vector[index],
        )


def run_replay_benchmark(
    transitions: int = 8192,
    chunk_steps: int = 64,
    episode_length: int = 512,
    batch_size: int = 256,
    sample_batches: int = 40,
    source: str = "synthetic",
    episodes_source: Callable[[int], list[Transition]] | None = None,
    sampler_threads: Sequence[int] = (1, 2),
    decode_threads: Sequence[int] = (1, 2),
    insert_passes: int = 2,
    insert_time_limit_s: float = 60.0,
    progress: Progress = print,
) -> dict[str, Any]:
    """Fill one shard and one naive buffer with the same transitions; measure
    bytes per transition, insert and sample throughput; compare the legacy and
    gather sample paths and the insert rate with and without sampling (legacy,
    gather or compressed: :data:`INSERT_SAMPLING`).

    Args:
        transitions: transitions to insert into each (the shard's capacity).
        chunk_steps: steps per chunk (K).
        episode_length: steps per synthetic episode (ends truncated).
        batch_size: transitions per sampled batch.
        sample_batches: batches timed per sampling thread and row.
        source: a name for the frames' origin, reported in the JSON.
        episodes_source: returns that many consecutive transitions (whole
            episodes, steps numbered from 0); ``None`` = synthetic frames.
        sampler_threads: counts of threads calling ``sample`` at once.
        decode_threads: decode pool sizes of the gather path (1 = no pool).
        insert_passes: times every payload is re-inserted into the full shard
            for each insert-rate row.
        insert_time_limit_s: an insert-rate row stops after this many seconds
            (``time_limited`` in the row says it did), s.

    Returns:
        The JSON document (its keys in :data:`DESCRIPTION`).

    Raises:
        ValueError: a source other than ``"synthetic"`` without
            ``episodes_source``, or empty/non-positive thread counts.
    """
    if not sampler_threads or min(sampler_threads) < 1:
        raise ValueError("sampler_threads needs positive counts, e.g. 1,2")
    if not decode_threads or min(decode_threads) < 1:
        raise ValueError("decode_threads needs positive counts, e.g. 1,2")
    if insert_passes < 1 or sample_batches < 1:
        raise ValueError("insert_passes and sample_batches must be >= 1")
    if insert_time_limit_s <= 0:
        raise ValueError("insert_time_limit_s must be > 0")
    steps, source_note = make_transitions(
        transitions, episode_length, source, episodes_source, progress
    )
    start = time.perf_counter()
    payloads = encode_chunks(steps, chunk_steps)
    encode_s = time.perf_counter() - start
    payload_bytes = sum(len(p) for p in payloads)

    config = ReplayConfig(
        num_shards=1,
        capacity_transitions=transitions,
        capacity_bytes=10**12,
        chunk_steps=chunk_steps,
        min_size_to_sample=batch_size,
        replay_ratio=None,
    )
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    shard = ReplayShard(config, batch_size=batch_size)
    start = time.perf_counter()
    for payload in payloads:
        shard.insert(payload)
    insert_s = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = shard.stats()
    progress(
        f"ours: {stats['bytes_per_transition']:.0f} B/transition accounted "
        f"({traced / transitions:.0f} B traced), insert {transitions / insert_s:,.0f} transitions/s"
    )

    naive = NaiveReplay(transitions)
    start = time.perf_counter()
    for step in steps:
        naive.add(step)
    naive_insert_s = time.perf_counter() - start
    naive_bytes = naive.nbytes / transitions
    progress(
        f"naive: {naive_bytes:.0f} B/transition, insert {transitions / naive_insert_s:,.0f} "
        "transitions/s"
    )

    # The same contents in shards with a decode pool (identical inserts, untimed).
    pooled = {1: shard}
    for threads in sorted(set(decode_threads) - {1}):
        pooled[threads] = ReplayShard(config, batch_size=batch_size, decode_threads=threads)
        for payload in payloads:
            pooled[threads].insert(payload)

    rows: list[dict[str, Any]] = []
    for method, pools in (("legacy", [1]), ("gather", sorted(set(decode_threads)))):
        for pool_size in pools:
            for callers in sorted(set(sampler_threads)):
                rate = _sample_rate(pooled[pool_size], method, callers, sample_batches, batch_size)
                rows.append(
                    {
                        "path": method,
                        "sampler_threads": callers,
                        "decode_threads": pool_size,
                        "batches_per_s": rate,
                    }
                )
                progress(
                    f"sample {method}, {callers} sampler thread(s), {pool_size} decode "
                    f"thread(s): {rate:.1f} batches/s of {batch_size}"
                )
    legacy_rate = rows[0]["batches_per_s"]
    for row in rows:
        row["speedup_vs_legacy"] = row["batches_per_s"] / legacy_rate
    gather_rate = next(
        r["batches_per_s"]
        for r in rows
        if r["path"] == "gather" and r["decode_threads"] == 1 and r["sampler_threads"] == 1
    )

    shipping = _compressed_shipping(pooled, sample_batches, batch_size)
    progress(
        f"ship compressed: {shipping['bytes_per_batch'] / 1e6:.2f} MB/batch instead of "
        f"{shipping['raw_bytes_per_batch'] / 1e6:.2f} MB ({shipping['bytes_ratio']:.1f}x fewer), "
        f"shard {shipping['shard_batches_per_s']:.1f} batches/s"
    )

    naive.sample(batch_size)
    start = time.perf_counter()
    for _ in range(sample_batches):
        naive.sample(batch_size)
    naive_sample_s = time.perf_counter() - start
    naive_rate = sample_batches / naive_sample_s
    progress(f"sample batch {batch_size}: naive {naive_rate:.1f} batches/s")

    inserts: list[dict[str, Any]] = []
    for sampling in INSERT_SAMPLING:
        row = _insert_rate(
            shard, payloads * insert_passes, sampling, batch_size, insert_time_limit_s
        )
        inserts.append(row)
    alone = inserts[0]["insert_transitions_per_s"]
    for row in inserts:
        row["insert_rate_vs_alone"] = row["insert_transitions_per_s"] / alone
        progress(
            f"insert while sampling with {row['sampling'] or 'nothing'}: "
            f"{row['insert_transitions_per_s']:,.0f} transitions/s "
            f"({row['insert_rate_vs_alone']:.2f}x alone), sampling "
            f"{row['sample_batches_per_s']:.1f} batches/s"
        )

    report = {
        "benchmark": "replay",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "source_note": source_note,
        "transitions": transitions,
        "chunk_steps": chunk_steps,
        "bytes_per_transition": stats["bytes_per_transition"],
        "traced_bytes_per_transition": traced / transitions,
        "naive_bytes_per_transition": naive_bytes,
        "memory_ratio": naive_bytes / stats["bytes_per_transition"],
        "compression_ratio": stats["compression_ratio"],
        "payload_bytes_per_transition": payload_bytes / transitions,
        "encode_transitions_per_s": transitions / encode_s,
        "insert_transitions_per_s": transitions / insert_s,
        "naive_insert_transitions_per_s": transitions / naive_insert_s,
        "batch_size": batch_size,
        "sample_batches_per_s": gather_rate,
        "legacy_sample_batches_per_s": legacy_rate,
        "sample_speedup": gather_rate / legacy_rate,
        "naive_sample_batches_per_s": naive_rate,
        "sample_paths": rows,
        "compressed_shipping": shipping,
        "insert_while_sampling": inserts,
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
    progress(format_table(report))
    return report


def _sample_rate(
    shard: ReplayShard, method: str, callers: int, batches: int, batch_size: int
) -> float:
    """Batches/s of ``callers`` threads each sampling ``batches`` batches at once."""
    sample_once = shard._sample_legacy if method == "legacy" else shard.sample
    sample_once(batch_size)  # warm up
    barrier = threading.Barrier(callers + 1)
    errors: list[BaseException] = []

    def sample() -> None:
        barrier.wait()
        try:
            for _ in range(batches):
                sample_once(batch_size)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=sample, daemon=True) for _ in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return callers * batches / elapsed


def _compressed_shipping(
    shards: dict[int, ReplayShard], batches: int, batch_size: int
) -> dict[str, Any]:
    """The alternative of shipping frames compressed: the shard's cost to
    build a compressed sample, its bytes against the decoded batch's, and the
    receiver's cost to decode it with each decode pool size."""
    shard = shards[1]
    shard.sample_compressed(batch_size)  # warm up
    start = time.perf_counter()
    for _ in range(batches):
        shipped = shard.sample_compressed(batch_size)
    shard_rate = batches / (time.perf_counter() - start)
    decoded = shipped.decode()
    raw = sum(a.nbytes for a in decoded.batch.arrays().values())
    raw += decoded.ids.nbytes + decoded.policy_versions.nbytes
    receiver = []
    for threads in sorted(shards):
        pool = shards[threads]._decode_pool
        shipped.decode(pool, threads)  # warm up
        start = time.perf_counter()
        for _ in range(batches):
            shipped.decode(pool, threads)
        receiver.append(
            {"decode_threads": threads, "batches_per_s": batches / (time.perf_counter() - start)}
        )
    return {
        "shard_batches_per_s": shard_rate,
        "bytes_per_batch": shipped.nbytes,
        "raw_bytes_per_batch": raw,
        "bytes_ratio": raw / shipped.nbytes,
        "receiver_decode": receiver,
    }


def _insert_rate(
    shard: ReplayShard,
    payloads: list[bytes],
    sampling: str | None,
    batch_size: int,
    time_limit_s: float,
) -> dict[str, Any]:
    """Insert ``payloads`` into the (full) shard, timed, while one thread
    samples it in a loop with ``sampling`` (one of :data:`INSERT_SAMPLING`;
    ``None``: no sampling); stop inserting after ``time_limit_s``."""
    sample_once: Callable[[int], object] = shard.sample
    if sampling == "legacy":
        sample_once = shard._sample_legacy
    elif sampling == "compressed":
        sample_once = shard.sample_compressed
    stop = threading.Event()
    sampled = [0]
    errors: list[BaseException] = []
    started = threading.Event()

    def sample() -> None:
        try:
            started.set()
            while not stop.is_set():
                sample_once(batch_size)
                sampled[0] += 1
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=sample, daemon=True) if sampling else None
    if thread is not None:
        thread.start()
        started.wait()
    steps = inserted = 0
    start = time.perf_counter()
    for payload in payloads:  # at least one, however short the limit
        steps += payload_steps(payload)
        shard.insert(payload)
        inserted += 1
        if time.perf_counter() - start > time_limit_s:
            break
    elapsed = time.perf_counter() - start
    stop.set()
    if thread is not None:
        thread.join()
    if errors:
        raise errors[0]
    return {
        "sampling": sampling,
        "inserted_transitions": steps,
        "insert_seconds": elapsed,
        "time_limited": inserted < len(payloads),
        "insert_transitions_per_s": steps / elapsed,
        "sample_batches_per_s": sampled[0] / elapsed,
    }


def format_table(report: dict[str, Any]) -> str:
    """The sample-path and insert rows of a ``bench replay`` report as a text table."""
    lines = [
        f"replay sample paths, batch {report['batch_size']}, {report['transitions']} "
        f"transitions of {report['source']}",
        f"{'path':<8} {'sampler thr':>11} {'decode thr':>10} {'batches/s':>10} {'vs legacy':>10}",
    ]
    for row in report["sample_paths"]:
        lines.append(
            f"{row['path']:<8} {row['sampler_threads']:>11} {row['decode_threads']:>10} "
            f"{row['batches_per_s']:>10.1f} {row['speedup_vs_legacy']:>9.2f}x"
        )
    lines.append(
        f"{'naive':<8} {1:>11} {'-':>10} {report['naive_sample_batches_per_s']:>10.1f} "
        f"{report['naive_sample_batches_per_s'] / report['legacy_sample_batches_per_s']:>9.2f}x"
    )
    shipping = report["compressed_shipping"]
    lines.append(
        f"ship compressed ({shipping['bytes_ratio']:.1f}x fewer bytes): shard "
        f"{shipping['shard_batches_per_s']:.1f} batches/s; receiver decode "
        + ", ".join(
            f"{r['batches_per_s']:.1f} batches/s with {r['decode_threads']} thread(s)"
            for r in shipping["receiver_decode"]
        )
    )
    lines.append(
        f"{'inserts while sampling':<24} {'transitions/s':>14} {'vs alone':>9} {'samples/s':>10}"
    )
    for row in report["insert_while_sampling"]:
        lines.append(
            f"{row['sampling'] or 'nothing':<24} {row['insert_transitions_per_s']:>14,.0f} "
            f"{row['insert_rate_vs_alone']:>8.2f}x {row['sample_batches_per_s']:>10.1f}"
        )
    return "\n".join(lines)
