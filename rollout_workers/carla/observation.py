"""What the agent sees: the driving state read from the server, and the observation.

* :func:`vehicle_xy`: the ego vehicle's world ``(x, y)``;
* :func:`read_state`: a :class:`driving_task.DrivingState` from the vehicle, the route and the map;
* :class:`CameraObserver`: camera frames and the state → the observation dict.
"""

from __future__ import annotations

from typing import Any

import carla
import numpy as np

from rollout_workers import driving_task
from rollout_workers.carla.route import RouteTracker
from rollout_workers.carla.transforms import carla_heading_error, carla_to_ego
from td3drive.contracts.config import DrivingTaskConfig


def vehicle_xy(vehicle: Any) -> np.ndarray:
    """``float64[2]`` world ``(x, y)`` of ``vehicle``, m (CARLA's frame)."""
    location = vehicle.get_location()
    return np.array([location.x, location.y], np.float64)


def read_state(
    vehicle: Any,
    route: RouteTracker,
    carla_map: Any,
    task_config: DrivingTaskConfig,
    *,
    off_route_m: float,
    dt: float,
    collision: bool,
    lane_invasion: bool,
    progress: float | None = None,
) -> driving_task.DrivingState:
    """The driving task's view of the ego vehicle now.

    Args:
        vehicle: the ego ``carla.Vehicle``.
        route: the episode's route; advanced to the car's position unless
            ``progress`` is given.
        carla_map: the ``carla.Map`` (is the car on a driving lane?).
        task_config: look-ahead spacing of the route points.
        off_route_m: distance from the route beyond which the car is off-road, m.
        dt: seconds per step.
        collision: a collision happened this step.
        lane_invasion: a lane marking was crossed this step.
        progress: progress along the route to report, m; ``None`` measures it
            (and moves the tracker).

    Returns:
        ``speed`` m/s along the car's forward vector, ``lateral_deviation`` m
        (``> 0`` left of the route), ``heading_error`` rad, 10 ego-frame
        look-ahead waypoints m; ``off_road`` when on no driving lane or more
        than ``off_route_m`` from the route.
    """
    transform = vehicle.get_transform()
    velocity = vehicle.get_velocity()
    forward = transform.get_forward_vector()
    speed = velocity.x * forward.x + velocity.y * forward.y + velocity.z * forward.z
    location = transform.location
    xy = np.array([location.x, location.y], np.float64)
    yaw = transform.rotation.yaw
    if progress is None:
        progress, lateral, lane_yaw, _ = route.advance(xy)
    else:
        _, lateral, lane_yaw, _ = route.locate(xy)
    on_driving_lane = (
        carla_map.get_waypoint(location, project_to_road=False, lane_type=carla.LaneType.Driving)
        is not None
    )
    waypoints = carla_to_ego(route.lookahead(task_config.waypoint_spacing_m), xy, yaw)
    return driving_task.DrivingState(
        speed=float(speed),
        lateral_deviation=lateral,
        heading_error=carla_heading_error(yaw, lane_yaw),
        progress=float(progress),
        route_completion=route.completion,
        waypoints=waypoints,
        collision=collision,
        off_road=(not on_driving_lane) or abs(lateral) > off_route_m,
        lane_invasion=lane_invasion,
        dt=dt,
    )


class CameraObserver:
    """The observation from the front camera and the driving state.

    Args:
        task_config: scales the vector (:func:`driving_task.build_vector`).

    Attributes:
        last_bgra: the last camera frame, ``uint8[H, W, 4]`` BGRA (``None``
            before the first), for rendering.
    """

    def __init__(self, task_config: DrivingTaskConfig) -> None:
        self.task_config = task_config
        self.frames = driving_task.FrameStack()
        self.last_bgra: np.ndarray | None = None

    def observe(self, bgra: np.ndarray, full: np.ndarray, push: bool) -> dict[str, np.ndarray]:
        """``{"image": uint8[4, 84, 84], "vector": float32[23]}`` from a BGRA
        camera frame ``uint8[H, W, 4]`` and the step's
        :func:`driving_task.full_vector` ``float32[23]`` (the vector is what
        the policy observes of it, a copy); ``push=False`` starts a new frame
        stack (the first frame repeated)."""
        self.last_bgra = bgra
        gray = driving_task.to_grayscale(bgra, channel_order="BGRA")
        image = self.frames.push(gray) if push else self.frames.reset(gray)
        return {"image": image, "vector": driving_task.observed_vector(full, self.task_config)}
