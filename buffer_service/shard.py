"""One replay shard: codec + storage + rate limiter + snapshots, thread-safe.

A plain class (no Ray here). :mod:`buffer_service.ray_actor` runs it as a
threaded Ray actor with separate concurrency groups for inserts, samples and
everything else, where a blocked ``insert`` or ``sample`` waits in its own
thread on a condition variable while other calls go on; tests drive it
in-process with threads.

A sample holds the lock only to wait for the rate limiter, draw ids and take
references to the chunks they fall in; it decompresses and gathers outside
it (chunks are immutable), optionally on a small thread pool, so an insert
waits for the lock for microseconds, not for a whole batch's decoding.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from buffer_service.rate_limiter import RateLimiter, RateLimiterTimeout
from buffer_service.snapshot import SnapshotState, read_latest, write_snapshot
from buffer_service.storage import CompressedSample, ReplayStorage, SampledBatch
from td3drive.contracts.codec import CodecError, decode
from td3drive.contracts.config import ReplayConfig
from td3drive.contracts.storage import RunStorage

_T = TypeVar("_T")

RESTARTS_FILE = "restarts.json"
"""Written in the snapshot directory each time a shard comes back from a crash,
so the restart count survives further crashes between two snapshots."""


class ReplayShard:
    """A shard of the replay service.

    Args:
        config: the replay section; capacities and ``min_size_to_sample`` are
            split evenly over ``config.num_shards``.
        batch_size: the learner's batch size: the largest sample asked of
            one shard (sizes the rate limiter's deadlock-free tolerance).
        shard_index: this shard's index, for messages and stats.
        snapshot_dir: where :meth:`save` writes: a local path or a URI
            (``s3://``, ``gs://``, ``file://``; :class:`td3drive.contracts.storage.RunStorage`).
            When it holds a complete snapshot the shard starts from it. As a
            Ray actor the shard needs an absolute path or a URI (the driver
            passes one): a relative path is relative to this process's
            working directory.
        seed: sampling seed (offset by ``shard_index``).
        restarted: this process replaces one that died (the Ray wrapper passes
            ``was_current_actor_reconstructed``); counted in ``restarts``.
        decode_threads: threads that decompress the frames of a :meth:`sample`,
            ``≥ 1``; 1 decompresses in the calling thread (``lz4`` releases the
            GIL, so more threads help only where the shard has cores to spare).
            ``None``: ``config.sample_decode_threads`` when
            ``config.sample_transport`` is ``"decoded"``, else 1 (the learner
            decodes).

    Raises:
        ValueError: a tolerance too small for ``batch_size`` and ``chunk_steps``,
            or ``decode_threads < 1``.
        buffer_service.snapshot.SnapshotError: ``snapshot_dir`` holds a
            damaged snapshot with a valid done marker.
    """

    def __init__(
        self,
        config: ReplayConfig,
        batch_size: int,
        shard_index: int = 0,
        snapshot_dir: str | Path | None = None,
        seed: int = 0,
        restarted: bool = False,
        decode_threads: int | None = None,
    ) -> None:
        if decode_threads is None:
            decode_threads = (
                config.sample_decode_threads if config.sample_transport == "decoded" else 1
            )
        if decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        self.config = config
        self.decode_threads = decode_threads
        self._decode_pool = (
            ThreadPoolExecutor(decode_threads, thread_name_prefix="replay-decode")
            if decode_threads > 1
            else None
        )
        self.shard_index = shard_index
        # The snapshot directory's storage, and its location (absolute path or URI).
        self._snapshots = RunStorage(snapshot_dir) if snapshot_dir is not None else None
        self.snapshot_dir = self._snapshots.display if self._snapshots is not None else None
        self._storage = ReplayStorage(
            capacity_transitions=config.per_shard(config.capacity_transitions),
            capacity_bytes=config.per_shard(config.capacity_bytes),
            n_step=config.n_step,
            gamma=config.gamma,
            prioritized=config.prioritized,
            priority_alpha=config.priority_alpha,
            priority_beta=config.priority_beta,
            priority_eps=config.priority_eps,
            seed=seed + shard_index,
        )
        self._limiter = RateLimiter(
            min_size_to_sample=config.per_shard(config.min_size_to_sample),
            ratio=config.replay_ratio,
            tolerance=config.tolerance_for(batch_size),
            max_sample=batch_size,
            max_insert=config.chunk_steps,
        )
        self._cond = threading.Condition()
        self.policy_version = 0
        self._counters: dict[str, float] = {
            "rejected_payloads": 0,
            "insert_wait_s_total": 0.0,
            "sample_wait_s_total": 0.0,
            "insert_timeouts": 0,
            "sample_timeouts": 0,
            "snapshots_written": 0,
            "restarts": 0,
        }
        self._waiting = {"insert": 0, "sample": 0}
        self.restarted = restarted
        self.restored_from: str | None = None
        if self._snapshots is not None:
            self._restore(self._snapshots)
        self._load_restart_count()
        if restarted:
            self._counters["restarts"] += 1
            self._save_restart_count()

    def _load_restart_count(self) -> None:
        """Take the larger of the snapshot's restart count and the one in
        :data:`RESTARTS_FILE`, which is newer when the shard died again before
        its next snapshot. Without a snapshot directory the count of earlier
        processes is lost (a restarted shard then counts 1)."""
        if self._snapshots is None:
            return
        # No file (never restarted) or a damaged one: the snapshot's count stands.
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = int(json.loads(self._snapshots.read_text(RESTARTS_FILE))["restarts"])
            self._counters["restarts"] = max(self._counters["restarts"], saved)

    def _save_restart_count(self) -> None:
        """Persist the restart count; a failed write (e.g. a full disk) must not
        stop the shard from starting: the count then lives until the next
        snapshot in memory only."""
        if self._snapshots is not None:
            text = json.dumps({"restarts": self._counters["restarts"]}) + "\n"
            with contextlib.suppress(OSError):
                self._snapshots.write_text(RESTARTS_FILE, text)

    # ------------------------------------------------------------ writing
    def insert(self, payload: bytes) -> dict[str, int]:
        """Decode, validate and store one chunk, waiting while collection is
        ahead of the target replay ratio.

        Returns:
            ``{"size": transitions held, "evicted": chunks evicted}``.

        Raises:
            CodecError: the payload is invalid (including not bytes) or longer
                than ``chunk_steps``; nothing was inserted (counted in
                ``rejected_payloads``).
            RateLimiterTimeout: waited ``rate_limit_timeout_s`` without a
                sample making room; nothing was inserted.
        """
        try:
            chunk = decode(payload)
            if chunk.num_steps > self.config.chunk_steps:
                raise CodecError(
                    f"chunk of {chunk.num_steps} steps exceeds replay.chunk_steps "
                    f"({self.config.chunk_steps})"
                )
        except CodecError:
            with self._cond:
                self._counters["rejected_payloads"] += 1
            raise
        steps = chunk.num_steps
        with self._cond:
            self._wait(lambda: self._limiter.can_insert(steps), "insert")
            evicted = self._storage.insert(chunk)
            self._limiter.record_insert(steps)
            self.policy_version = max(self.policy_version, int(chunk.versions.max()))
            self._cond.notify_all()
            return {"size": self._storage.size, "evicted": evicted}

    # ------------------------------------------------------------ sampling
    def sample(self, batch_size: int) -> SampledBatch:
        """Sample ``batch_size`` transitions, waiting until
        ``min_size_to_sample`` is reached and while the learner is ahead of
        the target replay ratio.

        The lock is held to wait, draw the ids and count the sample; the
        frames are decompressed (on the decode pool, if any) and the batch
        gathered after it is released.

        Returns:
            The batch, ids, policy versions and ``shard_size`` (transitions
            held when the ids were drawn).

        Raises:
            RateLimiterTimeout: waited ``rate_limit_timeout_s``.
            ValueError: ``batch_size < 1``.
        """
        plan = self._take_sample(batch_size, self._storage.plan_sample)
        return plan.gather(self._decode_pool, self.decode_threads)

    def _sample_legacy(self, batch_size: int) -> SampledBatch:
        """:meth:`sample` as it was first written: decoded under the lock by the
        per-row loop. The same batch for the same sampling RNG state; kept for
        the equivalence tests and as ``bench replay``'s baseline."""
        return self._take_sample(
            batch_size, lambda size: self._storage.sample(size, method="legacy")
        )

    def sample_compressed(self, batch_size: int) -> CompressedSample:
        """:meth:`sample` with the frames left compressed, each distinct frame
        once (``replay.sample_transport: compressed``), to be decoded by the
        caller (:meth:`CompressedSample.decode`, which returns what
        :meth:`sample` would have for the same draw, ``shard_size`` included).

        Raises:
            RateLimiterTimeout: waited ``rate_limit_timeout_s``.
            ValueError: ``batch_size < 1``.
        """
        return self._take_sample(batch_size, self._storage.plan_sample).compressed()

    def _take_sample(self, batch_size: int, take: Callable[[int], _T]) -> _T:
        """Under the lock: wait for the rate limiter, ``take(batch_size)``
        from the storage, count the sample and wake waiting inserts."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        with self._cond:
            self._wait(lambda: self._limiter.can_sample(batch_size), "sample")
            taken = take(batch_size)
            self._limiter.record_sample(batch_size)
            self._cond.notify_all()
            return taken

    def release_rate_limit(self) -> None:
        """Stop enforcing the replay ratio (``min_size_to_sample`` still holds)
        and wake every waiting call.

        The driver calls this when collection ends: the last inserts and
        samples of a run must not wait on each other across shards (a final
        chunk blocked on one shard while the learner's sample waits on another
        would never resolve).
        """
        with self._cond:
            self._limiter.ratio = None
            self._cond.notify_all()

    def update_priorities(self, ids: np.ndarray, td_errors: np.ndarray) -> int:
        """See :meth:`buffer_service.storage.ReplayStorage.update_priorities`."""
        with self._cond:
            return self._storage.update_priorities(ids, td_errors)

    def _wait(self, allowed: Callable[[], bool], side: str) -> None:
        if allowed():
            return
        timeout = self.config.rate_limit_timeout_s
        start = time.monotonic()
        self._waiting[side] += 1
        try:
            while not allowed():
                remaining = start + timeout - time.monotonic()
                if remaining <= 0:
                    self._counters[f"{side}_timeouts"] += 1
                    raise RateLimiterTimeout(
                        f"replay shard {self.shard_index}: {side} waited {timeout:g} s for "
                        f"the {'learner' if side == 'insert' else 'rollout workers'} "
                        f"({self._limiter.describe()}, size={self._storage.size})"
                    )
                self._cond.wait(remaining)
        finally:
            self._waiting[side] -= 1
            self._counters[f"{side}_wait_s_total"] += time.monotonic() - start

    # ------------------------------------------------------------ inspect
    def size(self) -> int:
        """Transitions held."""
        with self._cond:
            return self._storage.size

    def priorities(self) -> np.ndarray | None:
        """A copy of the live transitions' priorities ``p^α = (|δ| + ε)^α`` in id
        order (``float64[size]``; a transition never re-prioritised holds the
        largest priority seen when it was inserted), or ``None`` without
        prioritized sampling. Read-only; for tests and diagnostics."""
        with self._cond:
            return self._storage.priorities_of_live()

    def stats(self) -> dict[str, Any]:
        """Size, bytes, compression, counters, waits and rate-limiter state (JSON-able).

        Counters marked *cumulative* cover the shard's whole life: they are
        saved in every snapshot and restored with it, so after a crash they
        are the last snapshot's values plus what came after the restart.
        Transitions a shard acknowledged after its last snapshot and then lost
        in a crash are therefore missing from ``inserted_transitions``:
        ``Σ pushed − Σ rejected − Σ inserted_transitions`` over the writers
        and shards is what was lost (pushes still in flight aside).

        Returns:
            ``shard`` (index), ``pid`` (this process; changes on a restart),
            storage: ``size``, ``chunks`` (held), ``bytes_held``,
            ``bytes_per_transition``, ``compression_ratio``,
            ``capacity_transitions``, ``capacity_bytes``; cumulative counts:
            ``inserted_transitions``, ``inserted_chunks``, ``sampled_transitions``,
            ``evicted_chunks``, ``evicted_transitions``,
            ``stale_priority_updates``, ``rejected_payloads`` (chunks refused
            as invalid), ``insert_timeouts``, ``sample_timeouts``,
            ``snapshots_written``, ``restarts`` (times this shard came back
            after its process died); cumulative seconds:
            ``insert_wait_s_total``, ``sample_wait_s_total``; gauges:
            ``waiting_inserts``, ``waiting_samples`` (calls blocked by the rate
            limiter now); ``restarted`` (bool: this process replaced a dead
            one), ``rate_limiter_inserted``, ``rate_limiter_sampled``,
            ``rate_limiter_debt``, ``policy_version`` (newest seen),
            ``restored_from`` (snapshot path loaded at start, or ``None``),
            ``decode_threads`` (threads that decompress a :meth:`sample`).
        """
        with self._cond:
            return {
                "shard": self.shard_index,
                "pid": os.getpid(),
                **self._storage.stats(),
                **self._counters,
                "waiting_inserts": self._waiting["insert"],
                "waiting_samples": self._waiting["sample"],
                "restarted": self.restarted,
                "rate_limiter_inserted": self._limiter.inserted,
                "rate_limiter_sampled": self._limiter.sampled,
                "rate_limiter_debt": self._limiter.debt,
                "policy_version": self.policy_version,
                "restored_from": self.restored_from,
                "decode_threads": self.decode_threads,
            }

    # ------------------------------------------------------------ snapshots
    def save(self, directory: str | Path | None = None) -> str:
        """Write a snapshot atomically; inserts and samples wait only while
        the chunk list and counters are copied, not while the file is written.

        Args:
            directory: where to write (a path or a URI); ``None`` = the
                shard's ``snapshot_dir``.

        Returns:
            The snapshot's data file location (absolute path or URI).

        Raises:
            ValueError: no directory given and none configured.
            OSError: (:class:`td3drive.contracts.storage.StorageError`) the write failed;
                the previous snapshot is intact.
        """
        storage = RunStorage(directory) if directory is not None else self._snapshots
        if storage is None:
            raise ValueError("save() needs a directory (none was configured)")
        with self._cond:
            state = SnapshotState(
                header={
                    "shard": self.shard_index,
                    "next_id": self._storage.next_id,
                    "storage_counters": dict(self._storage.counters),
                    "rate_limiter": self._limiter.state(),
                    "policy_version": self.policy_version,
                    "max_priority": self._storage.max_priority,
                    "counters": dict(self._counters),
                },
                chunks=self._storage.chunks(),
                priorities=self._storage.priorities_of_live(),
            )
        path = write_snapshot(storage, state)
        with self._cond:
            self._counters["snapshots_written"] += 1
        return path

    def restore(self, directory: str | Path) -> bool:
        """Load the newest complete snapshot in ``directory`` (a path or a
        URI), if any.

        Returns:
            Whether a snapshot was loaded.

        Raises:
            buffer_service.snapshot.SnapshotError: a damaged snapshot.
            td3drive.contracts.storage.StorageError: the storage cannot be reached.
        """
        return self._restore(RunStorage(directory))

    def _restore(self, storage: RunStorage) -> bool:
        found = read_latest(storage)
        if found is None:
            return False
        path, state = found
        header = state.header
        with self._cond:
            self._storage.restore(
                state.chunks,
                next_id=int(header["next_id"]),
                counters={k: int(v) for k, v in header["storage_counters"].items()},
                priorities=state.priorities,
                max_priority=float(header["max_priority"]),
            )
            self._limiter.load_state(header["rate_limiter"])
            self.policy_version = int(header["policy_version"])
            self._counters.update(header["counters"])
            self.restored_from = path
            self._cond.notify_all()
        return True
