"""The driving task, shared by every simulator (DESIGN.md §5).

Simulator adapters produce a :class:`DrivingState` and camera frames; this
module owns everything else, as pure functions:

* :func:`step_reward`: progress along the route at up to the target speed,
  lane keeping, comfort, and terminal safety penalties, each component
  reported separately;
* :func:`check_episode_end`: collision, off-road, stuck and route complete
  end the episode as ``terminated``; the time limit as ``truncated``;
* :class:`EpisodeTracker`: the episode metrics;
* observation builders: :func:`to_grayscale` (RGB/BGRA → uint8 84×84),
  :class:`FrameStack` (4 frames, oldest first), :func:`build_vector` (the 23
  values of :data:`td3drive.contracts.spec.VECTOR_LAYOUT`, scaled as documented there,
  or only the speed: ``task.observation_vector``).

Conventions (every adapter converts to them): the ego frame has ``x``
forward and ``y`` to the left, metres; ``lateral_deviation > 0`` means left of
the lane centre; ``heading_error > 0`` means the car points left of the lane
direction (radians, wrapped to ``[−π, π]``); ``steer > 0`` turns right
(CARLA's convention); ``throttle_brake > 0`` accelerates, ``< 0`` brakes.

Reward range. The per-step reward (without terminal penalties) is clipped to
``[−1, 1]``: full progress at the target speed earns at most ``+1`` per step.
A collision or leaving the road adds ``−collision_penalty`` / ``−off_road_penalty``
(10 by default: the value of ~10 steps of perfect driving, and with
``γ = 0.99`` about a tenth of the best discounted return). The reference
system's returns of −52,000 and Q values of 1.8 million came from unbounded
per-step penalties; every term here is bounded.

Reward hacks of highway-env's own rewards (spinning in place, driving
backwards) earn nothing here: progress is the distance advanced *along the
route*, so spinning scores ~0 and reversing scores negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from td3drive.contracts import spec
from td3drive.contracts.config import DrivingTaskConfig

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights for R, G, B."""


@dataclass(frozen=True)
class DrivingState:
    """What a simulator adapter reports after each step.

    Attributes:
        speed: m/s along the ego heading (negative when reversing).
        lateral_deviation: m from the lane centre, ``> 0`` left.
        heading_error: rad, ego heading minus lane heading, in ``[−π, π]``, ``> 0`` left.
        progress: m advanced along the route during the last step (``< 0`` backwards).
        route_completion: fraction of the route driven, in ``[0, 1]``.
        waypoints: ``float32[10, 2]`` look-ahead route points in the ego frame, m.
        collision: the ego vehicle hit something during the step.
        off_road: the ego vehicle is off the drivable road.
        lane_invasion: a lane marking was crossed during the step.
        dt: seconds of simulated time per step.
    """

    speed: float
    lateral_deviation: float
    heading_error: float
    progress: float
    route_completion: float
    waypoints: np.ndarray
    collision: bool = False
    off_road: bool = False
    lane_invasion: bool = False
    dt: float = 0.1


@dataclass(frozen=True)
class RewardBreakdown:
    """A step's reward and its components (all already weighted)."""

    total: float
    progress: float
    overspeed: float
    lane_keeping: float
    comfort: float
    safety: float

    def as_dict(self) -> dict[str, float]:
        return {
            "progress": self.progress,
            "overspeed": self.overspeed,
            "lane_keeping": self.lane_keeping,
            "comfort": self.comfort,
            "safety": self.safety,
        }


def step_reward(
    state: DrivingState,
    action: np.ndarray,
    previous_action: np.ndarray,
    config: DrivingTaskConfig,
    end: EpisodeEnd | None = None,
) -> RewardBreakdown:
    """The reward of one step.

    Components (weights ``w_*`` from ``config``):

    * progress ``= w_progress · clip(progress / (target_speed · dt), −1, 1)``:
      the share of the distance the target speed would cover, along the route;
    * overspeed ``= −w_overspeed · clip((speed − target) / target, 0, 1)``;
    * lane keeping ``= −w_lane · min(|lateral| / lane_half_width, 1)
      − w_heading · min(|heading_error| / (π/2), 1)``;
    * comfort ``= −w_comfort · (|Δsteer| + |Δthrottle_brake|) / 4``;
    * safety ``= −collision_penalty`` on a collision, ``−off_road_penalty``
      off the road, ``−stuck_penalty`` when the step ends the episode as stuck
      (all terminal, outside the clip). Without the stuck penalty, stopping is
      a free way out of an episode whose values are negative: an early CPU
      run learned to creep a few metres and stop.

    Args:
        state: after the step.
        action: ``float32[2]`` applied in the step.
        previous_action: the action before it (zeros at an episode start).
        config: weights, target speed (m/s), lane half-width (m), penalties.
        end: how the step ends the episode (:func:`check_episode_end`), for
            the stuck penalty; ``None`` = it does not end it.

    Returns:
        The total ``clip(progress + overspeed + lane + comfort, −1, 1) + safety``
        and each weighted component.
    """
    target_distance = max(config.target_speed_mps * state.dt, 1e-6)
    progress = config.w_progress * float(np.clip(state.progress / target_distance, -1.0, 1.0))
    overspeed = -config.w_overspeed * float(
        np.clip((state.speed - config.target_speed_mps) / config.target_speed_mps, 0.0, 1.0)
    )
    lane = -config.w_lane * min(abs(state.lateral_deviation) / config.lane_half_width_m, 1.0)
    lane -= config.w_heading * min(abs(state.heading_error) / (math.pi / 2), 1.0)
    change = np.abs(np.asarray(action, np.float64) - np.asarray(previous_action, np.float64))
    comfort = -config.w_comfort * float(change.sum()) / 4.0
    safety = 0.0
    if state.collision:
        safety -= config.collision_penalty
    if state.off_road:
        safety -= config.off_road_penalty
    if end is not None and end.reason == "stuck":
        safety -= config.stuck_penalty
    shaped = float(np.clip(progress + overspeed + lane + comfort, -1.0, 1.0))
    return RewardBreakdown(shaped + safety, progress, overspeed, lane, comfort, safety)


@dataclass(frozen=True)
class EpisodeEnd:
    """Why (and whether) an episode ends after a step."""

    terminated: bool
    truncated: bool
    reason: str | None
    """``collision``, ``off_road``, ``stuck``, ``route_complete``, ``time_limit`` or ``None``."""


def check_episode_end(
    state: DrivingState, steps: int, stuck_steps: int, config: DrivingTaskConfig
) -> EpisodeEnd:
    """Termination rules.

    Args:
        state: after the step.
        steps: steps taken in the episode, this one included.
        stuck_steps: consecutive steps with ``speed < stuck_speed_mps``, this one included.
        config: limits.

    Returns:
        ``terminated`` for collision, off-road, stuck for ``stuck_seconds``
        and route complete (success), checked in that order; otherwise
        ``truncated`` at ``max_episode_steps``.
    """
    if state.collision:
        return EpisodeEnd(True, False, "collision")
    if state.off_road:
        return EpisodeEnd(True, False, "off_road")
    if stuck_steps * state.dt >= config.stuck_seconds:
        return EpisodeEnd(True, False, "stuck")
    if state.route_completion >= 1.0:
        return EpisodeEnd(True, False, "route_complete")
    if steps >= config.max_episode_steps:
        return EpisodeEnd(False, True, "time_limit")
    return EpisodeEnd(False, False, None)


@dataclass
class EpisodeTracker:
    """Accumulates one episode's metrics; :meth:`metrics` gives the summary."""

    episode_return: float = 0.0
    length: int = 0
    speed_sum: float = 0.0
    route_completion: float = 0.0
    collision: bool = False
    off_road: bool = False
    end_reason: str | None = None
    components: dict[str, float] = field(default_factory=dict)

    def record(self, state: DrivingState, reward: RewardBreakdown, end: EpisodeEnd) -> None:
        self.episode_return += reward.total
        self.length += 1
        self.speed_sum += state.speed
        self.route_completion = max(self.route_completion, min(state.route_completion, 1.0))
        self.collision |= state.collision
        self.off_road |= state.off_road
        if end.reason is not None:
            self.end_reason = end.reason
        for name, value in reward.as_dict().items():
            self.components[name] = self.components.get(name, 0.0) + value

    def metrics(self) -> dict[str, float | int | bool | str | None]:
        """``return``, ``length``, ``mean_speed_kmh``, ``route_completion`` in
        ``[0, 1]``, ``success`` (route complete), ``collision``, ``off_road``,
        ``end_reason``, and the summed reward components (``reward_<name>``)."""
        mean_speed = self.speed_sum / self.length if self.length else 0.0
        out: dict[str, float | int | bool | str | None] = {
            "return": self.episode_return,
            "length": self.length,
            "mean_speed_kmh": mean_speed * 3.6,
            "route_completion": self.route_completion,
            "success": self.end_reason == "route_complete",
            "collision": self.collision,
            "off_road": self.off_road,
            "end_reason": self.end_reason,
        }
        out.update({f"reward_{k}": v for k, v in self.components.items()})
        return out


# ---------------------------------------------------------------- observations
def to_grayscale(image: np.ndarray, channel_order: str = "RGB") -> np.ndarray:
    """Camera image → ``uint8[84, 84]`` grayscale.

    Args:
        image: ``uint8[H, W]`` (already gray), ``uint8[H, W, 3]`` or
            ``uint8[H, W, 4]``.
        channel_order: ``"RGB"``, ``"RGBA"``, ``"BGR"`` or ``"BGRA"`` (CARLA's
            camera) for colour input.

    Returns:
        BT.601 luma, resized with area-weighted (box) filtering when the
        input is not 84×84.

    Raises:
        ValueError: a dtype other than uint8, or a shape/order mismatch.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"camera image must be uint8, got {image.dtype}")
    if image.ndim == 3:
        if image.shape[2] != len(channel_order) or channel_order not in (
            "RGB",
            "RGBA",
            "BGR",
            "BGRA",
        ):
            raise ValueError(f"image with {image.shape[2]} channels is not {channel_order}")
        red, green, blue = (image[..., channel_order.index(c)] for c in "RGB")
        gray = LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue
        image = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    elif image.ndim != 2:
        raise ValueError(f"camera image must be [H, W] or [H, W, C], got {image.shape}")
    size = spec.FRAME_SIZE
    if image.shape != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))
    return image


class FrameStack:
    """The last 4 frames, oldest first; a reset fills the stack with its frame."""

    def __init__(self, depth: int = spec.FRAME_STACK) -> None:
        self.depth = depth
        self._frames: np.ndarray | None = None

    def reset(self, frame: np.ndarray) -> np.ndarray:
        """Start an episode: ``uint8[4, 84, 84]`` of ``frame`` repeated."""
        self._frames = np.repeat(frame[None], self.depth, axis=0)
        return self._frames.copy()

    def push(self, frame: np.ndarray) -> np.ndarray:
        """Append the newest frame, drop the oldest; returns a copy.

        Raises:
            RuntimeError: before :meth:`reset`.
        """
        if self._frames is None:
            raise RuntimeError("FrameStack.push before reset")
        self._frames = np.concatenate([self._frames[1:], frame[None]])
        return self._frames.copy()


def build_vector(state: DrivingState, config: DrivingTaskConfig) -> np.ndarray:
    """The 23-value observation vector, as ``config.observation_vector`` says.

    ``"full"``: :func:`full_vector`. ``"speed_only"``: the same with every
    value but the speed set to 0, so lane geometry reaches the policy only
    through the camera.

    Raises:
        ValueError: ``waypoints`` is not ``[10, 2]``.
    """
    return observed_vector(full_vector(state, config), config)


def observed_vector(full: np.ndarray, config: DrivingTaskConfig) -> np.ndarray:
    """What the policy observes of a :func:`full_vector` ``float32[23]``: a
    copy of it (``"full"``), or one with every value but the speed set to 0
    (``"speed_only"``). Never the same array, so the observation and
    ``info["privileged_vector"]`` do not alias."""
    observed = full.copy()
    if config.observation_vector == "speed_only":
        observed[1:] = 0.0
    return observed


def full_vector(state: DrivingState, config: DrivingTaskConfig) -> np.ndarray:
    """The 23-value vector with the lane geometry, scaled to roughly ``[−1, 1]``.

    ``[speed / target_speed, lateral_deviation / lane_half_width,
    heading_error / π, then for each of the 10 waypoints x / waypoint_range,
    y / waypoint_range]`` where ``waypoint_range = 10 × waypoint_spacing_m``.
    Units before scaling: m/s, m, rad, m (ego frame).

    Environments also report it as ``info["privileged_vector"]`` whatever
    the observation carries: privileged state for a scripted warm-up policy
    (:mod:`rollout_workers.scripted`), never stored in the replay.

    Raises:
        ValueError: ``waypoints`` is not ``[10, 2]``.
    """
    waypoints = np.asarray(state.waypoints, dtype=np.float32)
    if waypoints.shape != (spec.NUM_WAYPOINTS, 2):
        raise ValueError(f"waypoints must be [{spec.NUM_WAYPOINTS}, 2], got {waypoints.shape}")
    waypoint_range = spec.NUM_WAYPOINTS * config.waypoint_spacing_m
    head = [
        state.speed / config.target_speed_mps,
        state.lateral_deviation / config.lane_half_width_m,
        state.heading_error / math.pi,
    ]
    vector = np.concatenate([np.asarray(head, np.float32), waypoints.reshape(-1) / waypoint_range])
    return vector.astype(np.float32)


def wrap_angle(angle: float) -> float:
    """``angle`` wrapped to ``[−π, π)``, radians."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def to_ego_frame(points: np.ndarray, position: np.ndarray, heading: float) -> np.ndarray:
    """World points ``[N, 2]`` (m, a right-handed frame) → ego frame (x forward,
    y left) of a vehicle at ``position`` with ``heading`` (rad, counter-clockwise
    from the world x axis)."""
    delta = np.asarray(points, np.float64) - np.asarray(position, np.float64)
    cos, sin = math.cos(heading), math.sin(heading)
    forward = delta[:, 0] * cos + delta[:, 1] * sin
    left = -delta[:, 0] * sin + delta[:, 1] * cos
    return np.stack([forward, left], axis=1).astype(np.float32)
