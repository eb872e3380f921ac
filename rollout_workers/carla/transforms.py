"""Coordinate transforms and control mapping between CARLA and the driving task.

* :func:`carla_to_ego`: CARLA world points → the driving task's ego frame;
* :func:`carla_heading_error`: CARLA yaws → the driving task's heading error;
* :func:`to_vehicle_control`: the agent's action → ``carla.VehicleControl``.

Coordinates. CARLA (Unreal Engine 4) world coordinates are LEFT-handed: ``x``
forward, ``y`` to the RIGHT, ``z`` up, metres; ``yaw`` in degrees, positive
clockwise seen from above (a car with ``yaw = 90°`` drives towards ``+y``);
a forward vector is ``(cos yaw, sin yaw)``. The driving task's ego frame has
``x`` forward and ``y`` to the LEFT. :func:`carla_to_ego` and
:func:`carla_heading_error` are the only places that convert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import carla
import numpy as np

from rollout_workers import driving_task
from td3drive.contracts import spec


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
