"""``td3drive bench replay``: a shard's memory and speed against a naive buffer.

The baseline stores obs and next_obs as uint8 arrays, one row per transition,
as SB3's ``DictReplayBuffer`` does (with ``optimize_memory_usage=False``, the
only mode it supports for Dict observations), and adds transitions one at a
time as SB3's ``add`` does. Both sides are filled with the same transitions in
the same run, single-threaded.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from buffer_service.codec import encode
from buffer_service.shard import ReplayShard
from buffer_service.synthetic import SyntheticEpisode, chunked
from td3drive import spec
from td3drive.config import ReplayConfig
from td3drive.spec import Batch, Transition

Progress = Callable[[str], None]


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
    progress: Progress = print,
) -> dict[str, Any]:
    """Fill one shard and one naive buffer with the same transitions; measure
    bytes per transition, insert and sample throughput.

    Args:
        transitions: transitions to insert into each.
        chunk_steps: steps per chunk (K).
        episode_length: steps per synthetic episode (ends truncated).
        batch_size: transitions per sampled batch.
        sample_batches: batches timed on each side.
        source: a name for the frames' origin, reported in the JSON.
        episodes_source: returns that many consecutive transitions (whole
            episodes, steps numbered from 0); ``None`` = synthetic frames.

    Returns:
        The JSON document (keys in the CLI's help).

    Raises:
        ValueError: a source other than ``"synthetic"`` without ``episodes_source``.
    """
    if episodes_source is None:
        if source != "synthetic":
            raise ValueError(f"source {source!r} needs episodes_source")
        progress(f"generating {transitions} synthetic transitions (driving-like frames)")
        rng = np.random.default_rng(0)
        steps: list[Transition] = []
        episode = 0
        while len(steps) < transitions:
            length = min(episode_length, transitions - len(steps))
            steps += SyntheticEpisode(rng, episode, length, "truncated").transitions()
            episode += 1
        source_note = (
            "synthetic driving-like frames (scrolling road texture, ~1.2 KB per LZ4 frame)"
        )
    else:
        progress(f"collecting {transitions} transitions from {source}")
        steps = episodes_source(transitions)
        source_note = f"frames from the simulator ({source})"
    episodes: list[list[Transition]] = []
    for step in steps:
        if step.step == 0:
            episodes.append([])
        episodes[-1].append(step)

    start = time.perf_counter()
    payloads = [encode(c) for ep in episodes for c in chunked(ep, chunk_steps)]
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

    shard.sample(batch_size)
    start = time.perf_counter()
    for _ in range(sample_batches):
        shard.sample(batch_size)
    sample_s = time.perf_counter() - start
    naive.sample(batch_size)
    start = time.perf_counter()
    for _ in range(sample_batches):
        naive.sample(batch_size)
    naive_sample_s = time.perf_counter() - start
    progress(
        f"sample batch {batch_size}: ours {sample_batches / sample_s:.1f} batches/s, "
        f"naive {sample_batches / naive_sample_s:.1f} batches/s"
    )
    return {
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
        "sample_batches_per_s": sample_batches / sample_s,
        "naive_sample_batches_per_s": sample_batches / naive_sample_s,
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
