"""A shard's transitions: compressed chunks, FIFO eviction, sampling, n-step.

Plain numpy; not thread-safe (:class:`buffer_service.shard.ReplayShard` locks).

Every inserted transition gets a global id; ids are consecutive in insertion
order, and eviction removes whole chunks from the oldest end, so the live ids
are always the contiguous range ``[oldest_id, next_id)``. Sampling draws ids
from that range (uniformly, or proportionally to priorities) and rebuilds the
frame stacks from the chunk's once-stored frames, in two steps so a shard
decodes outside its lock: :meth:`ReplayStorage.plan_sample` draws the ids and
takes references to their (immutable) chunks, :meth:`SamplePlan.gather`
decompresses each frame the batch needs once and gathers every array with
numpy. The original per-row loop stays as ``sample(..., method="legacy")``,
the reference the tests compare against and the benchmark's baseline.

n-step returns (Sutton & Barto 2018, §7.1) are computed within a chunk when
it is inserted: for step ``t`` of a ``T``-step chunk, ``k = min(n, T − t)``,

    ``reward = Σ_{j<k} γ^j r_{t+j}``,
    ``discount = 0`` if the chunk ends in ``terminated`` and ``t + k = T``, else ``γ^k``,
    ``next_obs = obs_{t+k}``.

A ``truncated`` end therefore bootstraps. A chunk that ends mid-episode gives
its last ``n − 1`` steps a shorter return (``k < n``) that bootstraps from the
chunk's last observation: still a correct k-step target, and it spares the
shard from stitching chunks together.

The sum is taken in float64 and clipped to float32's finite range, so a
stored return can never overflow to ``inf``. The codec already bounds each
reward by :data:`td3drive.contracts.codec.MAX_ABS_REWARD` (a return is then at
most ``n · 1e6``); the clip guards chunks that did not come through it.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from td3drive.contracts import spec
from td3drive.contracts.codec import (
    CompressedChunk,
    decompress_blocks,
    decompress_frames,
    frame_blocks,
)
from td3drive.contracts.spec import Batch

PER_CHUNK_OVERHEAD_BYTES = 1024
"""Python object overhead the byte accounting charges each chunk (the chunk
record, its bytes object and ~13 numpy array headers; ~0.9 KB measured with
tracemalloc by ``td3drive bench replay``)."""


class CapacityError(ValueError):
    """A chunk that could never fit in the shard's capacity."""


@dataclass(frozen=True)
class SampledBatch:
    """What a sample returns besides the training batch.

    Attributes:
        batch: the training batch; ``batch.weight`` holds importance weights
            under prioritized sampling, else ``None``.
        ids: ``int64[B]`` transition ids, for :meth:`ReplayStorage.update_priorities`.
        policy_versions: ``int64[B]`` version of the policy that acted at each sample.
        weight_scale: under prioritized sampling, the normaliser of ``batch.weight``:
            ``max_j (N·P(j))^−β`` over the live transitions, so
            ``batch.weight · weight_scale`` is the unnormalised ``(N·P(i))^−β``
            (:func:`buffer_service.ray_actor.concatenate` renormalises samples
            of several shards with it); ``None`` under uniform sampling.
        shard_size: transitions the storage held when the sample was drawn
            (the sampler splits its next batches over shards with it, instead
            of asking each shard its size); ``None`` when unknown.
    """

    batch: Batch
    ids: np.ndarray
    policy_versions: np.ndarray
    weight_scale: float | None = None
    shard_size: int | None = None


@dataclass(frozen=True, eq=False)
class _Stored:
    first_id: int
    chunk: CompressedChunk
    nstep_reward: np.ndarray  # float32[T]
    nstep_discount: np.ndarray  # float32[T]
    nstep_k: np.ndarray  # int16[T]
    nbytes: int


@dataclass(frozen=True, eq=False)
class SamplePlan:
    """A sample chosen under the shard's lock and not yet decoded
    (:meth:`ReplayStorage.plan_sample`).

    Attributes:
        ids: ``int64[B]`` transition ids, in draw order.
        chunks: the distinct chunks the rows fall in, oldest first
            (references: chunks are immutable, eviction only drops them).
        row_chunk: ``int64[B]``, each row's index into ``chunks``.
        offsets: ``int64[B]``, each row's step ``t`` within its chunk.
        weight: ``float32[B]`` importance weights under prioritized sampling, else ``None``.
        weight_scale: as :attr:`SampledBatch.weight_scale`.
        size: transitions the storage held when the plan was made.
    """

    ids: np.ndarray
    chunks: tuple[_Stored, ...]
    row_chunk: np.ndarray
    offsets: np.ndarray
    weight: np.ndarray | None
    weight_scale: float | None
    size: int

    def gather(self, pool: Executor | None = None, parts: int = 1) -> SampledBatch:
        """Decode and assemble the batch; needs no lock.

        Each frame the batch needs is decompressed once (``obs`` and
        ``next_obs`` of a row share ``4 − k`` frames; rows of one chunk share
        more), then the stacks are gathered with one ``np.take``.

        Args:
            pool: threads to decompress frames on (``None``: this thread).
            parts: slices the frames are split into on ``pool``, ``≥ 1``.

        Returns:
            The sample, identical to what the legacy per-row loop returns for
            the same ids: ``obs_image``/``next_obs_image`` ``uint8[B,4,84,84]``,
            vectors ``float32[B,23]``, ``action float32[B,2]``, n-step
            ``reward``/``discount`` ``float32[B]``, ``policy_versions int64[B]``.
        """
        layout = self._layout()
        frames = decompress_frames(
            [s.chunk for s in self.chunks], layout.owner, layout.frame, pool, parts
        )
        return layout.assemble(frames)

    def compressed(self) -> CompressedSample:
        """The sample with its distinct frames still LZ4-compressed, to be
        decoded where it is used (:meth:`CompressedSample.decode`); needs no lock.

        Returns:
            A :class:`CompressedSample` whose ``decode()`` equals :meth:`gather`.
        """
        layout = self._layout()
        chunks = [s.chunk for s in self.chunks]
        starts, ends = frame_blocks(chunks, layout.owner, layout.frame)
        views = [memoryview(c.frame_data) for c in chunks]
        bounds = zip(layout.owner.tolist(), starts.tolist(), ends.tolist(), strict=True)
        data = b"".join([views[c][a:b] for c, a, b in bounds])
        offsets = np.zeros(starts.shape[0] + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        return CompressedSample(frame_data=data, frame_offsets=offsets, layout=layout)

    def _layout(self) -> _Layout:
        stored = self.chunks
        steps = np.fromiter((s.chunk.num_steps for s in stored), np.int64, count=len(stored))
        step_base = np.zeros(len(stored), dtype=np.int64)
        np.cumsum(steps[:-1], out=step_base[1:])
        chunk_no = np.arange(len(stored), dtype=np.int64)
        j, t = self.row_chunk, self.offsets
        row = step_base[j] + t  # index into the chunks' per-step arrays, end to end
        k = np.concatenate([s.nstep_k for s in stored]).astype(np.int64)[row]
        vectors = np.concatenate([s.chunk.vectors for s in stored])
        vector_row = row + j  # T + 1 vectors per chunk
        stack = spec.FRAME_STACK
        # Frames: T + 4 per chunk; row i needs t..t+3 and t+k..t+k+3 of its chunk.
        frame_base = step_base + stack * chunk_no
        lanes = np.arange(stack, dtype=np.int64)
        first = frame_base[j] + t
        wanted = np.concatenate(
            [(first[:, None] + lanes).ravel(), ((first + k)[:, None] + lanes).ravel()]
        )
        distinct, where = np.unique(wanted, return_inverse=True)
        owner = np.searchsorted(frame_base, distinct, side="right") - 1
        return _Layout(
            owner=owner,
            frame=distinct - frame_base[owner],
            where=where.reshape(-1).astype(np.int32),
            obs_vector=vectors[vector_row],
            next_obs_vector=vectors[vector_row + k],
            action=np.concatenate([s.chunk.actions for s in stored])[row],
            reward=np.concatenate([s.nstep_reward for s in stored])[row],
            discount=np.concatenate([s.nstep_discount for s in stored])[row],
            weight=self.weight,
            ids=self.ids,
            policy_versions=np.concatenate([s.chunk.versions for s in stored])[row].astype(
                np.int64
            ),
            weight_scale=self.weight_scale,
            size=self.size,
        )


@dataclass(frozen=True, eq=False)
class _Layout:
    """A sample with everything but its frames gathered: the distinct frames
    it needs (``owner``: chunk, ``frame``: index in it, both ``int64[F]``) and
    ``where`` (``int32[2·B·4]``): obs then next_obs stacks as indices into them."""

    owner: np.ndarray
    frame: np.ndarray
    where: np.ndarray
    obs_vector: np.ndarray
    next_obs_vector: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    weight: np.ndarray | None
    ids: np.ndarray
    policy_versions: np.ndarray
    weight_scale: float | None
    size: int

    def assemble(self, frames: np.ndarray) -> SampledBatch:
        """The sample, given its distinct frames ``uint8[F, 84, 84]``."""
        # np.take copies whole 84×84 rows (several times faster than fancy indexing here).
        images = np.take(frames, self.where, axis=0).reshape(2, -1, *spec.IMAGE_SHAPE)
        batch = Batch(
            obs_image=images[0],
            obs_vector=self.obs_vector,
            action=self.action,
            reward=self.reward,
            discount=self.discount,
            next_obs_image=images[1],
            next_obs_vector=self.next_obs_vector,
            weight=self.weight,
        )
        return SampledBatch(
            batch=batch,
            ids=self.ids,
            policy_versions=self.policy_versions,
            weight_scale=self.weight_scale,
            shard_size=self.size,
        )


@dataclass(frozen=True, eq=False)
class CompressedSample:
    """A sample that travels with its frames LZ4-compressed (each distinct
    frame once, ~1.1 KB instead of 7 KB) and is decoded where it is used,
    e.g. by the learner on its own threads (:meth:`SamplePlan.compressed`).

    Attributes:
        frame_data: the distinct frames' LZ4 blocks, end to end.
        frame_offsets: ``int64[F+1]``; frame ``i`` is ``frame_data[o[i]:o[i+1]]``.
    """

    frame_data: bytes
    frame_offsets: np.ndarray
    layout: _Layout

    @property
    def nbytes(self) -> int:
        """Bytes this sample carries (frames, offsets and the gathered arrays)."""
        arrays = [
            self.frame_offsets,
            self.layout.where,
            self.layout.obs_vector,
            self.layout.next_obs_vector,
            self.layout.action,
            self.layout.reward,
            self.layout.discount,
            self.layout.ids,
            self.layout.policy_versions,
        ]
        if self.layout.weight is not None:
            arrays.append(self.layout.weight)
        return len(self.frame_data) + sum(a.nbytes for a in arrays)

    def decode(self, pool: Executor | None = None, parts: int = 1) -> SampledBatch:
        """Decompress the frames and assemble the sample (as :meth:`SamplePlan.gather`).

        Args:
            pool: threads to decompress frames on (``None``: this thread).
            parts: slices the frames are split into on ``pool``, ``≥ 1``.

        Raises:
            lz4.block.LZ4BlockError, ValueError: corrupted frame data.
        """
        offsets = self.frame_offsets
        frames = decompress_blocks(
            [self.frame_data],
            np.zeros(offsets.shape[0] - 1, dtype=np.int64),
            offsets[:-1],
            offsets[1:],
            pool,
            parts,
        )
        return self.layout.assemble(frames)


def nstep_targets(
    rewards: np.ndarray, terminated_at_end: bool, n: int, gamma: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n-step reward, discount and step count for each step of a chunk.

    Args:
        rewards: ``float32[T]``.
        terminated_at_end: the chunk's last step is ``terminated``.
        n: steps to look ahead, ``≥ 1``.
        gamma: discount factor in ``[0, 1]``.

    Returns:
        ``(reward float32[T], discount float32[T], k int16[T])`` as in the
        module docstring; the rewards are summed in float64 and clipped to
        float32's finite range, so they are never ``inf``.
    """
    steps = rewards.shape[0]
    wide = np.asarray(rewards, dtype=np.float64)  # float32 products and sums could overflow
    t = np.arange(steps)
    k = np.minimum(n, steps - t)
    total = np.zeros(steps, dtype=np.float64)
    for j in range(min(n, steps)):
        valid = j < k
        total[valid] += gamma**j * wide[t[valid] + j]
    limit = float(np.finfo(np.float32).max)
    np.clip(total, -limit, limit, out=total)
    discount = np.power(gamma, k, dtype=np.float64)
    if terminated_at_end:
        discount[t + k == steps] = 0.0
    return total.astype(np.float32), discount.astype(np.float32), k.astype(np.int16)


class ReplayStorage:
    """Compressed chunks with capacity in transitions and bytes.

    Args:
        capacity_transitions: most transitions held, ``≥ 1``.
        capacity_bytes: most bytes held (payload plus per-chunk overhead).
        n_step: n of the n-step return, ``≥ 1``.
        gamma: discount factor in ``[0, 1]``.
        prioritized: sample proportionally to priorities (Schaul et al.
            2016, "Prioritized Experience Replay", §3.3) instead of uniformly.
        priority_alpha: exponent α of ``P(i) = p_i^α / Σ p^α``.
        priority_beta: exponent β of the importance weights ``(N·P(i))^−β``,
            normalised by their maximum.
        priority_eps: added to |TD error| so no priority is 0.
        seed: seed of the sampling RNG.

    Raises:
        ValueError: invalid arguments.
    """

    def __init__(
        self,
        capacity_transitions: int,
        capacity_bytes: int,
        n_step: int = 1,
        gamma: float = 0.99,
        prioritized: bool = False,
        priority_alpha: float = 0.6,
        priority_beta: float = 0.4,
        priority_eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        if capacity_transitions < 1 or capacity_bytes < 1:
            raise ValueError("capacities must be >= 1")
        if n_step < 1 or not 0.0 <= gamma <= 1.0:
            raise ValueError("n_step must be >= 1 and gamma in [0, 1]")
        self.capacity_transitions = capacity_transitions
        self.capacity_bytes = capacity_bytes
        self.n_step = n_step
        self.gamma = gamma
        self.prioritized = prioritized
        self.priority_alpha = priority_alpha
        self.priority_beta = priority_beta
        self.priority_eps = priority_eps
        self._rng = np.random.default_rng(seed)
        self._chunks: list[_Stored] = []
        self._starts = np.zeros(0, dtype=np.int64)
        self._starts_dirty = False
        self.next_id = 0
        self.size = 0
        self.bytes_held = 0
        self.raw_bytes_held = 0
        self.counters = {
            "inserted_transitions": 0,
            "inserted_chunks": 0,
            "sampled_transitions": 0,
            "evicted_chunks": 0,
            "evicted_transitions": 0,
            "stale_priority_updates": 0,
        }
        # Priorities p^α by slot = id % capacity (live ids span < capacity).
        self._priorities = np.zeros(capacity_transitions if prioritized else 0, np.float64)
        self._max_priority = 1.0

    # ---------------------------------------------------------------- insert
    @property
    def oldest_id(self) -> int:
        return self._chunks[0].first_id if self._chunks else self.next_id

    def insert(self, chunk: CompressedChunk) -> int:
        """Append a validated chunk, then evict the oldest chunks until both
        capacities hold. Returns the number of chunks evicted.

        Raises:
            CapacityError: the chunk alone exceeds a capacity (nothing changes).
        """
        steps = chunk.num_steps
        nbytes = chunk.nbytes + 10 * steps + PER_CHUNK_OVERHEAD_BYTES
        if steps > self.capacity_transitions or nbytes > self.capacity_bytes:
            raise CapacityError(
                f"a chunk of {steps} steps / {nbytes} bytes exceeds the shard's capacity of "
                f"{self.capacity_transitions} transitions / {self.capacity_bytes} bytes"
            )
        reward, discount, k = nstep_targets(
            chunk.rewards, bool(chunk.terminated[-1]), self.n_step, self.gamma
        )
        # Evict first: the new ids reuse the priority slots of the evicted ones.
        evicted = 0
        while (
            self.size + steps > self.capacity_transitions
            or self.bytes_held + nbytes > self.capacity_bytes
        ):
            self._evict_oldest()
            evicted += 1
        stored = _Stored(self.next_id, chunk, reward, discount, k, nbytes)
        self._chunks.append(stored)
        self._starts_dirty = True
        if self.prioritized:
            slots = np.arange(self.next_id, self.next_id + steps) % self.capacity_transitions
            self._priorities[slots] = self._max_priority
        self.next_id += steps
        self.size += steps
        self.bytes_held += nbytes
        self.raw_bytes_held += _raw_bytes(chunk)
        self.counters["inserted_transitions"] += steps
        self.counters["inserted_chunks"] += 1
        return evicted

    def _evict_oldest(self) -> None:
        old = self._chunks.pop(0)
        steps = old.chunk.num_steps
        if self.prioritized:
            slots = np.arange(old.first_id, old.first_id + steps) % self.capacity_transitions
            self._priorities[slots] = 0.0
        self.size -= steps
        self.bytes_held -= old.nbytes
        self.raw_bytes_held -= _raw_bytes(old.chunk)
        self.counters["evicted_chunks"] += 1
        self.counters["evicted_transitions"] += steps
        self._starts_dirty = True

    # ---------------------------------------------------------------- sample
    def sample(self, batch_size: int, method: str = "gather") -> SampledBatch:
        """Draw ``batch_size`` transitions (with replacement) and rebuild
        their observation stacks.

        Args:
            batch_size: transitions to draw, ``≥ 1``.
            method: ``"gather"`` (:meth:`plan_sample` then
                :meth:`SamplePlan.gather`: each needed frame decoded once,
                rows gathered with numpy) or ``"legacy"`` (the original
                per-row loop, kept as the reference and the benchmark's
                baseline). Both return identical batches for the same RNG
                state and contents.

        Raises:
            ValueError: the storage is empty, ``batch_size < 1`` or an
                unknown ``method``.
        """
        if method == "gather":
            return self.plan_sample(batch_size).gather()
        if method == "legacy":
            return self._sample_legacy(batch_size)
        raise ValueError(f"unknown sample method {method!r}; expected 'gather' or 'legacy'")

    def plan_sample(self, batch_size: int) -> SamplePlan:
        """Draw the ids of a sample and take references to the chunks they
        live in, without decoding anything: the part of a sample that needs
        the shard's lock. Chunks are immutable, so the plan stays valid after
        they are evicted; :meth:`SamplePlan.gather` decodes it outside the lock.

        Counts the sample in ``sampled_transitions``.

        Raises:
            ValueError: the storage is empty or ``batch_size < 1``.
        """
        ids, weight, weight_scale = self._draw(batch_size)
        starts = self._chunk_starts()
        which = np.searchsorted(starts, ids, side="right") - 1
        distinct, row_chunk = np.unique(which, return_inverse=True)
        self.counters["sampled_transitions"] += batch_size
        return SamplePlan(
            ids=ids.astype(np.int64),
            chunks=tuple(self._chunks[i] for i in distinct.tolist()),
            row_chunk=row_chunk.reshape(-1).astype(np.int64),
            offsets=(ids - starts[which]).astype(np.int64),
            weight=weight,
            weight_scale=weight_scale,
            size=self.size,
        )

    def _draw(self, batch_size: int) -> tuple[np.ndarray, np.ndarray | None, float | None]:
        """``(ids int64[B], weights float32[B] or None, weight_scale or None)``
        from the sampling RNG (one draw of ``batch_size`` values)."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay shard")
        if self.prioritized:
            return self._sample_prioritized(batch_size)
        return self._rng.integers(self.oldest_id, self.next_id, size=batch_size), None, None

    def _sample_legacy(self, batch_size: int) -> SampledBatch:
        """The original sample path: a per-row loop that decompresses every
        row's 8 frames (4 of them twice at n = 1), under the caller's lock."""
        ids, weight, weight_scale = self._draw(batch_size)
        starts = self._chunk_starts()
        which = np.searchsorted(starts, ids, side="right") - 1
        offsets = ids - starts[which]

        obs_image = np.empty((batch_size, *spec.IMAGE_SHAPE), dtype=np.uint8)
        next_image = np.empty_like(obs_image)
        obs_vector = np.empty((batch_size, spec.VECTOR_DIM), dtype=np.float32)
        next_vector = np.empty_like(obs_vector)
        action = np.empty((batch_size, spec.ACTION_DIM), dtype=np.float32)
        reward = np.empty(batch_size, dtype=np.float32)
        discount = np.empty(batch_size, dtype=np.float32)
        versions = np.empty(batch_size, dtype=np.int64)
        stack = spec.FRAME_STACK
        for row, (index, t) in enumerate(zip(which.tolist(), offsets.tolist(), strict=True)):
            stored = self._chunks[index]
            chunk = stored.chunk
            k = int(stored.nstep_k[t])
            frames = {
                i: chunk.frame(i) for i in (*range(t, t + stack), *range(t + k, t + k + stack))
            }
            for j in range(stack):
                obs_image[row, j] = frames[t + j]
                next_image[row, j] = frames[t + k + j]
            obs_vector[row] = chunk.vectors[t]
            next_vector[row] = chunk.vectors[t + k]
            action[row] = chunk.actions[t]
            reward[row] = stored.nstep_reward[t]
            discount[row] = stored.nstep_discount[t]
            versions[row] = chunk.versions[t]
        self.counters["sampled_transitions"] += batch_size
        batch = Batch(
            obs_image=obs_image,
            obs_vector=obs_vector,
            action=action,
            reward=reward,
            discount=discount,
            next_obs_image=next_image,
            next_obs_vector=next_vector,
            weight=weight,
        )
        return SampledBatch(
            batch=batch,
            ids=ids.astype(np.int64),
            policy_versions=versions,
            weight_scale=weight_scale,
            shard_size=self.size,
        )

    def _chunk_starts(self) -> np.ndarray:
        if self._starts_dirty:
            self._starts = np.fromiter(
                (s.first_id for s in self._chunks), dtype=np.int64, count=len(self._chunks)
            )
            self._starts_dirty = False
        return self._starts

    def _live_priorities(self) -> np.ndarray:
        cap = self.capacity_transitions
        lo, hi = self.oldest_id % cap, self.next_id % cap
        if self.size == cap or lo >= hi:  # the live window wraps around the ring
            return np.concatenate([self._priorities[lo:], self._priorities[:hi]])
        return self._priorities[lo:hi]

    def _sample_prioritized(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
        # O(N) per call: a cumulative sum over the live priorities, then a
        # binary search per draw. At 250k transitions per shard that is ~1 ms.
        # Returns (ids, normalised weights, their normaliser max_j (N P(j))^-β).
        priorities = self._live_priorities()
        cumulative = np.cumsum(priorities)
        total = cumulative[-1]
        draws = self._rng.random(batch_size) * total
        index = np.minimum(np.searchsorted(cumulative, draws, side="right"), self.size - 1)
        probabilities = priorities[index] / total
        min_probability = priorities.min() / total
        # w_i = (N P(i))^-β / max_j (N P(j))^-β = (P(i) / P_min)^-β
        weight = np.power(probabilities / min_probability, -self.priority_beta)
        scale = float(np.power(self.size * min_probability, -self.priority_beta))
        return self.oldest_id + index, weight.astype(np.float32), scale

    def update_priorities(self, ids: np.ndarray, td_errors: np.ndarray) -> int:
        """Set ``p = (|td_error| + eps)^α`` for the live ids among ``ids``.

        Returns:
            How many ids were live (evicted ids are skipped and counted in
            ``stale_priority_updates``).

        Raises:
            ValueError: storage not prioritized, mismatched lengths, or
                non-finite errors.
        """
        if not self.prioritized:
            raise ValueError("update_priorities on a storage without prioritized sampling")
        ids = np.asarray(ids, dtype=np.int64)
        td_errors = np.asarray(td_errors, dtype=np.float64)
        if ids.shape != td_errors.shape:
            raise ValueError(f"{ids.shape[0]} ids but {td_errors.shape[0]} priorities")
        if not np.isfinite(td_errors).all():
            raise ValueError("priorities contain NaN or inf")
        live = (ids >= self.oldest_id) & (ids < self.next_id)
        self.counters["stale_priority_updates"] += int((~live).sum())
        values = np.power(np.abs(td_errors[live]) + self.priority_eps, self.priority_alpha)
        self._priorities[ids[live] % self.capacity_transitions] = values
        if values.size:
            self._max_priority = max(self._max_priority, float(values.max()))
        return int(live.sum())

    # -------------------------------------------------------------- inspect
    def chunks(self) -> list[tuple[int, CompressedChunk]]:
        """``(first_id, chunk)`` of every held chunk, oldest first (chunks are immutable)."""
        return [(s.first_id, s.chunk) for s in self._chunks]

    def priorities_of_live(self) -> np.ndarray | None:
        """``p^α`` of the live ids in id order, or ``None`` when not prioritized."""
        return self._live_priorities().copy() if self.prioritized else None

    def restore(
        self,
        chunks: list[tuple[int, CompressedChunk]],
        next_id: int,
        counters: dict[str, int],
        priorities: np.ndarray | None,
        max_priority: float,
    ) -> None:
        """Replace the contents with a snapshot's (see :mod:`buffer_service.snapshot`).

        Raises:
            ValueError: chunk ids not consecutive, or priorities of the wrong length.
        """
        expected = chunks[0][0] if chunks else next_id
        for first_id, chunk in chunks:
            if first_id != expected:
                raise ValueError(f"snapshot chunk ids are not consecutive at {first_id}")
            expected += chunk.num_steps
        if expected != next_id:
            raise ValueError("snapshot next_id does not follow its last chunk")
        self._chunks = []
        self.size = self.bytes_held = self.raw_bytes_held = 0
        self._priorities[:] = 0.0
        self.next_id = chunks[0][0] if chunks else next_id
        for _, chunk in chunks:
            self.insert(chunk)
        self.counters.update(counters)
        if self.prioritized and priorities is not None:
            if priorities.shape != (self.size,):
                raise ValueError("snapshot priorities do not match its transitions")
            slots = np.arange(self.oldest_id, self.next_id) % self.capacity_transitions
            self._priorities[slots] = priorities
            self._max_priority = max_priority

    @property
    def max_priority(self) -> float:
        return self._max_priority

    def stats(self) -> dict[str, Any]:
        """Size, bytes and counters (JSON-able)."""
        return {
            "size": self.size,
            "chunks": len(self._chunks),
            "bytes_held": self.bytes_held,
            "bytes_per_transition": self.bytes_held / self.size if self.size else 0.0,
            "compression_ratio": self.raw_bytes_held / self.bytes_held if self.bytes_held else 0.0,
            "capacity_transitions": self.capacity_transitions,
            "capacity_bytes": self.capacity_bytes,
            **self.counters,
        }


def _raw_bytes(chunk: CompressedChunk) -> int:
    """What the chunk's transitions would take uncompressed, frames stored once."""
    frames = (chunk.num_steps + spec.FRAME_STACK) * spec.FRAME_SIZE * spec.FRAME_SIZE
    return frames + chunk.nbytes - len(chunk.frame_data) - chunk.frame_offsets.nbytes
