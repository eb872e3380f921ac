"""Replay shards as Ray actors, and the clients both sides use.

This is the only module of ``buffer_service/`` that imports Ray.

* :func:`remote_shard_class`: :class:`ReplayShard` as a *threaded* actor with
  three Ray concurrency groups (``insert``, ``sample``, ``control``), so calls
  blocked by the rate limiter wait in their own group's threads while every
  other call (size, stats, snapshots, releases, priority updates) proceeds,
  however many inserts are blocked.
* :class:`ReplayWriter` (rollout workers): round-robin pushes that skip a shard
  holding its share of the ``max_in_flight`` outstanding; when the shards are
  slow or the rate limiter holds inserts back, ``push`` waits instead of
  queueing payloads in memory.
* :class:`ReplaySampler` (learner): samples every shard in parallel,
  proportionally to their sizes (which come back with each sample), with one
  call per shard per batch and ``prefetch`` batches requested ahead by a
  background thread; under prioritized replay it sends each batch's TD errors
  back to the shards the samples came from, with a bounded number of priority
  updates in flight. When the replay gives no batch for
  ``replay.rate_limit_timeout_s`` it fails with :class:`ReplayTimeoutError`
  on every later call until :meth:`ReplaySampler.reset`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError

from buffer_service import shard as _shard
from buffer_service.rate_limiter import RateLimiterTimeout
from buffer_service.storage import CompressedSample, SampledBatch
from td3drive.contracts.codec import CodecError, payload_steps
from td3drive.contracts.config import ReplayConfig
from td3drive.contracts.spec import Batch

log = logging.getLogger(__name__)

INSERT_THREADS = 16
"""Default threads of a shard's ``insert`` concurrency group.

Each writer keeps at most ``ceil(replay.max_pushes_in_flight / num_shards)``
pushes on one shard, so up to ``num_workers`` times that many inserts can be
at a shard at once. Those beyond the group's threads wait in Ray's queue for
the group, holding no thread; as the ``sample`` and ``control`` groups have
threads of their own, no number of blocked or queued inserts can delay a
sample, size, stats, snapshot or release. The group's size only bounds how
many inserts decode at once (decoding is CPU-bound on the shard's one CPU, so
more threads would not insert faster) and how many wait inside the shard
rather than in Ray's queue; 16 covers 16 workers with 4 pushes in flight over
4 shards (deploy/cluster.yaml) without queueing."""


def sample_threads(prefetch_batches: int) -> int:
    """Threads of a shard's ``sample`` group: ``prefetch_batches + 1``.

    The learner's :class:`ReplaySampler` keeps up to ``prefetch_batches``
    samples requested from every shard at once, so that many must be able to
    run at once (decoding outside the lock, in parallel when the shard has the
    cores); the one more lets a new sample start while an abandoned one (the
    sampler was reset) still waits out its rate-limiter timeout."""
    return prefetch_batches + 1


SAMPLE_THREADS = sample_threads(2)
"""``sample`` group threads for the default ``replay.prefetch_batches`` (2)."""

CONTROL_THREADS = 4
"""Threads of a shard's ``control`` group (size, stats, save, restore,
release_rate_limit, update_priorities, priorities): none of these waits on
the rate limiter, so they only queue behind each other (a ``save`` writing
its file holds one thread)."""

SAMPLE_REPLY_GRACE_S = 30.0
"""How much longer than ``timeout_s`` the sampler waits for a shard's sample
reply, so that a shard's own :class:`RateLimiterTimeout` (which names the
rate-limiter state) arrives before the sampler gives up on the shard."""


class ReplayTimeoutError(TimeoutError):
    """The replay service gave the learner no batch within
    ``replay.rate_limit_timeout_s``: the shards hold too little data for the
    replay ratio (no rollout worker inserting, ``min_size_to_sample`` not
    reached) or do not answer (dead, restarting, overloaded).

    Raised by :class:`ReplaySampler` and out of the learner's ``train``; a
    driver catches it, then retries with a fresh sampler
    (``LearnerActor.reset_sampler``) or stops the run with the message.

    Attributes:
        timeout_s: the timeout that expired, s.
        reason: what the sampler saw (e.g. a shard's rate-limiter state).
    """

    def __init__(self, timeout_s: float, reason: str) -> None:
        super().__init__(
            f"no replay batch within {timeout_s:g} s (replay.rate_limit_timeout_s): {reason}"
        )
        self.timeout_s = timeout_s
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (type(self), (self.timeout_s, self.reason))


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _in_group(name: str) -> Callable[[_Method], _Method]:
    """``ray.method(concurrency_group=name)``, typed as keeping the method's
    signature (Ray's stubs type the result as a remote method, which mypy
    then sees as an incompatible override of the plain class's method)."""
    decorate: Any = ray.method(concurrency_group=name)
    return decorate


class ReplayShard(_shard.ReplayShard):
    """:class:`buffer_service.shard.ReplayShard` as Ray runs it: each method in
    its concurrency group (``insert``; ``sample``; everything else in
    ``control``), and a restart by Ray counted in ``stats()["restarts"]``.

    Same name as the plain class, so Ray's state API lists shards as
    ``ReplayShard``. Arguments as for the plain class.
    """

    def __init__(
        self,
        config: ReplayConfig,
        batch_size: int,
        shard_index: int = 0,
        snapshot_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        super().__init__(config, batch_size, shard_index, snapshot_dir, seed, restarted=restarted)

    @_in_group("insert")
    def insert(self, payload: bytes) -> dict[str, int]:
        return super().insert(payload)

    @_in_group("sample")
    def sample(self, batch_size: int) -> SampledBatch:
        return super().sample(batch_size)

    @_in_group("sample")
    def sample_compressed(self, batch_size: int) -> CompressedSample:
        return super().sample_compressed(batch_size)

    @_in_group("control")
    def release_rate_limit(self) -> None:
        super().release_rate_limit()

    @_in_group("control")
    def update_priorities(self, ids: np.ndarray, td_errors: np.ndarray) -> int:
        return super().update_priorities(ids, td_errors)

    @_in_group("control")
    def size(self) -> int:
        return super().size()

    @_in_group("control")
    def priorities(self) -> np.ndarray | None:
        return super().priorities()

    @_in_group("control")
    def stats(self) -> dict[str, Any]:
        return super().stats()

    @_in_group("control")
    def save(self, directory: str | Path | None = None) -> str:
        return super().save(directory)

    @_in_group("control")
    def restore(self, directory: str | Path) -> bool:
        return super().restore(directory)


def remote_shard_class(
    max_concurrency: int = INSERT_THREADS,
    num_cpus: float = 1.0,
    sample_concurrency: int = SAMPLE_THREADS,
) -> Any:
    """:class:`ReplayShard` as a threaded Ray actor class that Ray restarts when
    it dies (the restarted shard reloads its last snapshot from
    ``snapshot_dir`` and counts the restart in ``stats()["restarts"]``).

    Concurrency groups: ``insert`` (``max_concurrency`` threads, see
    :data:`INSERT_THREADS`), ``sample`` (``sample_concurrency``) and
    ``control`` (:data:`CONTROL_THREADS`): a blocked insert never delays a
    sample, size, stats, snapshot or release, whatever the worker count.

    Args:
        max_concurrency: threads of the ``insert`` group, ``≥ 1``.
        num_cpus: CPUs reserved per shard.
        sample_concurrency: threads of the ``sample`` group, ``≥ 1``
            (:func:`sample_threads` of ``replay.prefetch_batches``).

    Returns:
        The actor class; ``.remote(config, batch_size, shard_index, snapshot_dir, seed)``.

    Raises:
        ValueError: ``max_concurrency < 1`` or ``sample_concurrency < 1``.
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency (insert threads) must be >= 1")
    if sample_concurrency < 1:
        raise ValueError("sample_concurrency (sample threads) must be >= 1")
    # Ray's stubs omit max_concurrency and concurrency_groups, actor options.
    return ray.remote(  # type: ignore[call-overload]
        num_cpus=num_cpus,
        max_restarts=-1,
        max_concurrency=CONTROL_THREADS,  # the default group: methods not assigned above
        concurrency_groups={
            "insert": max_concurrency,
            "sample": sample_concurrency,
            "control": CONTROL_THREADS,
        },
    )(ReplayShard)


class ReplayWriter:
    """Pushes encoded chunks to shards with bounded in-flight pushes.

    Pushes go round-robin, skipping a shard that already holds
    ``ceil(max_in_flight / len(shards))`` of this writer's pushes. Strict
    round-robin could deadlock with per-shard rate limits: a shard that is
    ahead on inserts holds its pushes until the learner samples it, every
    slot of the writer ends up waiting on that shard, the other shard
    starves, and the learner's sample, which needs every shard, waits on the
    starved one. Skipping the busy shard keeps feeding the others, so one of
    the two sides always moves (a 16k-step CPU training hung this way after
    11.5k steps).

    Args:
        shards: shard actor handles.
        max_in_flight: pushes outstanding at most; ``push`` waits beyond it.
        first_shard: where the round-robin starts (spread workers over shards).
        skip_after_s: how long a push waits for its round-robin shard to
            settle this writer's earlier pushes before it skips that shard, s;
            a normal insert settles in milliseconds, so shards stay balanced.

    Attributes:
        pushed, rejected: payloads sent, and refused by a shard as invalid.
        lost: payloads whose shard died before acknowledging them.
        pushed_transitions, rejected_transitions, lost_transitions: the same
            counted in transitions (a chunk's steps).
        wait_s_total: seconds ``push`` spent waiting for a free slot.

    The transitions lost to shard crashes are ``Σ pushed_transitions −
    Σ rejected_transitions − Σ inserted_transitions`` (summed over writers and
    shards, once nothing is in flight); ``lost_transitions`` is only the part
    a writer saw (a shard that died before acknowledging), not chunks a shard
    acknowledged and then lost because it died before its next snapshot.
    """

    def __init__(
        self,
        shards: Sequence[Any],
        max_in_flight: int = 4,
        first_shard: int = 0,
        skip_after_s: float = 0.1,
    ) -> None:
        if not shards:
            raise ValueError("ReplayWriter needs at least one shard")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self._shards = list(shards)
        self._next = first_shard % len(self._shards)
        self.max_in_flight = max_in_flight
        self._in_flight: list[ray.ObjectRef] = []
        self._shard_of: dict[ray.ObjectRef, int] = {}
        self._steps_of: dict[ray.ObjectRef, int] = {}
        self._per_shard_cap = -(-max_in_flight // len(self._shards))
        self.skip_after_s = skip_after_s
        self.pushed = 0
        self.rejected = 0
        self.lost = 0
        self.pushed_transitions = 0
        self.rejected_transitions = 0
        self.lost_transitions = 0
        self.wait_s_total = 0.0

    @property
    def in_flight(self) -> int:
        """Pushes sent and not yet acknowledged."""
        return len(self._in_flight)

    @property
    def in_flight_transitions(self) -> int:
        """Transitions of the pushes sent and not yet acknowledged."""
        return sum(self._steps_of.values())

    def push(
        self, payload: bytes, timeout_s: float | None = None, transitions: int | None = None
    ) -> None:
        """Send one payload; first wait (up to ``timeout_s``) while
        ``max_in_flight`` pushes are outstanding.

        Args:
            payload: an encoded chunk (:func:`td3drive.contracts.codec.encode`).
            timeout_s: most seconds to wait for a free slot; ``None`` waits.
            transitions: the chunk's steps, for the transition counters;
                ``None`` reads them from the payload's header (0 when the
                header is unreadable: the shard will reject the payload).

        Raises:
            TimeoutError: no slot freed within ``timeout_s``; nothing was sent.
            ray.exceptions.RayTaskError: a shard failed an earlier push for a
                reason other than an invalid payload (e.g. a rate-limiter timeout).
        """
        if transitions is None:
            try:
                transitions = payload_steps(payload)
            except CodecError:
                transitions = 0
        start = time.monotonic()
        try:
            while (index := self._free_shard()) is None:
                remaining = None if timeout_s is None else start + timeout_s - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no push slot freed within {timeout_s:g} s")
                self._reap(remaining)
        finally:
            self.wait_s_total += time.monotonic() - start
        self._next = (index + 1) % len(self._shards)
        ref = self._shards[index].insert.remote(payload)
        self._in_flight.append(ref)
        self._shard_of[ref] = index
        self._steps_of[ref] = transitions
        self.pushed += 1
        self.pushed_transitions += transitions

    def in_flight_per_shard(self) -> list[int]:
        """This writer's outstanding pushes, by shard index."""
        counts = [0] * len(self._shards)
        for ref in self._in_flight:
            counts[self._shard_of[ref]] += 1
        return counts

    def _free_shard(self) -> int | None:
        """The shard for the next push, or ``None`` while every slot is taken:
        the next in round-robin order that holds fewer than
        ``ceil(max_in_flight / shards)`` of this writer's pushes (after up to
        ``skip_after_s`` for the round-robin shard), so a shard that holds its
        pushes can never take every slot."""
        self._reap(0, every_ready=True)  # count only pushes that are really outstanding
        if len(self._in_flight) >= self.max_in_flight:
            return None
        counts = self.in_flight_per_shard()
        if counts[self._next] >= self._per_shard_cap and self.skip_after_s > 0:
            mine = [ref for ref in self._in_flight if self._shard_of[ref] == self._next]
            ray.wait(mine, num_returns=len(mine), timeout=self.skip_after_s)
            self._reap(0, every_ready=True)
            counts = self.in_flight_per_shard()
        order = [(self._next + k) % len(self._shards) for k in range(len(self._shards))]
        return next((i for i in order if counts[i] < self._per_shard_cap), None)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every push has been acknowledged.

        Raises:
            TimeoutError: pushes still outstanding after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._in_flight:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"{len(self._in_flight)} pushes outstanding after {timeout_s} s")
            self._reap(remaining)

    def _reap(self, timeout: float | None, every_ready: bool = False) -> None:
        """Settle finished pushes: the first to finish within ``timeout``, or
        with ``every_ready`` all that have finished by then."""
        if not self._in_flight:
            return
        wanted = len(self._in_flight) if every_ready else 1
        ready, self._in_flight = ray.wait(self._in_flight, num_returns=wanted, timeout=timeout)
        for ref in ready:
            self._shard_of.pop(ref, None)
            steps = self._steps_of.pop(ref, 0)
            try:
                ray.get(ref)
            except RayActorError as exc:  # the shard died mid-insert; Ray restarts it
                self.lost += 1
                self.lost_transitions += steps
                log.warning("replay shard died during a push; chunk lost (%s)", type(exc).__name__)
            except RayTaskError as exc:
                if isinstance(exc.cause, CodecError):
                    self.rejected += 1
                    self.rejected_transitions += steps
                    log.warning("replay shard rejected a chunk: %s", exc.cause)
                else:
                    raise


@dataclass(frozen=True)
class ShardedSample:
    """A batch drawn from several shards.

    Attributes:
        sampled: the concatenated batch, ids and policy versions.
        shard_index: ``int64[B]``, the shard each sample came from.
    """

    sampled: SampledBatch
    shard_index: np.ndarray


def split_proportionally(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` samples over shards in proportion to ``sizes``
    (largest remainder); equally when all sizes are 0."""
    weights = np.asarray(sizes, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(len(sizes))
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


@dataclass(eq=False)
class _Prefetch:
    """One prefetch thread and what it owns: a reset starts a new one, and a
    thread that outlives its reset can only touch its own queue."""

    queue: queue.Queue[ShardedSample | BaseException]
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None


class ReplaySampler:
    """Keeps up to ``prefetch`` batches requested or ready, each sampled from
    all shards in parallel in proportion to their sizes.

    A background thread samples. Each batch costs one call per shard, all sent
    at once: a ``sample`` of the shard's share, whose reply carries the
    shard's size (``SampledBatch.shard_size``) for splitting later batches,
    or a ``size`` query for a shard whose share is 0. The shards' sizes are
    asked once when the thread starts (and after a shard failed); later
    splits use the sizes of the latest replies, at most ``prefetch`` batches
    old. While the learner trains, up to ``prefetch`` batches are being
    sampled or wait in the queue, so the round trip is hidden. When sampling
    fails (see :meth:`poll`) the thread ends and its error is raised by every
    later :meth:`poll` / :meth:`next` until :meth:`reset` starts a fresh thread.

    Args:
        shards: shard actor handles.
        batch_size: transitions per batch.
        prefetch: batches requested ahead or ready to hand out, ``≥ 1``
            (bounds the queue and the requests in flight: at most
            ``prefetch + 1`` batches exist at once, one of them being joined).
        timeout_s: the replay timeout (``replay.rate_limit_timeout_s``), s:
            how long :meth:`next` waits for a batch, how long the shards get to
            answer a size query, how long sampling may keep failing because a
            shard is dead before it gives up, and how long
            :meth:`update_priorities` waits for a shard to settle earlier
            priority updates.
        max_priority_batches_in_flight: batches whose priority updates may be
            unacknowledged at once; :meth:`update_priorities` waits beyond it.
        transport: ``"decoded"``: shards send decoded samples (``sample``);
            ``"compressed"``: shards send each distinct frame LZ4-compressed
            (``sample_compressed``) and the sampler's thread decodes them
            (``replay.sample_transport``).
        decode_threads: with ``"compressed"``, threads that decompress the
            frames (``replay.sample_decode_threads``; 1 = the sampler's thread).

    Attributes:
        batches: batches handed out.
        sample_requests: ``sample`` calls sent to shards (one per shard in a
            batch, prefetched batches included).
        size_queries: ``size`` calls sent to shards: one per shard when a
            prefetch thread starts or a shard failed, and one per batch to each
            shard whose share of the batch was 0 (the others report their size
            with their sample).
        shard_failures: samples retried because a shard was dead.
        priority_batches: batches whose TD errors were sent to the shards.
        priority_transitions_updated: transitions the shards acknowledged as
            live and re-prioritised (evicted ones are skipped; each shard counts
            them in its ``stale_priority_updates``).
        priority_transitions_lost: transitions whose shard died before it
            acknowledged their update (the restarted shard keeps its snapshot's).
        priority_wait_s_total: seconds :meth:`update_priorities` waited for a slot.
        resets: times :meth:`reset` started a fresh prefetch thread.
    """

    def __init__(
        self,
        shards: Sequence[Any],
        batch_size: int,
        prefetch: int = 2,
        timeout_s: float = 600.0,
        max_priority_batches_in_flight: int = 2,
        transport: str = "decoded",
        decode_threads: int = 1,
    ) -> None:
        if max_priority_batches_in_flight < 1:
            raise ValueError("max_priority_batches_in_flight must be >= 1")
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        if transport not in ("decoded", "compressed"):
            raise ValueError(f"transport must be 'decoded' or 'compressed', got {transport!r}")
        if decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        self.transport = transport
        self.decode_threads = decode_threads
        self._decode_pool = (
            ThreadPoolExecutor(decode_threads, thread_name_prefix="sampler-decode")
            if transport == "compressed" and decode_threads > 1
            else None
        )
        self._shards = list(shards)
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.prefetch = prefetch
        self._lock = threading.Lock()
        self._prefetch = _Prefetch(queue.Queue(maxsize=prefetch))
        self.batches = 0
        self.shard_failures = 0
        self.resets = 0
        self.sample_requests = 0
        self.size_queries = 0
        self.max_priority_batches_in_flight = max_priority_batches_in_flight
        # One entry per batch: its (ref, transitions) per shard, oldest first.
        self._priority_in_flight: deque[list[tuple[ray.ObjectRef, int]]] = deque()
        self.priority_batches = 0
        self.priority_transitions_updated = 0
        self.priority_transitions_lost = 0
        self.priority_wait_s_total = 0.0

    @property
    def error(self) -> BaseException | None:
        """Why the current prefetch thread stopped sampling, or ``None``."""
        return self._prefetch.error

    def poll(self, timeout_s: float) -> ShardedSample | None:
        """The next batch, or ``None`` if none is ready within ``timeout_s``
        while sampling is still going (for a loop that checks a stop flag
        between short waits). Starts the prefetch thread on first use.

        Raises:
            ReplayTimeoutError: sampling failed for lack of data or answers: a
                shard's rate limiter timed out (too little data for
                ``replay.rate_limit_timeout_s``), the shards did not answer
                within it, or a shard stayed dead that long. Raised again by
                every later call until :meth:`reset`.
            Exception: any other error sampling raised in the background (e.g.
                a shard's ``ValueError``), likewise raised again until
                :meth:`reset`.
        """
        prefetch = self._started()
        if prefetch.error is not None:
            raise prefetch.error
        try:
            item = prefetch.queue.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        self.batches += 1
        return item

    def next(self, timeout_s: float | None = None) -> ShardedSample:
        """The next batch (starts the prefetch thread on first use).

        Args:
            timeout_s: overrides the sampler's ``timeout_s`` for this call.

        Raises:
            ReplayTimeoutError: nothing arrived within the timeout (a
                ``TimeoutError``), or as :meth:`poll`.
            Exception: as :meth:`poll`.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        item = self.poll(timeout)
        if item is None:
            raise ReplayTimeoutError(timeout, "no batch was ready; the shards are still sampling")
        return item

    def reset(self) -> None:
        """Drop the failed (or running) prefetch thread, its error and its ready
        batches; the next :meth:`poll`/:meth:`next` starts a fresh thread.

        Priority updates in flight and the counters are kept. A thread still
        inside a shard call ends when that call returns, without delivering.
        """
        self.close()
        self.resets += 1

    def _started(self) -> _Prefetch:
        with self._lock:
            prefetch = self._prefetch
            if prefetch.thread is None:
                prefetch.thread = threading.Thread(
                    target=self._fill, args=(prefetch,), name="replay-prefetch", daemon=True
                )
                prefetch.thread.start()
            return prefetch

    def update_priorities(self, sample: ShardedSample, td_errors: np.ndarray) -> None:
        """Send each sample's absolute TD error to the shard it came from, which
        sets its priority to ``(|δ| + ε)^α`` (Schaul et al. 2016, §3.3).

        Row ``i`` goes to shard ``sample.shard_index[i]`` with id
        ``sample.sampled.ids[i]``: one ``update_priorities`` call per shard
        present in the batch. The calls are not awaited, but at most
        ``max_priority_batches_in_flight`` batches stay unacknowledged: beyond
        that this waits for the oldest batch's acknowledgements (milliseconds
        normally; the time is counted in :attr:`priority_wait_s_total`).

        Args:
            sample: the batch the TD errors belong to, as :meth:`next` returned it.
            td_errors: ``float[B]``, finite, in the batch's row order; the sign
                is ignored.

        Raises:
            ValueError: ``td_errors`` has the wrong shape or holds NaN/inf;
                nothing was sent.
            TimeoutError: the shards did not settle earlier updates within
                ``timeout_s``.
            Exception: a shard refused an earlier update (e.g. ``ValueError``
                from a shard without prioritized sampling), re-raised here.
        """
        errors = np.asarray(td_errors, dtype=np.float32)
        ids = sample.sampled.ids
        if errors.shape != ids.shape:
            raise ValueError(f"{ids.shape[0]} samples but TD errors of shape {errors.shape}")
        if not np.isfinite(errors).all():
            raise ValueError("TD errors contain NaN or inf; no priorities were sent")
        self._settle_priorities(self.max_priority_batches_in_flight - 1)
        sent = []
        for index, shard in enumerate(self._shards):
            mask = sample.shard_index == index
            if mask.any():
                ref = shard.update_priorities.remote(ids[mask], errors[mask])
                sent.append((ref, int(mask.sum())))
        self._priority_in_flight.append(sent)
        self.priority_batches += 1

    def flush_priorities(self, timeout_s: float | None = None) -> None:
        """Wait until every priority update sent so far has been acknowledged.

        Raises:
            TimeoutError: updates still outstanding after ``timeout_s``
                (default: the sampler's ``timeout_s``).
            Exception: as :meth:`update_priorities`.
        """
        self._settle_priorities(0, timeout_s)

    @property
    def priority_batches_in_flight(self) -> int:
        """Batches whose priority updates are not acknowledged yet."""
        return len(self._priority_in_flight)

    def _settle_priorities(self, at_most: int, timeout_s: float | None = None) -> None:
        """Collect acknowledged priority batches, oldest first, and wait (up to
        ``timeout_s``) until at most ``at_most`` batches remain outstanding."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        try:
            while self._priority_in_flight:
                oldest = self._priority_in_flight[0]
                refs = [ref for ref, _ in oldest]
                must_wait = len(self._priority_in_flight) > at_most
                remaining = max(0.0, start + timeout - time.monotonic()) if must_wait else 0.0
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=remaining)
                if len(ready) < len(refs):
                    if must_wait:
                        raise TimeoutError(
                            f"replay shards did not acknowledge priority updates within "
                            f"{timeout:g} s"
                        )
                    return
                self._priority_in_flight.popleft()
                for ref, count in oldest:
                    try:
                        self.priority_transitions_updated += int(ray.get(ref))
                    except RayActorError as exc:  # the shard died; Ray restarts it
                        self.priority_transitions_lost += count
                        log.warning(
                            "replay shard died during a priority update (%s)", type(exc).__name__
                        )
                    except RayTaskError as exc:
                        raise exc.as_instanceof_cause() from None
        finally:
            self.priority_wait_s_total += time.monotonic() - start

    def close(self) -> None:
        """Stop the prefetch thread (waiting up to 5 s for it); a later
        :meth:`poll`/:meth:`next` starts a fresh one."""
        with self._lock:
            old = self._prefetch
            self._prefetch = _Prefetch(queue.Queue(maxsize=self.prefetch))
        old.stop.set()
        while True:  # unblock a put() waiting for room
            try:
                old.queue.get_nowait()
            except queue.Empty:
                break
        if old.thread is not None:
            old.thread.join(timeout=5)

    def _fill(self, prefetch: _Prefetch) -> None:
        failing_since: float | None = None
        sizes: list[int] | None = None  # the shards' sizes, as their last replies gave them
        pending: deque[list[_Request]] = deque()  # batches requested, oldest first
        while not prefetch.stop.is_set():
            try:
                if sizes is None:
                    sizes = self._query_sizes(prefetch)
                    if sizes is None:
                        return  # stopped while waiting
                # Keep up to `prefetch` batches requested or ready (at least one
                # requested): the shards sample the next batches while this one
                # travels and the learner trains.
                while not pending or len(pending) + prefetch.queue.qsize() < self.prefetch:
                    pending.append(self._request(sizes))
                collected = self._collect(pending.popleft(), sizes, prefetch)
                if collected is None:
                    return  # stopped while waiting
                item: ShardedSample | BaseException = collected
                failing_since = None
            except RayActorError as exc:  # a shard died; Ray restarts it from its snapshot
                sizes = None  # the restarted shard holds its snapshot's transitions
                pending.clear()
                now = time.monotonic()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since < self.timeout_s:
                    log.warning("replay shard unavailable (%s); retrying", type(exc).__name__)
                    self.shard_failures += 1
                    prefetch.stop.wait(0.5)
                    continue
                item = ReplayTimeoutError(
                    self.timeout_s, f"a replay shard stayed unavailable ({type(exc).__name__})"
                )
            except BaseException as exc:  # surfaced to the caller of poll()/next()
                item = exc
            if isinstance(item, BaseException):
                prefetch.error = item  # before the put: every later poll() raises it
            while not prefetch.stop.is_set():
                try:
                    prefetch.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _query_sizes(self, prefetch: _Prefetch) -> list[int] | None:
        """Every shard's size (one call each); ``None`` if stopped meanwhile.

        Raises:
            ReplayTimeoutError: no answer within ``timeout_s``.
            RayActorError: a shard is dead.
        """
        self.size_queries += len(self._shards)
        refs = [shard.size.remote() for shard in self._shards]
        got = self._wait_all(refs, self.timeout_s, "a size query", prefetch)
        return None if got is None else [int(size) for size in got]

    def _request(self, sizes: Sequence[int]) -> list[_Request]:
        """Send one batch's requests to all shards at once: a sample to each
        shard whose share (in proportion to ``sizes``) is not 0, a size query
        to the others, so that every shard's size stays current."""
        requests = []
        for index, count in enumerate(split_proportionally(self.batch_size, sizes)):
            shard = self._shards[index]
            if count > 0:
                self.sample_requests += 1
                method = shard.sample_compressed if self.transport == "compressed" else shard.sample
                requests.append(_Request(index, count, method.remote(count)))
            else:
                self.size_queries += 1
                requests.append(_Request(index, 0, shard.size.remote()))
        return requests

    def _collect(
        self, requests: list[_Request], sizes: list[int], prefetch: _Prefetch
    ) -> ShardedSample | None:
        """Wait for one batch's replies, update ``sizes`` in place from them,
        and join the samples; ``None`` if stopped meanwhile.

        Raises:
            ReplayTimeoutError: no reply within ``timeout_s`` plus
                :data:`SAMPLE_REPLY_GRACE_S`, or a shard's rate limiter timed out.
            RayActorError: a shard is dead.
            Exception: any other error a shard raised.
        """
        replies = self._wait_all(
            [r.ref for r in requests],
            self.timeout_s + SAMPLE_REPLY_GRACE_S,
            "a sample",
            prefetch,
        )
        if replies is None:
            return None
        parts: list[SampledBatch] = []
        where: list[np.ndarray] = []
        for request, reply in zip(requests, replies, strict=True):
            if request.count == 0:
                sizes[request.shard] = int(reply)
                continue
            if isinstance(reply, CompressedSample):
                reply = reply.decode(self._decode_pool, self.decode_threads)
            if reply.shard_size is not None:
                sizes[request.shard] = int(reply.shard_size)
            parts.append(reply)
            where.append(np.full(reply.ids.shape[0], request.shard, np.int64))
        return ShardedSample(sampled=concatenate(parts), shard_index=np.concatenate(where))

    def _wait_all(
        self, refs: list[ray.ObjectRef], timeout_s: float, what: str, prefetch: _Prefetch
    ) -> list[Any] | None:
        """The values of ``refs``, waiting up to ``timeout_s`` in short slices
        so that a reset is not held up; ``None`` if ``prefetch`` is stopped
        first. A shard's error is raised as soon as its reply arrives.

        Raises:
            ReplayTimeoutError: the replies did not all arrive in time, or a
                shard's rate limiter timed out.
            RayActorError: a shard is dead.
            Exception: any other error a shard raised (as its own type).
        """
        deadline = time.monotonic() + timeout_s
        values: dict[ray.ObjectRef, Any] = {}
        waiting = list(refs)
        while waiting:
            if prefetch.stop.is_set():
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReplayTimeoutError(self.timeout_s, f"the replay shards did not answer {what}")
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=min(remaining, 0.5))
            for ref in ready:
                values[ref] = _get_reply(ref, self.timeout_s)
        return [values[ref] for ref in refs]


@dataclass(frozen=True)
class _Request:
    """One shard's part of a requested batch: a sample of ``count`` (an
    ``ObjectRef`` of a :class:`SampledBatch`), or with ``count == 0`` a size query."""

    shard: int
    count: int
    ref: ray.ObjectRef


def _get_reply(ref: ray.ObjectRef, timeout_s: float) -> Any:
    """``ray.get`` of a ready reply, with the shard's errors mapped as the
    sampler raises them (:meth:`ReplaySampler.poll`)."""
    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, RayActorError):
            raise exc.cause from None
        if isinstance(exc.cause, RateLimiterTimeout):
            raise ReplayTimeoutError(
                timeout_s,
                f"too little data to sample (are the rollout workers inserting?): {exc.cause}",
            ) from None
        raise exc.as_instanceof_cause() from None


def concatenate(parts: Sequence[SampledBatch]) -> SampledBatch:
    """Join samples from several shards into one.

    Importance weights (prioritized replay) are put on one scale. Shard ``s``
    returns ``w_i = (N_s·P_s(i))^−β / c_s`` with its own normaliser
    ``c_s = max_j (N_s·P_s(j))^−β`` (``weight_scale``). The sampler splits a
    batch over shards in proportion to their sizes ``N_s``, so a transition's
    probability in the whole replay is ``(N_s/N)·P_s(i)`` and its importance
    weight ``(N·(N_s/N)·P_s(i))^−β = w_i·c_s`` (Schaul et al. 2016, §3.4). The
    joined weights are ``w_i·c_s / max_s c_s``: normalised by the largest weight
    of the participating shards' live transitions, as one shard alone would be.

    ``shard_size`` of the result is the parts' total (``None`` if one lacks it).

    Raises:
        ValueError: some parts are weighted and others not, or a weighted part
            lacks its ``weight_scale``.
    """
    if len(parts) == 1:
        return parts[0]
    batches = [p.batch for p in parts]
    fields = {
        name: np.concatenate([getattr(b, name) for b in batches])
        for name in batches[0].arrays()
        if name != "weight"
    }
    weighted = [b.weight is not None for b in batches]
    weight = None
    scale = None
    if any(weighted):
        if not all(weighted) or any(p.weight_scale is None for p in parts):
            raise ValueError("cannot join prioritized and uniform samples")
        scales = [float(p.weight_scale or 0.0) for p in parts]
        scale = max(scales)
        weight = np.concatenate(
            [
                np.asarray(b.weight, np.float64) * (s / scale)
                for b, s in zip(batches, scales, strict=True)
            ]
        ).astype(np.float32)
    sizes = [p.shard_size for p in parts]
    return SampledBatch(
        batch=Batch(**fields, weight=weight),
        ids=np.concatenate([p.ids for p in parts]),
        policy_versions=np.concatenate([p.policy_versions for p in parts]),
        weight_scale=scale,
        shard_size=None if None in sizes else sum(s or 0 for s in sizes),
    )
