"""The CARLA environment, ``td3drive/Carla-v0`` (DESIGN.md §5): :class:`CarlaEnv`.

* :class:`CarlaEnv`: the gymnasium API over a :class:`CarlaConnection`; one
  :meth:`CarlaEnv.step` is one ``world.tick()``. Episodes are set up by
  :mod:`~rollout_workers.carla.spawning`, observed through
  :mod:`~rollout_workers.carla.observation`, scored by :mod:`~rollout_workers.carla.episode`,
  and a failed server is dealt with by :mod:`~rollout_workers.carla.recovery`.

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

from typing import Any

import gymnasium as gym
import numpy as np

from rollout_workers import driving_task
from rollout_workers.carla import recovery, spawning
from rollout_workers.carla.connection import CarlaConnection, CarlaSpawnError, CarlaTimeoutError
from rollout_workers.carla.episode import EpisodeScorer
from rollout_workers.carla.observation import CameraObserver, read_state, vehicle_xy
from rollout_workers.carla.registry import ActorRegistry
from rollout_workers.carla.route import RouteTracker
from rollout_workers.carla.sensors import EgoSensors
from rollout_workers.carla.transforms import to_vehicle_control
from td3drive.contracts import spec
from td3drive.contracts.config import CarlaConfig, DrivingTaskConfig


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
        self.off_route_m = 4.0 * self.task_config.lane_half_width_m

        self._connection = CarlaConnection(self.carla_config)
        self.address = self._connection.address
        self._registry = ActorRegistry()
        self._sensors = EgoSensors(self.address)
        self._vehicle: Any = None
        self._route: RouteTracker | None = None
        self._observer = CameraObserver(self.task_config)
        self._episode = EpisodeScorer(self.task_config)
        self._episode_over = True
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
        recovery.ensure_connected(self._connection, self._registry, self._cleanup_actors)
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
            frame = self._connection.tick()
            bgra = self._wait_camera(frame)
            collided, invaded = self._sensors.pop_events(frame)
            state = self._read_state(collision=collided, lane_invasion=invaded)
        except RuntimeError as exc:  # what the carla client raises on time-outs and errors
            self._episode_over = True
            raise self._connection.translate(exc, "step") from exc
        except BaseException:  # CarlaTimeoutError from the tick or the camera
            self._episode_over = True
            raise

        reward, end = self._episode.score(state, action)
        full = driving_task.full_vector(state, self.task_config)
        obs = self._observer.observe(bgra, full, push=True)
        info: dict[str, Any] = {
            "reward_components": reward.as_dict(),
            "frame": frame,
            "end_reason": end.reason,
            "route_completion": state.route_completion,
            "speed_mps": state.speed,
            "privileged_vector": full,
        }
        if end.terminated or end.truncated:
            info["episode_metrics"] = self._episode.tracker.metrics()
            self._episode_over = True
        return obs, reward.total, end.terminated, end.truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """The last camera frame as ``uint8[H, W, 3]`` RGB (``render_mode="rgb_array"``)."""
        last_bgra = self._observer.last_bgra
        if self.render_mode != "rgb_array" or last_bgra is None:
            return None
        return last_bgra[..., 2::-1].copy()

    def close(self) -> None:
        """Destroy every actor, restore the server's original world settings and
        the Traffic Manager's asynchronous mode, and drop the connection.

        Idempotent, and never raises: failures (a dead server) are logged.
        """
        if self._connection.client is None and len(self._registry) == 0:
            return
        try:
            self._cleanup_after_error()
        finally:
            self._connection.restore()
            self._connection.drop()
            self._vehicle = None
            self._route = None
            self._episode_over = True

    # ---------------------------------------------------------------- server
    def _wait_camera(self, frame: int) -> np.ndarray:
        try:
            return self._sensors.camera.wait_for(frame, self.carla_config.timeout_s)
        except CarlaTimeoutError:
            self._connection.broken = True
            raise

    # ---------------------------------------------------------------- episodes
    def _cleanup_after_error(self) -> None:
        """:meth:`_cleanup_actors`, unless the server is gone (then its actors are too:
        forget them rather than wait ``timeout_s`` per actor for a dead server)."""
        recovery.forget_if_server_gone(self._connection, self._registry)
        self._cleanup_actors()

    def _cleanup_actors(self) -> None:
        if len(self._registry):
            self._registry.destroy_all()
        self._vehicle = None
        self._sensors.clear()

    def _start_episode(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        try:
            vehicle, route, spawn_index, frame = spawning.set_up_episode(
                self._connection, self._registry, self._sensors, self.task_config, self.np_random
            )
            self._vehicle, self._route = vehicle, route
            bgra = self._wait_camera(frame)
            self._sensors.pop_events(frame)
            route.advance(vehicle_xy(vehicle))  # where the car settled
            state = self._read_state(collision=False, lane_invasion=False, progress=0.0)
        except RuntimeError as exc:
            if isinstance(exc, CarlaSpawnError):
                raise
            raise self._connection.translate(exc, "reset") from exc
        self._episode = EpisodeScorer(self.task_config)
        full = driving_task.full_vector(state, self.task_config)
        obs = self._observer.observe(bgra, full, push=False)
        assert self._route is not None
        info = {
            "frame": frame,
            "spawn_point": spawn_index,
            "route_length_m": self._route.goal_m,
            "privileged_vector": full,
        }
        return obs, info

    # ---------------------------------------------------------------- state
    def _read_state(
        self, *, collision: bool, lane_invasion: bool, progress: float | None = None
    ) -> driving_task.DrivingState:
        assert self._route is not None
        return read_state(
            self._vehicle,
            self._route,
            self._connection.map,
            self.task_config,
            off_route_m=self.off_route_m,
            dt=self.carla_config.fixed_delta_seconds,
            collision=collision,
            lane_invasion=lane_invasion,
            progress=progress,
        )
