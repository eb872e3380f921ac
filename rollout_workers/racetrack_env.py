"""``td3drive/Racetrack-v0``: the embedded simulator, on highway-env's racetrack.

highway-env (Leurent 2018) supplies the vehicle dynamics, the track, other
vehicles and an 84×84 grayscale top-down renderer (its ``GrayscaleObservation``
with one frame, rendered off-screen: with ``SDL_VIDEODRIVER=dummy`` and the
on-screen path its frames come out black). This adapter turns its state into a
:class:`~rollout_workers.driving_task.DrivingState`; the driving task does the
rest (reward, termination, metrics, frame stack, vector), exactly as for CARLA.

Frames of reference: highway-env's world is a right-handed x/y plane with
headings counter-clockwise, so its lane ``lateral`` coordinate is positive to
the left and needs no flip; its steering angle is positive to the left, so
our ``steer`` (positive right) is negated. Its action order is
``[acceleration, steering]``; ours is ``[steer, throttle_brake]``. Its cars reverse under
negative acceleration; ours brake to a standstill (``throttle_brake < 0`` is a
brake, as in CARLA).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import gymnasium as gym
import numpy as np
from highway_env.envs.common.graphics import EnvViewer
from highway_env.envs.racetrack_env import RacetrackEnv as HighwayRacetrack

from rollout_workers.driving_task import (
    DrivingState,
    EpisodeTracker,
    FrameStack,
    check_episode_end,
    full_vector,
    observed_vector,
    step_reward,
    to_ego_frame,
    wrap_angle,
)
from td3drive.contracts import spec
from td3drive.contracts.config import DrivingTaskConfig


def _quiet_sdl() -> None:
    """SDL (pygame, highway-env's renderer) prints "XDG_RUNTIME_DIR is invalid
    or not set" from every process that renders when the variable is missing
    (containers, Ray workers): give it a private directory, as a login
    session would (the XDG base directory spec asks for mode 0700)."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = os.path.join(tempfile.gettempdir(), f"td3drive-runtime-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = path


_quiet_sdl()

RENDER_SIZE_PX = 336
"""Side of :meth:`RacetrackEnv.render`'s square colour view, px."""
RENDER_SCALING_PX_PER_M = 3.0
"""Its scale: 112 m across, the car and the curve ahead."""

POLICY_FREQUENCY_HZ = 5
MAX_SPEED_MPS = 40.0
"""highway-env's own top speed for its vehicles."""
SIMULATION_FREQUENCY_HZ = 15


class RacetrackEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """highway-env's racetrack with continuous steering and throttle, seen through
    the shared driving task.

    Observation: ``{"image": uint8[4,84,84], "vector": float32[23]}``
    (:func:`td3drive.contracts.spec.observation_space`); action ``float32[2]``
    ``[steer (+ right), throttle_brake (+ throttle)]`` in ``[−1, 1]``. One step
    is 0.2 s (5 Hz policy, 15 Hz physics).

    Args:
        task: driving task settings (a dict is validated as :class:`DrivingTaskConfig`).
        other_vehicles: other cars on the track (collisions end episodes).
        render_mode: ``None`` or ``"rgb_array"`` (a colour top-down view
            around the car, ``uint8[336, 336, 3]``; for evaluation videos).
        max_steering_rad: front-wheel angle at ``|steer| = 1``, rad, in
            ``(0, π/2)``; highway-env's default is π/4. The track's tightest
            curve (15 m radius) needs about 0.33 rad (19°) with its 5 m car.

    Raises:
        pydantic.ValidationError: an invalid ``task``.
        ValueError: ``max_steering_rad`` outside ``(0, π/2)``.
        ValueError: an action of the wrong shape or with NaN (in :meth:`step`).
    """

    metadata = {  # noqa: RUF012 (gymnasium declares it a plain class attribute)
        "render_modes": ["rgb_array"],
        "render_fps": POLICY_FREQUENCY_HZ,
    }

    def __init__(
        self,
        task: DrivingTaskConfig | dict[str, Any] | None = None,
        other_vehicles: int = 1,
        render_mode: str | None = None,
        max_steering_rad: float = math.pi / 4,
    ) -> None:
        self.task = (
            task if isinstance(task, DrivingTaskConfig) else DrivingTaskConfig(**(task or {}))
        )
        if not 0.0 < max_steering_rad < math.pi / 2:
            raise ValueError(f"max_steering_rad must be in (0, pi/2), got {max_steering_rad}")
        self.render_mode = render_mode
        self._viewer: EnvViewer | None = None
        self.observation_space = spec.observation_space()
        self.action_space = spec.action_space()
        self.dt = 1.0 / POLICY_FREQUENCY_HZ
        self._sim = HighwayRacetrack(
            config={
                "observation": {
                    "type": "GrayscaleObservation",
                    "observation_shape": (spec.FRAME_SIZE, spec.FRAME_SIZE),
                    "stack_size": 1,
                    "weights": [0.2989, 0.5870, 0.1140],
                    "scaling": 1.75,
                },
                # speed_range: highway-env's kinematic model reverses under
                # negative acceleration; our throttle_brake < 0 is a brake
                # (as in CARLA), so the ego car stops at 0 (see step()).
                "action": {
                    "type": "ContinuousAction",
                    "longitudinal": True,
                    "lateral": True,
                    "speed_range": [0.0, MAX_SPEED_MPS],
                    "steering_range": [-max_steering_rad, max_steering_rad],
                },
                "offscreen_rendering": True,
                "other_vehicles": other_vehicles,
                "simulation_frequency": SIMULATION_FREQUENCY_HZ,
                "policy_frequency": POLICY_FREQUENCY_HZ,
                # The driving task owns the time limit and termination.
                "duration": (self.task.max_episode_steps + 10) / POLICY_FREQUENCY_HZ,
                "terminate_off_road": False,
            }
        )
        self._frames = FrameStack()
        self._tracker = EpisodeTracker()
        self._previous_action = np.zeros(spec.ACTION_DIM, np.float32)
        self._distance = 0.0
        self._steps = 0
        self._stuck_steps = 0

    # ------------------------------------------------------------ gymnasium
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        if seed is None:
            seed = int(self.np_random.integers(2**31))
        observation, _ = self._sim.reset(seed=seed)
        self._tracker = EpisodeTracker()
        self._previous_action = np.zeros(spec.ACTION_DIM, np.float32)
        self._distance = 0.0
        self._steps = 0
        self._stuck_steps = 0
        image = self._frames.reset(self._frame(observation))
        state = self._state(progress=0.0)
        full = full_vector(state, self.task)
        return {"image": image, "vector": observed_vector(full, self.task)}, {
            "privileged_vector": full
        }

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float32)
        if action.shape != spec.ACTION_SHAPE or not np.isfinite(action).all():
            raise ValueError(f"action must be finite float32[2], got {action!r}")
        action = np.clip(action, spec.ACTION_LOW, spec.ACTION_HIGH)
        steer, throttle_brake = float(action[spec.STEER]), float(action[spec.THROTTLE_BRAKE])
        observation, _, _, _, _ = self._sim.step(np.array([throttle_brake, -steer], np.float32))

        vehicle = self._sim.vehicle
        if vehicle.speed < 0.0:
            # highway-env only pushes a speed below its minimum back up; a
            # brake holds the car at a standstill instead of reversing.
            vehicle.speed = 0.0
        _, heading_error = self._lane_coordinates()
        progress = float(vehicle.speed) * math.cos(heading_error) * self.dt
        state = self._state(progress)
        self._steps += 1
        self._stuck_steps = (
            self._stuck_steps + 1 if abs(state.speed) < self.task.stuck_speed_mps else 0
        )
        end = check_episode_end(state, self._steps, self._stuck_steps, self.task)
        reward = step_reward(state, action, self._previous_action, self.task, end)
        self._tracker.record(state, reward, end)
        self._previous_action = action
        image = self._frames.push(self._frame(observation))
        full = full_vector(state, self.task)
        info: dict[str, Any] = {
            "reward_components": reward.as_dict(),
            "speed_mps": state.speed,
            "route_completion": state.route_completion,
            "end_reason": end.reason,
            "privileged_vector": full,
        }
        if end.terminated or end.truncated:
            info["episode_metrics"] = self._tracker.metrics()
        obs = {"image": image, "vector": observed_vector(full, self.task)}
        return obs, reward.total, end.terminated, end.truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """highway-env's colour top-down view around the ego car,
        ``uint8[RENDER_SIZE_PX, RENDER_SIZE_PX, 3]`` RGB at
        ``RENDER_SCALING_PX_PER_M`` (``render_mode="rgb_array"``; else ``None``).

        Drawn off-screen by a viewer of its own (highway-env's ``render()``
        would redraw every physics sub-step); the policy's 84×84 frames are
        unchanged. Blank under ``SDL_VIDEODRIVER=dummy``.
        """
        if self.render_mode != "rgb_array":
            return None
        if self._viewer is None:
            config = dict(self._sim.config)
            config.update(
                screen_width=RENDER_SIZE_PX,
                screen_height=RENDER_SIZE_PX,
                scaling=RENDER_SCALING_PX_PER_M,
                centering_position=[0.5, 0.5],
                offscreen_rendering=True,
            )
            self._viewer = EnvViewer(self._sim, config=config)
        self._viewer.display()
        image = self._viewer.get_image()
        return None if image is None else np.ascontiguousarray(image, dtype=np.uint8)

    def close(self) -> None:
        # Not viewer.close(): it calls pygame.quit(), which would stop the
        # frame renderer of every other env in this process.
        self._viewer = None
        self._sim.close()

    # ------------------------------------------------------------ adapter
    @staticmethod
    def _frame(observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(observation[-1], dtype=np.uint8)

    def _lane_coordinates(self) -> tuple[float, float]:
        """(lateral deviation m, heading error rad) of the ego vehicle on its lane."""
        vehicle = self._sim.vehicle
        lane = vehicle.lane
        longitudinal, lateral = lane.local_coordinates(vehicle.position)
        heading_error = wrap_angle(float(vehicle.heading) - float(lane.heading_at(longitudinal)))
        return float(lateral), heading_error

    def _state(self, progress: float) -> DrivingState:
        vehicle = self._sim.vehicle
        lateral, heading_error = self._lane_coordinates()
        self._distance += progress
        completion = min(max(self._distance / self.task.route_length_m, 0.0), 1.0)
        return DrivingState(
            speed=float(vehicle.speed),
            lateral_deviation=lateral,
            heading_error=heading_error,
            progress=progress,
            route_completion=completion,
            waypoints=self._waypoints(),
            collision=bool(vehicle.crashed),
            off_road=not bool(vehicle.on_road),
            lane_invasion=False,
            dt=self.dt,
        )

    def _waypoints(self) -> np.ndarray:
        """The next 10 lane-centre points, ``waypoint_spacing_m`` apart, in the ego frame."""
        vehicle = self._sim.vehicle
        network = self._sim.road.network
        lane_index = vehicle.lane_index
        lane = network.get_lane(lane_index)
        longitudinal, _ = lane.local_coordinates(vehicle.position)
        points = []
        for i in range(1, spec.NUM_WAYPOINTS + 1):
            target = longitudinal + i * self.task.waypoint_spacing_m
            walk_index, walk_lane = lane_index, lane
            while target > walk_lane.length:
                target -= walk_lane.length
                walk_index = network.next_lane(walk_index, position=walk_lane.position(target, 0))
                walk_lane = network.get_lane(walk_index)
            points.append(walk_lane.position(target, 0))
        return to_ego_frame(np.asarray(points), vehicle.position, float(vehicle.heading))
