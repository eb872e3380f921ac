"""Replay shards as Ray actors, and the clients both sides use.

This is the only module of ``buffer_service/`` that imports Ray.

* :func:`remote_shard_class`: :class:`ReplayShard` as a *threaded* actor, so a
  call blocked by the rate limiter waits in its own thread while other calls
  (samples, stats, snapshots) proceed.
* :class:`ReplayWriter` (rollout workers): round-robin pushes that skip a shard
  holding its share of the ``max_in_flight`` outstanding; when the shards are
  slow or the rate limiter holds inserts back, ``push`` waits instead of
  queueing payloads in memory.
* :class:`ReplaySampler` (learner): samples every shard in parallel,
  proportionally to their sizes, into a bounded prefetch queue filled by a
  background thread; under prioritized replay it sends each batch's TD errors
  back to the shards the samples came from, with a bounded number of priority
  updates in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from buffer_service.codec import CodecError
from buffer_service.shard import ReplayShard
from buffer_service.storage import SampledBatch
from td3drive.spec import Batch

log = logging.getLogger(__name__)


def remote_shard_class(max_concurrency: int = 16, num_cpus: float = 1.0) -> Any:
    """``ReplayShard`` as a threaded Ray actor class that Ray restarts when it
    dies (the restarted shard reloads its last snapshot from ``snapshot_dir``).

    Returns:
        The actor class; ``.remote(config, batch_size, shard_index, snapshot_dir)``.
    """
    # Ray's stubs omit max_concurrency, an actor option.
    return ray.remote(  # type: ignore[call-overload]
        num_cpus=num_cpus, max_concurrency=max_concurrency, max_restarts=-1
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
        wait_s_total: seconds ``push`` spent waiting for a free slot.
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
        self._per_shard_cap = -(-max_in_flight // len(self._shards))
        self.skip_after_s = skip_after_s
        self.pushed = 0
        self.rejected = 0
        self.lost = 0
        self.wait_s_total = 0.0

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def push(self, payload: bytes, timeout_s: float | None = None) -> None:
        """Send one payload; first wait (up to ``timeout_s``) while
        ``max_in_flight`` pushes are outstanding.

        Raises:
            TimeoutError: no slot freed within ``timeout_s``.
            ray.exceptions.RayTaskError: a shard failed for a reason other
                than an invalid payload (e.g. a rate-limiter timeout).
        """
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
        self.pushed += 1

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
            try:
                ray.get(ref)
            except RayActorError as exc:  # the shard died mid-insert; Ray restarts it
                self.lost += 1
                log.warning("replay shard died during a push; chunk lost (%s)", type(exc).__name__)
            except RayTaskError as exc:
                if isinstance(exc.cause, CodecError):
                    self.rejected += 1
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


class ReplaySampler:
    """Keeps up to ``prefetch`` ready batches, each sampled from all shards in
    parallel in proportion to their sizes.

    Args:
        shards: shard actor handles.
        batch_size: transitions per batch.
        prefetch: batches kept ready (queue bound).
        timeout_s: how long :meth:`next` waits for a batch before raising, and
            how long :meth:`update_priorities` waits for a shard to settle
            earlier priority updates.
        max_priority_batches_in_flight: batches whose priority updates may be
            unacknowledged at once; :meth:`update_priorities` waits beyond it.

    Attributes:
        priority_batches: batches whose TD errors were sent to the shards.
        priority_transitions_updated: transitions the shards acknowledged as
            live and re-prioritised (evicted ones are skipped; each shard counts
            them in its ``stale_priority_updates``).
        priority_transitions_lost: transitions whose shard died before it
            acknowledged their update (the restarted shard keeps its snapshot's).
        priority_wait_s_total: seconds :meth:`update_priorities` waited for a slot.
    """

    def __init__(
        self,
        shards: Sequence[Any],
        batch_size: int,
        prefetch: int = 2,
        timeout_s: float = 600.0,
        max_priority_batches_in_flight: int = 2,
    ) -> None:
        if max_priority_batches_in_flight < 1:
            raise ValueError("max_priority_batches_in_flight must be >= 1")
        self._shards = list(shards)
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self._queue: queue.Queue[ShardedSample | BaseException] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.shard_failures = 0
        self.max_priority_batches_in_flight = max_priority_batches_in_flight
        # One entry per batch: its (ref, transitions) per shard, oldest first.
        self._priority_in_flight: deque[list[tuple[ray.ObjectRef, int]]] = deque()
        self.priority_batches = 0
        self.priority_transitions_updated = 0
        self.priority_transitions_lost = 0
        self.priority_wait_s_total = 0.0

    def next(self, timeout_s: float | None = None) -> ShardedSample:
        """The next batch (starts the prefetch thread on first use).

        Args:
            timeout_s: overrides the sampler's ``timeout_s`` for this call.

        Raises:
            TimeoutError: nothing arrived within the timeout.
            Exception: whatever sampling raised in the background (e.g. a
                shard's ``RateLimiterTimeout``), re-raised here.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._fill, name="replay-prefetch", daemon=True)
            self._thread.start()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no replay batch within {timeout:g} s") from None
        if isinstance(item, BaseException):
            raise item
        self.batches += 1
        return item

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
        """Stop the prefetch thread."""
        self._stop.set()
        while True:  # unblock a put() waiting for room
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item: ShardedSample | BaseException = self._sample_once()
            except RayActorError as exc:  # a shard died; Ray restarts it from its snapshot
                log.warning("replay shard unavailable (%s); retrying", type(exc).__name__)
                self.shard_failures += 1
                time.sleep(0.5)
                continue
            except BaseException as exc:  # surfaced to the caller of next()
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _sample_once(self) -> ShardedSample:
        try:
            sizes = ray.get([s.size.remote() for s in self._shards], timeout=self.timeout_s)
            counts = split_proportionally(self.batch_size, sizes)
            refs = [
                (index, self._shards[index].sample.remote(count))
                for index, count in enumerate(counts)
                if count > 0
            ]
            parts = ray.get([ref for _, ref in refs], timeout=self.timeout_s)
        except GetTimeoutError as exc:
            raise TimeoutError(f"replay shards did not answer within {self.timeout_s:g} s") from exc
        except RayTaskError as exc:
            if isinstance(exc.cause, RayActorError):
                raise exc.cause from None
            raise exc.as_instanceof_cause() from None
        return ShardedSample(
            sampled=concatenate([p for p in parts]),
            shard_index=np.concatenate(
                [
                    np.full(p.ids.shape[0], index, np.int64)
                    for (index, _), p in zip(refs, parts, strict=True)
                ]
            ),
        )


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
    return SampledBatch(
        batch=Batch(**fields, weight=weight),
        ids=np.concatenate([p.ids for p in parts]),
        policy_versions=np.concatenate([p.policy_versions for p in parts]),
        weight_scale=scale,
    )
