"""Versioned policy weights: how the learner's actor reaches the workers.

The learner publishes ``(version, state_dict)`` of the actor head and its
encoder as numpy arrays (``TD3Learner.policy_weights``); the driver stores them
once in Ray's object store (one ``ray.put`` per version) and records the
reference on a :class:`WeightsBoard`. Workers ask the board, every few
steps, for anything newer than the version they hold; the learner never
waits on a worker. The board itself is a plain class; the driver runs it as
a small Ray actor.
"""

from __future__ import annotations

import threading
from typing import Any


class WeightsBoard:
    """The latest published weights reference and its version.

    The reference is opaque here (a Ray ``ObjectRef`` in production, wrapped
    in a list so Ray passes it through instead of resolving it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._ref: Any = None

    def publish(self, version: int, ref: Any) -> bool:
        """Record ``ref`` as version ``version``.

        Returns:
            ``False`` (and changes nothing) when ``version`` is not newer
            than the current one; versions only move forward.
        """
        with self._lock:
            if version <= self._version:
                return False
            self._version, self._ref = version, ref
            return True

    def version(self) -> int:
        """The latest version, ``-1`` before the first publish."""
        with self._lock:
            return self._version

    def newer_than(self, version: int) -> tuple[int, Any] | None:
        """``(latest version, ref)`` if newer than ``version``, else ``None``."""
        with self._lock:
            if self._version > version:
                return self._version, self._ref
            return None
