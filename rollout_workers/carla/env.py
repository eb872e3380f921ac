"""CARLA 0.9.16 as a gymnasium environment (DESIGN.md §5): ``td3drive/Carla-v0``.

The adapter only produces raw state and camera frames; the reward, the
termination rules, the episode metrics and the observation builders come from
:mod:`rollout_workers.driving_task`, shared with every other simulator.

One environment drives one CARLA server (one server per rollout worker; see
``deploy/carla/README.md``). It runs the server in synchronous mode with a
fixed time-step, so one :meth:`CarlaEnv.step` is exactly one ``world.tick()``
of ``fixed_delta_seconds`` simulated seconds, and the Traffic Manager that
drives the NPCs runs in synchronous mode on its own port.

Coordinates. CARLA (Unreal Engine 4) world coordinates are LEFT-handed: ``x``
forward, ``y`` to the RIGHT, ``z`` up, metres; ``yaw`` in degrees, positive
clockwise seen from above (a car with ``yaw = 90°`` drives towards ``+y``);
a forward vector is ``(cos yaw, sin yaw)``. The driving task's ego frame has
``x`` forward and ``y`` to the LEFT. :func:`carla_to_ego` and
:func:`carla_heading_error` are the only places that convert.

Pure parts, unit-tested with the real ``carla`` types but without a server:
:func:`carla_to_ego`, :func:`carla_heading_error`, :func:`to_vehicle_control`,
:func:`camera_image_to_array`, :class:`SensorFrameBuffer`,
:class:`FrameEventLog`, :class:`ActorRegistry`, :class:`RouteTracker` and
:func:`build_route`. Everything that talks to a server is in
:class:`CarlaEnv` and is exercised only by the ``carla``-marked tests.

Errors. Nothing connects at construction. :meth:`CarlaEnv.reset` connects
(lazily, and again after a failure) with exponential back-off and raises
:class:`CarlaConnectionError` when the server cannot be reached;
``world.tick`` and sensor time-outs raise :class:`CarlaTimeoutError`. Both
name ``host:port``. The ``RuntimeError`` that the ``carla`` client raises on
every time-out never escapes untranslated. After either error the environment
is marked broken; the next :meth:`CarlaEnv.reset` checks whether the server is
still there, forgets the actors of a dead server, and reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import carla
import gymnasium as gym
import numpy as np

from rollout_workers import driving_task
from td3drive.contracts import spec
from td3drive.contracts.config import CarlaConfig, DrivingTaskConfig

logger = logging.getLogger(__name__)

EGO_BLUEPRINT = "vehicle.tesla.model3"
"""Blueprint of the ego vehicle (falls back to any 4-wheeled vehicle if absent)."""
EGO_ROLE_NAME = "hero"
"""``role_name`` attribute of the ego vehicle (CARLA's convention for the ego)."""
NPC_ROLE_NAME = "autopilot"
CAMERA_TRANSFORM = ((1.6, 0.0, 1.7), (-10.0, 0.0, 0.0))
"""Front camera mount relative to the vehicle: ``(x, y, z)`` m (x forward, z up)
and ``(pitch, yaw, roll)`` degrees: above the bonnet, tilted 10° down."""
ROUTE_RESOLUTION_M = 1.0
"""Spacing of the stored route points, m (look-ahead points are interpolated)."""
WARMUP_SECONDS = 0.5
"""Simulated seconds ticked after spawning (brakes on) so the car settles on the road."""
LOAD_WORLD_TIMEOUT_S = 120.0
"""Client time-out while the server loads a town (loading takes tens of seconds)."""
MAX_SPAWN_TRIES = 20
"""Spawn points tried before :class:`CarlaSpawnError`."""
ROUTE_SEARCH_BEHIND_M = 5.0
ROUTE_SEARCH_AHEAD_M = 30.0
"""Window of the route searched around the last position, m (stops a route that
crosses itself from snapping to a later pass)."""


# ------------------------------------------------------------------ errors
class CarlaConnectionError(ConnectionError):
    """The CARLA server cannot be reached or refused a request.

    The message names ``host:port`` and the call that failed.

    Attributes:
        address: ``"host:port"``.
        retryable: ``False`` for failures that a retry cannot fix (an unknown town).
    """

    def __init__(self, address: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(f"CARLA server {address}: {message}")
        self.address = address
        self.message = message
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (_rebuild_connection_error, (self.address, self.message, self.retryable))


class CarlaTimeoutError(TimeoutError):
    """``world.tick`` or a sensor did not answer in time.

    Attributes:
        address: ``"host:port"`` (empty when raised by a buffer without a server).
    """

    def __init__(self, address: str, message: str) -> None:
        super().__init__(f"CARLA server {address}: {message}" if address else message)
        self.address = address
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (type(self), (self.address, self.message))


def _rebuild_connection_error(address: str, message: str, retryable: bool) -> CarlaConnectionError:
    return CarlaConnectionError(address, message, retryable=retryable)


class CarlaSpawnError(RuntimeError):
    """No free spawn point with a long enough route was found."""


# ------------------------------------------------------------------ pure conversions
def carla_to_ego(
    points_xy_world: np.ndarray | Sequence[Sequence[float]],
    ego_location_xy: np.ndarray | Sequence[float],
    ego_yaw_deg: float,
) -> np.ndarray:
    """CARLA world points → the driving task's ego frame.

    Args:
        points_xy_world: ``[N, 2]`` world ``(x, y)``, m, CARLA's left-handed frame
            (``y`` to the right).
        ego_location_xy: ``[2]`` world ``(x, y)`` of the ego vehicle, m.
        ego_yaw_deg: CARLA yaw of the ego vehicle, degrees (clockwise from ``+x``
            seen from above, i.e. towards ``+y``).

    Returns:
        ``float32[N, 2]``: ``x`` forward and ``y`` to the LEFT of the vehicle, m.
        A point 10 m ahead of a car with yaw 90° (at ``ego + (0, 10)``) maps to
        ``(10, 0)``; a point on the car's right has ``y < 0``.

    Raises:
        ValueError: ``points_xy_world`` is not ``[N, 2]`` or ``ego_location_xy`` not ``[2]``.
    """
    points = np.asarray(points_xy_world, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points_xy_world must be [N, 2], got {points.shape}")
    ego = np.asarray(ego_location_xy, dtype=np.float64).reshape(-1)
    if ego.shape != (2,):
        raise ValueError(f"ego_location_xy must be [2], got {ego.shape}")
    delta = points - ego
    yaw = math.radians(ego_yaw_deg)
    cos, sin = math.cos(yaw), math.sin(yaw)
    # forward = (cos, sin) and right = (-sin, cos) in CARLA's frame; left = -right.
    forward = delta[:, 0] * cos + delta[:, 1] * sin
    left = delta[:, 0] * sin - delta[:, 1] * cos
    return np.stack([forward, left], axis=1).astype(np.float32)


def carla_heading_error(ego_yaw_deg: float, lane_yaw_deg: float) -> float:
    """Heading error in the driving task's convention.

    Args:
        ego_yaw_deg: CARLA yaw of the vehicle, degrees (clockwise positive).
        lane_yaw_deg: CARLA yaw of the lane (route) direction, degrees.

    Returns:
        Radians in ``[−π, π)``, ``> 0`` when the car points LEFT of the lane
        (a smaller CARLA yaw than the lane's).
    """
    return driving_task.wrap_angle(-math.radians(ego_yaw_deg - lane_yaw_deg))


def to_vehicle_control(action: np.ndarray | Sequence[float]) -> carla.VehicleControl:
    """Agent action → ``carla.VehicleControl``.

    Args:
        action: ``float32[2]`` ``[steer, throttle_brake]``; values outside
            ``[−1, 1]`` are clipped. ``steer > 0`` turns right (CARLA's sign,
            which the action space shares); ``throttle_brake > 0`` is throttle,
            ``< 0`` brake.

    Returns:
        ``VehicleControl(steer=steer, throttle=max(tb, 0), brake=max(−tb, 0))``;
        never hand brake or reverse.

    Raises:
        ValueError: not 2 values, or NaN/inf.
    """
    values = np.asarray(action, dtype=np.float64).reshape(-1)
    if values.shape != spec.ACTION_SHAPE:
        raise ValueError(f"action must have {spec.ACTION_DIM} values, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"action contains NaN or inf: {values.tolist()}")
    steer, throttle_brake = np.clip(values, spec.ACTION_LOW, spec.ACTION_HIGH)
    return carla.VehicleControl(
        throttle=float(max(throttle_brake, 0.0)),
        steer=float(steer),
        brake=float(max(-throttle_brake, 0.0)),
        hand_brake=False,
        reverse=False,
    )


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


# ------------------------------------------------------------------ sensor/tick matching
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


# ------------------------------------------------------------------ actor bookkeeping
ActorKind = Literal["sensor", "vehicle", "npc"]


class ActorRegistry:
    """Every actor an environment spawned, so that all of them get destroyed.

    :meth:`destroy_all` stops every sensor first (no callback runs into a
    destroyed actor), then destroys the sensors, then the ego vehicle and the
    NPCs, each group in reverse spawn order. A failing ``stop()`` or
    ``destroy()`` (or ``destroy()`` returning ``False``) is logged and the
    rest continue; the registry is empty afterwards.
    """

    def __init__(self) -> None:
        self._actors: list[tuple[ActorKind, Any]] = []

    def add(self, actor: Any, kind: ActorKind) -> Any:
        """Record ``actor`` (returned unchanged); ``kind`` is sensor, vehicle or npc."""
        if kind not in ("sensor", "vehicle", "npc"):
            raise ValueError(f"unknown actor kind {kind!r}")
        self._actors.append((kind, actor))
        return actor

    def __len__(self) -> int:
        return len(self._actors)

    def actors(self, kind: ActorKind | None = None) -> list[Any]:
        """The recorded actors (of ``kind``), in spawn order."""
        return [a for k, a in self._actors if kind is None or k == kind]

    def destroy_all(self) -> list[str]:
        """Stop and destroy every recorded actor.

        Returns:
            One line per failure (also logged as warnings); empty when all went well.
        """
        failures: list[str] = []
        sensors = [a for k, a in reversed(self._actors) if k == "sensor"]
        others = [a for k, a in reversed(self._actors) if k != "sensor"]
        self._actors = []
        for sensor in sensors:
            try:
                sensor.stop()
            except Exception as exc:
                failures.append(f"stop {_describe(sensor)}: {exc}")
        for actor in [*sensors, *others]:
            try:
                destroyed = actor.destroy()
            except Exception as exc:
                failures.append(f"destroy {_describe(actor)}: {exc}")
                continue
            if destroyed is False:
                failures.append(f"destroy {_describe(actor)}: server reported failure")
        for line in failures:
            logger.warning("actor cleanup: %s", line)
        return failures

    def forget(self) -> int:
        """Drop every record without calling the server (the server died); returns the count."""
        count = len(self._actors)
        self._actors = []
        return count


def _describe(actor: Any) -> str:
    return f"{getattr(actor, 'type_id', type(actor).__name__)} id={getattr(actor, 'id', '?')}"


# ------------------------------------------------------------------ route
def build_route(
    start: Any, length_m: float, resolution_m: float, rng: np.random.Generator
) -> list[Any]:
    """Waypoints from ``start`` along the lane for ``length_m`` metres.

    Follows ``waypoint.next(resolution_m)``; where the road branches (a
    junction) one successor is chosen with ``rng`` from the candidates sorted
    by ``(road_id, section_id, lane_id, s)``, so the same seed gives the same
    route on the same map.

    Args:
        start: a ``carla.Waypoint`` (anything with ``next(distance) -> list``).
        length_m: route length wanted, m.
        resolution_m: distance between consecutive waypoints, m.
        rng: chooses branches.

    Returns:
        ``[start, …]``; shorter than ``length_m`` only at a dead end.
    """
    route = [start]
    for _ in range(math.ceil(length_m / resolution_m)):
        candidates = list(route[-1].next(resolution_m))
        if not candidates:
            break
        candidates.sort(
            key=lambda w: (
                getattr(w, "road_id", 0),
                getattr(w, "section_id", 0),
                getattr(w, "lane_id", 0),
                round(float(getattr(w, "s", 0.0)), 3),
            )
        )
        route.append(candidates[int(rng.integers(len(candidates)))])
    return route


class RouteTracker:
    """A route as a polyline in CARLA world coordinates, and the car's place on it.

    Args:
        points_xy: ``float[N, 2]`` world ``(x, y)`` of the route, m, ``N ≥ 2``.
        goal_m: distance along the route that completes it, m (the route may
            extend further to provide look-ahead points).

    The position along the route (arc length ``s``, m) is the projection of the
    car onto the nearest segment within a window around the last position
    (``ROUTE_SEARCH_BEHIND_M`` behind, ``ROUTE_SEARCH_AHEAD_M`` ahead), so
    driving backwards decreases ``s`` and a route that crosses itself does not
    jump ahead.
    """

    def __init__(self, points_xy: np.ndarray, goal_m: float) -> None:
        points = np.asarray(points_xy, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"route points must be [N, 2], got {points.shape}")
        if len(points) > 1:  # drop repeated points: they make zero-length segments
            step = np.hypot(*np.diff(points, axis=0).T)
            points = points[np.concatenate([[True], step > 1e-6])]
        if len(points) < 2:
            raise ValueError("a route needs at least 2 distinct points")
        lengths = np.hypot(*np.diff(points, axis=0).T)
        self.points = points
        self.arc = np.concatenate([[0.0], np.cumsum(lengths)])
        self.length_m = float(self.arc[-1])
        self.goal_m = float(min(goal_m, self.length_m))
        self.s = 0.0
        self._segment = 0

    def locate(self, xy: np.ndarray | Sequence[float]) -> tuple[float, float, float, float]:
        """Project a world point onto the route near the last position.

        Returns:
            ``(s, lateral_left, lane_yaw_deg, distance)``: arc length of the
            projection (m), signed offset from the route (m, ``> 0`` LEFT of the
            direction of travel), CARLA yaw of that segment (degrees), and the
            unsigned distance to it (m). Does not move the tracker.
        """
        p = np.asarray(xy, dtype=np.float64).reshape(2)
        lo = max(int(np.searchsorted(self.arc, self.s - ROUTE_SEARCH_BEHIND_M)) - 1, 0)
        hi = min(int(np.searchsorted(self.arc, self.s + ROUTE_SEARCH_AHEAD_M)) + 1, len(self.arc))
        a = self.points[lo : hi - 1]
        d = self.points[lo + 1 : hi] - a
        seg_len2 = (d**2).sum(axis=1)
        t = np.clip(((p - a) * d).sum(axis=1) / seg_len2, 0.0, 1.0)
        nearest = a + t[:, None] * d
        dist = np.hypot(*(p - nearest).T)
        i = int(np.argmin(dist))
        seg = d[i]
        offset = p - a[i]
        seg_len = math.sqrt(seg_len2[i])
        # CARLA is left-handed: left of direction (dx, dy) is (dy, -dx).
        lateral_left = float((offset[0] * seg[1] - offset[1] * seg[0]) / seg_len)
        s = float(self.arc[lo + i] + t[i] * seg_len)
        yaw = math.degrees(math.atan2(seg[1], seg[0]))
        return s, lateral_left, yaw, float(dist[i])

    def advance(self, xy: np.ndarray | Sequence[float]) -> tuple[float, float, float, float]:
        """:meth:`locate` and move the tracker there.

        Returns:
            ``(progress, lateral_left, lane_yaw_deg, distance)``: ``progress`` is
            the change of ``s`` since the last call (m, ``< 0`` backwards).
        """
        s, lateral, yaw, distance = self.locate(xy)
        progress = s - self.s
        self.s = s
        return progress, lateral, yaw, distance

    @property
    def completion(self) -> float:
        """Fraction of the goal distance driven, in ``[0, 1]``."""
        return float(np.clip(self.s / self.goal_m, 0.0, 1.0)) if self.goal_m > 0 else 1.0

    def lookahead(self, spacing_m: float, count: int = spec.NUM_WAYPOINTS) -> np.ndarray:
        """World points ``spacing_m, 2·spacing_m, …`` ahead of ``s`` along the route.

        Returns:
            ``float64[count, 2]`` world ``(x, y)``, m; points past the route's
            end repeat its last point.
        """
        targets = self.s + spacing_m * np.arange(1, count + 1)
        x = np.interp(targets, self.arc, self.points[:, 0])
        y = np.interp(targets, self.arc, self.points[:, 1])
        return np.stack([x, y], axis=1)


# ------------------------------------------------------------------ the environment
class CarlaEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """Drive a route in CARLA from a front camera (``td3drive/Carla-v0``).

    Observation: ``{"image": uint8[4, 84, 84], "vector": float32[23]}``
    (:func:`td3drive.contracts.spec.observation_space`): the last 4 grayscale 84×84
    frames of the front RGB camera (BGRA → BT.601 luma, box-resized), and the
    driving task's vector (speed, lateral deviation, heading error, 10
    look-ahead route points in the ego frame, scaled by
    :func:`driving_task.build_vector`). Action: ``float32[2]``
    ``[steer, throttle_brake]`` in ``[−1, 1]`` (:func:`to_vehicle_control`).

    An episode spawns the ego vehicle (``role_name=hero``) at a seeded spawn
    point, attaches a front RGB camera, a collision sensor and a lane-invasion
    sensor, spawns ``npc_vehicles`` Traffic-Manager NPCs, and builds a route of
    ``route_length_m`` from the map. Progress, lateral deviation and heading
    error are measured against that route. ``off_road`` means the car is on no
    driving lane of the map, or more than two lane widths
    (``4 · lane_half_width_m``) from the route (a wrong turn).

    ``info`` of every step holds ``reward_components`` (dict), ``frame``,
    ``end_reason``; at an episode end also ``episode_metrics``
    (:meth:`driving_task.EpisodeTracker.metrics`).

    Args:
        carla: server, sensor and NPC settings (a dict is validated as
            :class:`CarlaConfig`).
        task: the driving task (a dict is validated as :class:`DrivingTaskConfig`).
        render_mode: ``None`` or ``"rgb_array"`` (the last camera frame,
            ``uint8[H, W, 3]`` RGB).

    Raises:
        pydantic.ValidationError: an invalid configuration (e.g.
            ``fixed_delta_seconds > 0.1``). Construction never connects.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"]}  # noqa: RUF012

    def __init__(
        self,
        carla: CarlaConfig | dict[str, Any] | None = None,
        task: DrivingTaskConfig | dict[str, Any] | None = None,
        render_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.carla_config = (
            carla if isinstance(carla, CarlaConfig) else CarlaConfig.model_validate(carla or {})
        )
        self.task_config = (
            task
            if isinstance(task, DrivingTaskConfig)
            else DrivingTaskConfig.model_validate(task or {})
        )
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.observation_space = spec.observation_space()
        self.action_space = spec.action_space()
        self.metadata = {
            "render_modes": ["rgb_array"],
            "render_fps": round(1.0 / self.carla_config.fixed_delta_seconds),
        }
        self.address = f"{self.carla_config.host}:{self.carla_config.port}"
        self.off_route_m = 4.0 * self.task_config.lane_half_width_m

        self._client: Any = None
        self._world: Any = None
        self._map: Any = None
        self._traffic_manager: Any = None
        self._original_settings: Any = None
        self._broken = False
        self.server_version: str | None = None

        self._registry = ActorRegistry()
        self._camera_buffer = SensorFrameBuffer("front camera", address=self.address)
        self._collisions = FrameEventLog()
        self._lane_invasions = FrameEventLog()
        self._vehicle: Any = None
        self._route: RouteTracker | None = None
        self._frames = driving_task.FrameStack()
        self._tracker = driving_task.EpisodeTracker()
        self._previous_action = np.zeros(spec.ACTION_SHAPE, np.float32)
        self._steps = 0
        self._stuck_steps = 0
        self._episode_over = True
        self._last_bgra: np.ndarray | None = None
        self._seeded = False

    # ---------------------------------------------------------------- gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode: (re)connect if needed, destroy the last episode's
        actors, spawn the ego vehicle, sensors and NPCs, build the route.

        Args:
            seed: reseeds spawn points, routes and NPCs; the first reset without
                one uses ``CarlaConfig.seed``.
            options: unused.

        Returns:
            ``(obs, info)``; ``info`` has ``frame``, ``spawn_point``, ``route_length_m``.

        Raises:
            CarlaConnectionError: the server cannot be reached after
                ``1 + reconnect_attempts`` tries, or a request failed.
            CarlaTimeoutError: a tick or the first camera frame timed out.
            CarlaSpawnError: no spawn point was free.
        """
        if seed is None and not self._seeded:
            seed = self.carla_config.seed
        super().reset(seed=seed)
        self._seeded = True
        self._ensure_connected()
        self._episode_over = True
        try:
            self._cleanup_actors()
            obs, info = self._start_episode()
        except BaseException:
            self._cleanup_after_error()
            raise
        self._episode_over = False
        return obs, info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Apply ``action`` for one tick of ``fixed_delta_seconds``.

        Returns:
            ``(obs, reward, terminated, truncated, info)``; see the class docstring.

        Raises:
            RuntimeError: before :meth:`reset` or after the episode ended.
            ValueError: an action that is not 2 finite values.
            CarlaTimeoutError: the tick or the camera frame timed out.
            CarlaConnectionError: another request to the server failed.
        """
        if self._episode_over or self._vehicle is None or self._route is None:
            raise RuntimeError("CarlaEnv.step called before reset() or after the episode ended")
        action = np.clip(np.asarray(action, np.float32).reshape(-1), -1.0, 1.0)
        control = to_vehicle_control(action)
        try:
            self._vehicle.apply_control(control)
            frame = self._tick()
            bgra = self._wait_camera(frame)
            collided = bool(self._collisions.pop_through(frame))
            invaded = bool(self._lane_invasions.pop_through(frame))
            state = self._read_state(collision=collided, lane_invasion=invaded)
        except RuntimeError as exc:  # what the carla client raises on time-outs and errors
            self._episode_over = True
            raise self._translate(exc, "step") from exc
        except BaseException:  # CarlaTimeoutError from the tick or the camera
            self._episode_over = True
            raise

        self._steps += 1
        self._stuck_steps = (
            self._stuck_steps + 1 if state.speed < self.task_config.stuck_speed_mps else 0
        )
        end = driving_task.check_episode_end(
            state, self._steps, self._stuck_steps, self.task_config
        )
        reward = driving_task.step_reward(
            state, action, self._previous_action, self.task_config, end
        )
        self._previous_action = action
        self._tracker.record(state, reward, end)
        obs = self._observe(bgra, state, push=True)
        info: dict[str, Any] = {
            "reward_components": reward.as_dict(),
            "frame": frame,
            "end_reason": end.reason,
            "route_completion": state.route_completion,
            "speed_mps": state.speed,
            "privileged_vector": driving_task.full_vector(state, self.task_config),
        }
        if end.terminated or end.truncated:
            info["episode_metrics"] = self._tracker.metrics()
            self._episode_over = True
        return obs, reward.total, end.terminated, end.truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """The last camera frame as ``uint8[H, W, 3]`` RGB (``render_mode="rgb_array"``)."""
        if self.render_mode != "rgb_array" or self._last_bgra is None:
            return None
        return self._last_bgra[..., 2::-1].copy()

    def close(self) -> None:
        """Destroy every actor, restore the server's original world settings and
        the Traffic Manager's asynchronous mode, and drop the connection.

        Idempotent, and never raises: failures (a dead server) are logged.
        """
        if self._client is None and len(self._registry) == 0:
            return
        try:
            self._cleanup_after_error()
        finally:
            self._restore_server()
            self._client = self._world = self._map = self._traffic_manager = None
            self._vehicle = None
            self._route = None
            self._episode_over = True

    # ---------------------------------------------------------------- connection
    def _ensure_connected(self) -> None:
        if self._client is not None and self._broken:
            alive = self._server_alive()
            if alive:  # a slow tick: clean up normally and reapply our settings
                try:
                    self._cleanup_actors()
                    self._configure_world()
                    self._broken = False
                except (RuntimeError, CarlaTimeoutError) as exc:
                    logger.warning("%s: recovering the connection failed: %s", self.address, exc)
                    alive = False
            if not alive:
                lost = self._registry.forget()
                logger.warning(
                    "CARLA server %s stopped answering; forgetting %d actors, reconnecting",
                    self.address,
                    lost,
                )
                self._cleanup_actors()
                self._client = self._world = self._map = self._traffic_manager = None
        if self._client is None:
            self._connect()

    def _server_alive(self) -> bool:
        try:
            self._client.get_server_version()
        except RuntimeError:
            return False
        return True

    def _connect(self) -> None:
        """Connect with exponential back-off.

        Raises:
            CarlaConnectionError: after ``1 + reconnect_attempts`` failed tries
                (at once for an unknown town).
        """
        cfg = self.carla_config
        attempts = 1 + cfg.reconnect_attempts
        delay = cfg.reconnect_backoff_s
        last: CarlaConnectionError | None = None
        for attempt in range(1, attempts + 1):
            try:
                self._connect_once()
            except CarlaConnectionError as exc:
                last = exc
                if not exc.retryable:
                    raise
                logger.warning("connect attempt %d/%d failed: %s", attempt, attempts, exc)
            else:
                self._broken = False
                return
            if attempt < attempts:
                time.sleep(delay)
                delay *= 2
        assert last is not None
        raise CarlaConnectionError(
            self.address, f"gave up after {attempts} attempt(s); last error: {last}"
        ) from last

    def _connect_once(self) -> None:
        cfg = self.carla_config
        what = "creating the client"
        try:
            client = carla.Client(cfg.host, cfg.port)
            client.set_timeout(cfg.timeout_s)
            what = "get_server_version"
            self.server_version = client.get_server_version()
            client_version = client.get_client_version()
            if self.server_version != client_version:
                logger.warning(
                    "CARLA server %s runs %s, client is %s",
                    self.address,
                    self.server_version,
                    client_version,
                )
            what = "get_world"
            world = client.get_world()
            what = f"loading {cfg.town}"
            world = self._load_town(client, world)
            self._client, self._world = client, world
            what = "configuring synchronous mode and the Traffic Manager"
            self._configure_world()
        except CarlaConnectionError:
            self._client = self._world = None
            raise
        except (RuntimeError, CarlaTimeoutError) as exc:
            if self._world is not None and self._original_settings is not None:
                # Best effort: do not leave a half-configured server synchronous.
                with contextlib.suppress(RuntimeError):
                    self._world.apply_settings(self._original_settings)
            self._client = self._world = None
            raise CarlaConnectionError(self.address, f"{what} failed: {exc}") from exc

    def _load_town(self, client: Any, world: Any) -> Any:
        town = self.carla_config.town.rsplit("/", 1)[-1]
        if _map_basename(world.get_map().name) == town:
            return world
        available = list(client.get_available_maps())
        if not any(_map_basename(m) == town for m in available):
            names = ", ".join(sorted({_map_basename(m) for m in available}))
            raise CarlaConnectionError(
                self.address,
                f"town {town!r} is not on the server (available: {names})",
                retryable=False,
            )
        client.set_timeout(max(self.carla_config.timeout_s, LOAD_WORLD_TIMEOUT_S))
        try:
            world = client.load_world(town)
        finally:
            client.set_timeout(self.carla_config.timeout_s)
        loaded = _map_basename(world.get_map().name)
        if loaded != town:
            raise CarlaConnectionError(self.address, f"asked for {town}, server loaded {loaded}")
        return world

    def _configure_world(self) -> None:
        """Synchronous mode with the fixed step, the Traffic Manager in sync mode, one tick."""
        cfg = self.carla_config
        world = self._world
        if self._original_settings is None:  # keep the first: later ones are ours
            self._original_settings = world.get_settings()
            if self._original_settings.synchronous_mode:
                logger.warning(
                    "CARLA server %s was already synchronous (another client, or one that "
                    "died without restoring it); close() will leave it so",
                    self.address,
                )
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = cfg.fixed_delta_seconds
        world.apply_settings(settings)
        self._traffic_manager = self._client.get_trafficmanager(cfg.tm_port)
        self._traffic_manager.set_synchronous_mode(True)
        self._traffic_manager.set_random_device_seed(cfg.seed)
        self._map = world.get_map()
        self._tick()

    def _restore_server(self) -> None:
        if self._client is None:
            return
        if self._traffic_manager is not None:
            try:
                self._traffic_manager.set_synchronous_mode(False)
            except Exception as exc:
                logger.warning("%s: restoring Traffic Manager async mode: %s", self.address, exc)
        if self._world is not None and self._original_settings is not None:
            try:
                self._world.apply_settings(self._original_settings)
            except Exception as exc:
                logger.warning("%s: restoring the original world settings: %s", self.address, exc)
            else:
                self._original_settings = None

    def _tick(self) -> int:
        try:
            return int(self._world.tick(self.carla_config.timeout_s))
        except RuntimeError as exc:
            self._broken = True
            raise CarlaTimeoutError(
                self.address,
                f"world.tick() did not return within {self.carla_config.timeout_s} s: {exc}",
            ) from exc

    def _wait_camera(self, frame: int) -> np.ndarray:
        try:
            return self._camera_buffer.wait_for(frame, self.carla_config.timeout_s)
        except CarlaTimeoutError:
            self._broken = True
            raise

    def _translate(self, exc: RuntimeError, what: str) -> Exception:
        self._broken = True
        if "time-out" in str(exc) or "timeout" in str(exc).lower():
            return CarlaTimeoutError(self.address, f"{what}: {exc}")
        return CarlaConnectionError(self.address, f"{what} failed: {exc}")

    # ---------------------------------------------------------------- episodes
    def _cleanup_after_error(self) -> None:
        """:meth:`_cleanup_actors`, unless the server is gone (then its actors are too:
        forget them rather than wait ``timeout_s`` per actor for a dead server)."""
        if self._broken and self._client is not None and not self._server_alive():
            lost = self._registry.forget()
            logger.warning("%s: server gone; forgot %d actors", self.address, lost)
            self._client = None
        self._cleanup_actors()

    def _cleanup_actors(self) -> None:
        if len(self._registry):
            self._registry.destroy_all()
        self._vehicle = None
        self._camera_buffer.clear()
        self._collisions.clear()
        self._lane_invasions.clear()

    def _start_episode(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        try:
            spawn_index = self._spawn_ego_and_route()
            self._spawn_sensors()
            self._spawn_npcs(exclude=spawn_index)
            self._vehicle.apply_control(carla.VehicleControl(brake=1.0))
            frame = self._tick()
            for _ in range(
                max(1, math.ceil(WARMUP_SECONDS / self.carla_config.fixed_delta_seconds))
            ):
                frame = self._tick()
            bgra = self._wait_camera(frame)
            self._collisions.pop_through(frame)
            self._lane_invasions.pop_through(frame)
            assert self._route is not None
            self._route.advance(self._vehicle_xy())  # where the car settled
            state = self._read_state(collision=False, lane_invasion=False, progress=0.0)
        except RuntimeError as exc:
            if isinstance(exc, CarlaSpawnError):
                raise
            raise self._translate(exc, "reset") from exc
        self._tracker = driving_task.EpisodeTracker()
        self._previous_action = np.zeros(spec.ACTION_SHAPE, np.float32)
        self._steps = 0
        self._stuck_steps = 0
        obs = self._observe(bgra, state, push=False)
        assert self._route is not None
        info = {
            "frame": frame,
            "spawn_point": spawn_index,
            "route_length_m": self._route.goal_m,
            "privileged_vector": driving_task.full_vector(state, self.task_config),
        }
        return obs, info

    def _spawn_ego_and_route(self) -> int:
        world, carla_map = self._world, self._map
        spawn_points = carla_map.get_spawn_points()
        if not spawn_points:
            raise CarlaSpawnError(f"{self.address}: the map has no spawn points")
        blueprint = self._ego_blueprint()
        spacing = self.task_config.waypoint_spacing_m
        wanted = self.task_config.route_length_m + spec.NUM_WAYPOINTS * spacing
        order = self.np_random.permutation(len(spawn_points))[:MAX_SPAWN_TRIES]
        for index in order:
            transform = spawn_points[int(index)]
            start = carla_map.get_waypoint(
                transform.location, project_to_road=True, lane_type=carla.LaneType.Driving
            )
            if start is None:
                continue
            route = build_route(start, wanted, ROUTE_RESOLUTION_M, self.np_random)
            xy = np.array(
                [[w.transform.location.x, w.transform.location.y] for w in route], np.float64
            )
            if len(xy) < 2 or np.hypot(*np.diff(xy, axis=0).T).sum() < wanted - 1.0:
                continue  # dead end before the route is long enough
            vehicle = world.try_spawn_actor(blueprint, transform)
            if vehicle is None:
                continue
            self._registry.add(vehicle, "vehicle")
            self._vehicle = vehicle
            self._route = RouteTracker(xy, self.task_config.route_length_m)
            return int(index)
        raise CarlaSpawnError(
            f"{self.address}: no free spawn point with a {wanted:.0f} m route among "
            f"{len(order)} tried"
        )

    def _ego_blueprint(self) -> Any:
        library = self._world.get_blueprint_library()
        try:
            blueprint = library.find(EGO_BLUEPRINT)
        except (IndexError, RuntimeError):
            cars = sorted(
                (b for b in library.filter("vehicle.*") if _wheels(b) == 4), key=lambda b: b.id
            )
            if not cars:
                raise CarlaSpawnError(f"{self.address}: no 4-wheeled vehicle blueprint") from None
            blueprint = cars[0]
        if blueprint.has_attribute("role_name"):
            blueprint.set_attribute("role_name", EGO_ROLE_NAME)
        return blueprint

    def _spawn_sensors(self) -> None:
        cfg = self.carla_config
        library = self._world.get_blueprint_library()
        camera_bp = library.find("sensor.camera.rgb")
        camera_bp.set_attribute("image_size_x", str(cfg.camera_width))
        camera_bp.set_attribute("image_size_y", str(cfg.camera_height))
        camera_bp.set_attribute("fov", str(cfg.camera_fov))
        camera_bp.set_attribute("sensor_tick", "0.0")
        (x, y, z), (pitch, yaw, roll) = CAMERA_TRANSFORM
        mount = carla.Transform(
            carla.Location(x=x, y=y, z=z), carla.Rotation(pitch=pitch, yaw=yaw, roll=roll)
        )
        camera = self._registry.add(
            self._world.spawn_actor(camera_bp, mount, attach_to=self._vehicle), "sensor"
        )
        buffer = self._camera_buffer

        def on_image(image: Any) -> None:
            try:
                array = camera_image_to_array(image.raw_data, image.height, image.width)
            except ValueError:
                logger.exception("malformed camera image of frame %s", image.frame)
                return
            buffer.put(int(image.frame), array)

        camera.listen(on_image)

        collisions, invasions = self._collisions, self._lane_invasions
        collision = self._registry.add(
            self._world.spawn_actor(
                library.find("sensor.other.collision"), carla.Transform(), attach_to=self._vehicle
            ),
            "sensor",
        )
        collision.listen(
            lambda event: collisions.add(
                int(event.frame), getattr(event.other_actor, "type_id", None)
            )
        )
        invasion = self._registry.add(
            self._world.spawn_actor(
                library.find("sensor.other.lane_invasion"),
                carla.Transform(),
                attach_to=self._vehicle,
            ),
            "sensor",
        )
        invasion.listen(lambda event: invasions.add(int(event.frame), None))

    def _spawn_npcs(self, exclude: int) -> None:
        count = self.carla_config.npc_vehicles
        if count == 0:
            return
        library = self._world.get_blueprint_library()
        blueprints = sorted(
            (b for b in library.filter("vehicle.*") if _wheels(b) == 4), key=lambda b: b.id
        )
        spawn_points = self._map.get_spawn_points()
        candidates = [i for i in self.np_random.permutation(len(spawn_points)) if i != exclude]
        tm_port = self.carla_config.tm_port
        spawned = 0
        for index in candidates:
            if spawned >= count:
                break
            blueprint = blueprints[int(self.np_random.integers(len(blueprints)))]
            if blueprint.has_attribute("role_name"):
                blueprint.set_attribute("role_name", NPC_ROLE_NAME)
            npc = self._world.try_spawn_actor(blueprint, spawn_points[int(index)])
            if npc is None:
                continue
            self._registry.add(npc, "npc")
            npc.set_autopilot(True, tm_port)
            spawned += 1
        if spawned < count:
            logger.warning("%s: spawned %d of %d NPC vehicles", self.address, spawned, count)

    # ---------------------------------------------------------------- state
    def _vehicle_xy(self) -> np.ndarray:
        location = self._vehicle.get_location()
        return np.array([location.x, location.y], np.float64)

    def _read_state(
        self, *, collision: bool, lane_invasion: bool, progress: float | None = None
    ) -> driving_task.DrivingState:
        assert self._route is not None
        transform = self._vehicle.get_transform()
        velocity = self._vehicle.get_velocity()
        forward = transform.get_forward_vector()
        speed = velocity.x * forward.x + velocity.y * forward.y + velocity.z * forward.z
        location = transform.location
        xy = np.array([location.x, location.y], np.float64)
        yaw = transform.rotation.yaw
        if progress is None:
            progress, lateral, lane_yaw, _ = self._route.advance(xy)
        else:
            _, lateral, lane_yaw, _ = self._route.locate(xy)
        on_driving_lane = (
            self._map.get_waypoint(
                location, project_to_road=False, lane_type=carla.LaneType.Driving
            )
            is not None
        )
        waypoints = carla_to_ego(
            self._route.lookahead(self.task_config.waypoint_spacing_m), xy, yaw
        )
        return driving_task.DrivingState(
            speed=float(speed),
            lateral_deviation=lateral,
            heading_error=carla_heading_error(yaw, lane_yaw),
            progress=float(progress),
            route_completion=self._route.completion,
            waypoints=waypoints,
            collision=collision,
            off_road=(not on_driving_lane) or abs(lateral) > self.off_route_m,
            lane_invasion=lane_invasion,
            dt=self.carla_config.fixed_delta_seconds,
        )

    def _observe(
        self, bgra: np.ndarray, state: driving_task.DrivingState, push: bool
    ) -> dict[str, np.ndarray]:
        self._last_bgra = bgra
        gray = driving_task.to_grayscale(bgra, channel_order="BGRA")
        image = self._frames.push(gray) if push else self._frames.reset(gray)
        return {"image": image, "vector": driving_task.build_vector(state, self.task_config)}


def _map_basename(name: str) -> str:
    """``"Carla/Maps/Town03"`` → ``"Town03"``."""
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def _wheels(blueprint: Any) -> int:
    if not blueprint.has_attribute("number_of_wheels"):
        return 0
    return int(blueprint.get_attribute("number_of_wheels").as_int())
