"""Sensor data matched to simulator ticks.

* :func:`camera_image_to_array`: a ``carla.Image``'s raw bytes → ``uint8[H, W, 4]`` BGRA;
* :class:`SensorFrameBuffer`: sensor data keyed by frame, waited for by the tick's frame;
* :class:`FrameEventLog`: collision and lane-invasion events keyed by frame;
* :class:`EgoSensors`: the ego's camera buffer and its two event logs together.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from rollout_workers.carla.connection import CarlaTimeoutError


def camera_image_to_array(
    raw_data: bytes | bytearray | memoryview, height: int, width: int
) -> np.ndarray:
    """A ``carla.Image``'s ``raw_data`` → ``uint8[height, width, 4]`` BGRA.

    Args:
        raw_data: ``height · width · 4`` bytes, rows top to bottom, pixels
            ``B, G, R, A`` (CARLA's RGB camera format).
        height: image height, px.
        width: image width, px.

    Returns:
        A copy (the buffer CARLA passes to a callback is not ours to keep), ready
        for ``driving_task.to_grayscale(array, channel_order="BGRA")``.

    Raises:
        ValueError: the byte count does not match ``height · width · 4``.
    """
    buffer = np.frombuffer(raw_data, dtype=np.uint8)
    if buffer.size != height * width * 4:
        raise ValueError(
            f"camera raw_data has {buffer.size} bytes, expected {height}×{width}×4 = "
            f"{height * width * 4}"
        )
    return buffer.reshape(height, width, 4).copy()


class SensorFrameBuffer:
    """Sensor data keyed by simulator frame, for matching a sensor to a tick.

    Sensor callbacks run on the ``carla`` client's threads and call
    :meth:`put`; the environment calls :meth:`wait_for` with the frame number
    that ``world.tick()`` returned. Thread-safe.

    Frames older than the last requested one are stale: they are dropped when
    :meth:`wait_for` is called and ignored when they arrive later. At most
    ``max_pending`` frames are held (the oldest go first), so a sensor that
    nobody reads cannot grow memory.

    Args:
        label: names the sensor (and server) in time-out messages.
        max_pending: frames kept at most.
        address: ``host:port`` for :class:`CarlaTimeoutError`.

    Raises:
        ValueError: ``max_pending < 1``.
    """

    def __init__(self, label: str = "sensor", max_pending: int = 16, address: str = "") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.label = label
        self.address = address
        self.max_pending = max_pending
        self._data: dict[int, Any] = {}
        self._oldest_wanted = -1
        self._cond = threading.Condition()

    def put(self, frame: int, data: Any) -> None:
        """Store ``data`` of simulator ``frame`` (called from sensor threads)."""
        with self._cond:
            if frame < self._oldest_wanted:
                return
            self._data[frame] = data
            while len(self._data) > self.max_pending:
                del self._data[min(self._data)]
            self._cond.notify_all()

    def wait_for(self, frame: int, timeout: float) -> Any:
        """The data of ``frame``, waiting up to ``timeout`` seconds for it.

        Drops every frame older than ``frame`` and consumes ``frame`` itself.

        Raises:
            CarlaTimeoutError: ``frame`` did not arrive within ``timeout``
                seconds (the message gives the frames that did).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            self._oldest_wanted = max(self._oldest_wanted, frame)
            for old in [f for f in self._data if f < frame]:
                del self._data[old]
            while frame not in self._data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    held = sorted(self._data)
                    raise CarlaTimeoutError(
                        self.address,
                        f"{self.label} data for frame {frame} did not arrive within "
                        f"{timeout:.2f} s (frames held: {held or 'none'})",
                    )
                self._cond.wait(remaining)
            self._oldest_wanted = frame + 1
            return self._data.pop(frame)

    def clear(self) -> None:
        """Forget everything, including which frames are stale (a new episode)."""
        with self._cond:
            self._data.clear()
            self._oldest_wanted = -1

    def __len__(self) -> int:
        with self._cond:
            return len(self._data)


class FrameEventLog:
    """Events (collisions, lane invasions) keyed by simulator frame. Thread-safe.

    The event sensors fire only when something happens, so there is nothing to
    wait for: after the camera frame of tick ``N`` has arrived, the step takes
    every event of frames ``≤ N``. An event of frame ``N`` that arrives after
    the camera frame is counted in the next step (one step late, never lost).
    """

    def __init__(self, max_events: int = 1024) -> None:
        self.max_events = max_events
        self._events: list[tuple[int, Any]] = []
        self._lock = threading.Lock()

    def add(self, frame: int, event: Any = None) -> None:
        with self._lock:
            self._events.append((frame, event))
            if len(self._events) > self.max_events:
                del self._events[0]

    def pop_through(self, frame: int) -> list[tuple[int, Any]]:
        """Remove and return the ``(frame, event)`` pairs of frames ``≤ frame``, oldest first."""
        with self._lock:
            taken = [e for e in self._events if e[0] <= frame]
            self._events = [e for e in self._events if e[0] > frame]
        return sorted(taken, key=lambda e: e[0])

    def clear(self) -> None:
        with self._lock:
            self._events.clear()


class EgoSensors:
    """What the ego vehicle's sensors deliver: the front camera's frames and the
    collision and lane-invasion events, filled by the sensor callbacks.

    Args:
        address: ``host:port`` for the camera's :class:`CarlaTimeoutError`.

    Attributes:
        camera: ``uint8[H, W, 4]`` BGRA images by frame (:func:`camera_image_to_array`).
        collisions: collision events by frame (the other actor's ``type_id``).
        lane_invasions: lane-invasion events by frame.
    """

    def __init__(self, address: str = "") -> None:
        self.camera = SensorFrameBuffer("front camera", address=address)
        self.collisions = FrameEventLog()
        self.lane_invasions = FrameEventLog()

    def pop_events(self, frame: int) -> tuple[bool, bool]:
        """``(collided, invaded)``: whether any collision, any lane invasion
        happened in frames ``≤ frame`` (those events are consumed)."""
        collided = bool(self.collisions.pop_through(frame))
        invaded = bool(self.lane_invasions.pop_through(frame))
        return collided, invaded

    def clear(self) -> None:
        """Forget every frame and event (a new episode)."""
        self.camera.clear()
        self.collisions.clear()
        self.lane_invasions.clear()
