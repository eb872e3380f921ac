"""A scripted lane-following policy that reads only the observation vector.

Pure pursuit on the second look-ahead waypoint plus a lateral correction, and
a proportional speed controller. It is a sanity baseline (it completes the
racetrack route where random driving leaves the road within seconds) and a
source of realistic driving data for benchmarks. It works only if the
vector's waypoints, lateral deviation and sign conventions mean what
:mod:`rollout_workers.driving_task` says they do.
"""

from __future__ import annotations

import numpy as np

from td3drive.contracts import spec
from td3drive.contracts.config import DrivingTaskConfig


def lane_follower(
    vector: np.ndarray,
    task: DrivingTaskConfig | None = None,
    cruise_speed_mps: float = 5.0,
) -> np.ndarray:
    """The action for one observation vector.

    Args:
        vector: ``float32[23]`` built by :func:`rollout_workers.driving_task.build_vector`.
        task: the scaling the vector was built with (defaults if ``None``).
        cruise_speed_mps: speed to hold, m/s.

    Returns:
        ``float32[2]`` ``[steer, throttle_brake]`` in ``[−1, 1]``.
    """
    task = task or DrivingTaskConfig()
    waypoint_range = spec.NUM_WAYPOINTS * task.waypoint_spacing_m
    waypoints = vector[3:].reshape(spec.NUM_WAYPOINTS, 2) * waypoint_range
    forward, left = waypoints[1]
    steer = -np.arctan2(left, forward) + 0.5 * vector[1]  # steer > 0 turns right
    speed = vector[0] * task.target_speed_mps
    throttle = 0.5 * (cruise_speed_mps - speed)
    return np.clip(np.array([steer, throttle], np.float32), -1.0, 1.0)
