"""The driving task's pure functions: reward bounds and components,
termination, metrics, observation builders."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rollout_workers.driving_task import (
    DrivingState,
    EpisodeTracker,
    FrameStack,
    build_vector,
    check_episode_end,
    step_reward,
    to_ego_frame,
    to_grayscale,
    wrap_angle,
)
from td3drive.contracts.config import DrivingTaskConfig

TASK = DrivingTaskConfig()
STILL = np.zeros(2, np.float32)


def state(**overrides: object) -> DrivingState:
    fields: dict[str, object] = {
        "speed": TASK.target_speed_mps,
        "lateral_deviation": 0.0,
        "heading_error": 0.0,
        "progress": TASK.target_speed_mps * 0.2,
        "route_completion": 0.5,
        "waypoints": np.zeros((10, 2), np.float32),
        "dt": 0.2,
        **overrides,
    }
    return DrivingState(**fields)  # type: ignore[arg-type]


def test_perfect_driving_earns_exactly_one_per_step() -> None:
    reward = step_reward(state(), STILL, STILL, TASK)
    assert reward.total == pytest.approx(1.0)
    assert reward.progress == pytest.approx(1.0)
    assert reward.lane_keeping == reward.comfort == reward.overspeed == reward.safety == 0.0


def test_step_reward_stays_in_its_documented_range() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = state(
            speed=float(rng.uniform(-20, 60)),
            lateral_deviation=float(rng.uniform(-20, 20)),
            heading_error=float(rng.uniform(-math.pi, math.pi)),
            progress=float(rng.uniform(-20, 20)),
        )
        reward = step_reward(s, rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2), TASK)
        assert -1.0 <= reward.total <= 1.0
        parts = reward.progress + reward.overspeed + reward.lane_keeping + reward.comfort
        assert reward.total == pytest.approx(float(np.clip(parts, -1, 1)))


def test_terminal_penalties_add_outside_the_clip() -> None:
    crash = step_reward(state(collision=True), STILL, STILL, TASK)
    assert crash.safety == -TASK.collision_penalty
    assert crash.total == pytest.approx(1.0 - TASK.collision_penalty)
    off = step_reward(state(off_road=True, lateral_deviation=9.0), STILL, STILL, TASK)
    assert off.safety == -TASK.off_road_penalty
    stopped = state(speed=0.0, progress=0.0)
    stuck_steps = int(TASK.stuck_seconds / stopped.dt)
    end = check_episode_end(stopped, stuck_steps, stuck_steps, TASK)
    assert end.reason == "stuck" and end.terminated
    assert step_reward(stopped, STILL, STILL, TASK, end).safety == -TASK.stuck_penalty
    still_waiting = check_episode_end(stopped, stuck_steps - 1, stuck_steps - 1, TASK)
    assert step_reward(stopped, STILL, STILL, TASK, still_waiting).safety == 0.0


def test_going_backwards_or_spinning_is_not_progress() -> None:
    backwards = step_reward(state(progress=-1.6, speed=-8.0), STILL, STILL, TASK)
    assert backwards.progress == pytest.approx(-1.0)
    # Spinning in place: fast, but no distance along the route.
    spinning = step_reward(state(progress=0.0, heading_error=2.5), STILL, STILL, TASK)
    assert spinning.progress == 0.0 and spinning.total < 0


def test_each_penalty_is_reported_in_its_component() -> None:
    fast = step_reward(state(speed=2 * TASK.target_speed_mps), STILL, STILL, TASK)
    assert fast.overspeed == pytest.approx(-TASK.w_overspeed)
    drifting = step_reward(state(lateral_deviation=TASK.lane_half_width_m), STILL, STILL, TASK)
    assert drifting.lane_keeping == pytest.approx(-TASK.w_lane)
    jerky = step_reward(state(), np.array([1, 1]), np.array([-1, -1]), TASK)
    assert jerky.comfort == pytest.approx(-TASK.w_comfort)


@pytest.mark.parametrize(
    ("overrides", "steps", "stuck", "expected"),
    [
        ({"collision": True, "route_completion": 1.0}, 5, 0, (True, False, "collision")),
        ({"off_road": True}, 5, 0, (True, False, "off_road")),
        ({}, 5, 50, (True, False, "stuck")),
        ({"route_completion": 1.0}, 5, 0, (True, False, "route_complete")),
        ({}, TASK.max_episode_steps, 0, (False, True, "time_limit")),
        ({}, 5, 0, (False, False, None)),
    ],
)
def test_episode_end_rules(
    overrides: dict[str, object], steps: int, stuck: int, expected: tuple[object, ...]
) -> None:
    end = check_episode_end(state(**overrides), steps, stuck, TASK)
    assert (end.terminated, end.truncated, end.reason) == expected


def test_tracker_reports_the_episode_metrics() -> None:
    tracker = EpisodeTracker()
    for speed, completion in ((5.0, 0.3), (7.0, 0.6)):
        s = state(speed=speed, route_completion=completion)
        tracker.record(s, step_reward(s, STILL, STILL, TASK), check_episode_end(s, 1, 0, TASK))
    end_state = state(route_completion=1.0)
    tracker.record(
        end_state,
        step_reward(end_state, STILL, STILL, TASK),
        check_episode_end(end_state, 3, 0, TASK),
    )
    metrics = tracker.metrics()
    assert metrics["length"] == 3
    assert metrics["mean_speed_kmh"] == pytest.approx((5 + 7 + 8) / 3 * 3.6)
    assert metrics["route_completion"] == 1.0 and metrics["success"] is True
    assert metrics["collision"] is False
    assert metrics["return"] == pytest.approx(
        sum(v for k, v in metrics.items() if k.startswith("reward_"))
    )


def test_grayscale_from_rgb_and_bgra() -> None:
    rgb = np.zeros((84, 84, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    assert np.all(to_grayscale(rgb) == round(0.299 * 255))
    bgra = np.zeros((84, 84, 4), np.uint8)
    bgra[..., 2] = 255  # red in CARLA's BGRA
    bgra[..., 3] = 255
    assert np.all(to_grayscale(bgra, "BGRA") == round(0.299 * 255))
    big = np.full((120, 160, 3), 200, np.uint8)
    out = to_grayscale(big)
    assert out.shape == (84, 84) and out.dtype == np.uint8 and np.all(out == 200)
    with pytest.raises(ValueError, match="uint8"):
        to_grayscale(big.astype(np.float32))
    with pytest.raises(ValueError, match="channels"):
        to_grayscale(bgra, "RGB")


def test_frame_stack_is_oldest_first() -> None:
    stack = FrameStack()
    frames = [np.full((84, 84), i, np.uint8) for i in range(6)]
    first = stack.reset(frames[0])
    assert first.shape == (4, 84, 84) and np.all(first == 0)
    for i in range(1, 6):
        out = stack.push(frames[i])
    assert [int(f[0, 0]) for f in out] == [2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="before reset"):
        FrameStack().push(frames[0])


def test_vector_layout_and_scaling() -> None:
    waypoints = np.stack([np.arange(1, 11) * 5.0, np.linspace(-2, 2, 10)], axis=1)
    s = state(speed=4.0, lateral_deviation=-1.25, heading_error=math.pi / 4, waypoints=waypoints)
    vector = build_vector(s, TASK)
    assert vector.dtype == np.float32 and vector.shape == (23,)
    np.testing.assert_allclose(vector[:3], [0.5, -0.5, 0.25])
    np.testing.assert_allclose(vector[3:].reshape(10, 2), waypoints / 50.0, rtol=1e-6)
    with pytest.raises(ValueError, match="waypoints"):
        build_vector(state(waypoints=np.zeros((5, 2))), TASK)


def test_ego_frame_is_x_forward_y_left() -> None:
    ahead_left = np.array([[10.0, 12.0]])
    # Car at (10, 2) facing +y (heading 90 deg): (10, 12) is 10 m straight ahead.
    np.testing.assert_allclose(
        to_ego_frame(ahead_left, np.array([10.0, 2.0]), math.pi / 2), [[10, 0]], atol=1e-6
    )
    # Facing +x: a point at +y is to the left.
    np.testing.assert_allclose(
        to_ego_frame(np.array([[0.0, 3.0]]), np.zeros(2), 0.0), [[0, 3]], atol=1e-6
    )
    assert wrap_angle(3 * math.pi / 2) == pytest.approx(-math.pi / 2)


def test_speed_only_vector_keeps_the_speed_and_hides_the_lane_geometry() -> None:
    s = state(speed=4.0, lateral_deviation=1.0, heading_error=0.3)
    full = build_vector(s, TASK)
    speed_only = build_vector(s, TASK.model_copy(update={"observation_vector": "speed_only"}))
    assert speed_only[0] == full[0] == pytest.approx(4.0 / TASK.target_speed_mps)
    assert np.all(speed_only[1:] == 0.0) and np.any(full[1:] != 0.0)
