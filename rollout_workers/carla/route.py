"""The route an episode drives, and the car's place on it.

* :func:`build_route`: waypoints along the lane from a start, seeded at junctions;
* :class:`RouteTracker`: the route as a polyline; arc length, lateral offset, look-ahead points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from td3drive.contracts import spec

ROUTE_RESOLUTION_M = 1.0
"""Spacing of the stored route points, m (look-ahead points are interpolated)."""
ROUTE_SEARCH_BEHIND_M = 5.0
ROUTE_SEARCH_AHEAD_M = 30.0
"""Window of the route searched around the last position, m (stops a route that
crosses itself from snapping to a later pass)."""


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

    Raises:
        ValueError: ``points_xy`` is not ``[N, 2]`` or has fewer than 2 distinct points.
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
