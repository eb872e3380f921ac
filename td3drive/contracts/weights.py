"""Versioned policy weights: how the learner's actor reaches the workers.

The learner publishes its actor head and encoder as a ``dict[str, numpy
array]`` (``TD3Learner.policy_weights``) with its update counter as the
*version* and its incarnation as the *generation*. Workers ask the board,
every few steps, for anything newer than what they hold; the learner never
waits on a worker. The board itself is a plain class;
:class:`rollout_workers.ray_actor.RayWeightsBoard` runs it as a small Ray
actor that stores the weights in Ray's object store itself, so that
published weights outlive the process that published them.

Ordering: a publication is newer when its ``(generation, version)`` is
larger, compared as a tuple. A learner that dies and is rebuilt from its last
checkpoint counts its updates from the checkpoint (e.g. 130 → 100): it
publishes with a larger generation, so its lower versions are accepted and
reach the workers, while a late publication of the dead learner (smaller
generation) is refused.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple


class Published(NamedTuple):
    """One publication on a :class:`WeightsBoard`.

    Attributes:
        generation: the publisher's incarnation (``≥ 0``; a restarted learner
            publishes with a larger one).
        version: the publisher's update counter (policy version) in that
            generation.
        ref: what was published (opaque here: a one-element list holding a
            Ray ``ObjectRef`` on the Ray board).
    """

    generation: int
    version: int
    ref: Any


class WeightsBoard:
    """The latest published weights reference, its version and generation.

    The reference is opaque here (a Ray ``ObjectRef`` in production, wrapped
    in a list so Ray passes it through instead of resolving it). Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._version = -1
        self._ref: Any = None

    def _accepts(self, generation: int, version: int) -> bool:
        return (generation, version) > (self._generation, self._version)

    def publish(self, version: int, ref: Any, generation: int = 0) -> bool:
        """Record ``ref`` as ``version`` of ``generation``.

        Args:
            version: the publisher's policy version (learner updates).
            ref: what workers will receive.
            generation: the publisher's incarnation, ``≥ 0``; orders before
                ``version``. ``0`` for a publisher that never restarts.

        Returns:
            ``True`` when recorded; ``False`` (and nothing changes) when
            ``(generation, version)`` is not larger than the current one.

        Raises:
            ValueError: a negative ``generation``.
        """
        if generation < 0:
            raise ValueError(f"generation must be >= 0, got {generation}")
        with self._lock:
            if not self._accepts(generation, version):
                return False
            self._generation, self._version, self._ref = generation, version, ref
            return True

    def version(self) -> int:
        """The latest version, ``-1`` before the first publish."""
        with self._lock:
            return self._version

    def generation(self) -> int:
        """The generation of the latest version, ``0`` before the first publish."""
        with self._lock:
            return self._generation

    def newer(self, generation: int, version: int) -> Published | None:
        """The latest publication if its ``(generation, version)`` is larger
        than the caller's, else ``None``.

        Args:
            generation: the generation the caller holds (``0`` if none).
            version: the version the caller holds (``-1`` if none).
        """
        with self._lock:
            if self._ref is not None and (self._generation, self._version) > (generation, version):
                return Published(self._generation, self._version, self._ref)
            return None

    def newer_than(self, version: int, generation: int = 0) -> tuple[int, Any] | None:
        """``(latest version, ref)`` if newer than ``(generation, version)``, else ``None``.

        The original call form, for callers that do not track generations:
        ``newer_than(-1)`` is "anything published". A caller that keeps
        polling across learner restarts must use :meth:`newer` (this form
        does not say which generation it returned).
        """
        newer = self.newer(generation, version)
        return None if newer is None else (newer.version, newer.ref)
