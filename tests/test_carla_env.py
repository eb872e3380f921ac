"""The CARLA adapter.

Without a server: every pure part, checked against the real ``carla`` client
types (``carla.Transform``/``Location``/``Rotation``/``VehicleControl``), the
bookkeeping classes (with recording stand-ins for actors: they test our
cleanup order, not CARLA), and the behaviour against a port where no server
listens (a real connection attempt that must fail fast and typed).

With a server (``@pytest.mark.carla``, run only when ``CARLA_HOST`` is set;
``CARLA_PORT`` defaults to 2000, ``CARLA_TM_PORT`` to 8000, ``CARLA_TOWN`` to
the config's Town03): reset/step/close against it. No server is faked.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from typing import Any

import carla
import gymnasium
import numpy as np
import pydantic
import pytest

import rollout_workers  # registers td3drive/Carla-v0
from rollout_workers import driving_task
from rollout_workers.carla import (
    ActorRegistry,
    CarlaConnectionError,
    CarlaEnv,
    CarlaTimeoutError,
    FrameEventLog,
    RouteTracker,
    SensorFrameBuffer,
    build_route,
    camera_image_to_array,
    carla_heading_error,
    carla_to_ego,
    to_vehicle_control,
)
from rollout_workers.carla.check import REPORT_FIELDS, check_server, format_report, main
from td3drive.contracts import spec
from td3drive.contracts.config import CarlaConfig


def closed_port() -> int:
    """A localhost TCP port where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ control mapping
def test_control_mapping_throttle_and_steer() -> None:
    control = to_vehicle_control(np.array([0.5, 0.3], np.float32))
    assert isinstance(control, carla.VehicleControl)
    assert control.steer == pytest.approx(0.5)
    assert control.throttle == pytest.approx(0.3)
    assert control.brake == 0.0
    assert not control.hand_brake
    assert not control.reverse


def test_control_mapping_brake_and_left_steer() -> None:
    control = to_vehicle_control([-0.25, -0.7])
    assert control.steer == pytest.approx(-0.25)  # < 0 turns left, as in CARLA
    assert control.throttle == 0.0
    assert control.brake == pytest.approx(0.7)


def test_control_mapping_clips() -> None:
    control = to_vehicle_control([3.0, -2.0])
    assert control.steer == pytest.approx(1.0)
    assert control.brake == pytest.approx(1.0)
    control = to_vehicle_control([-3.0, 5.0])
    assert control.steer == pytest.approx(-1.0)
    assert control.throttle == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [[0.0, float("nan")], [float("inf"), 0.0], [0.1], [0.1, 0.2, 0.3]])
def test_control_mapping_rejects_bad_actions(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        to_vehicle_control(bad)


# ------------------------------------------------------------------ ego frame
def _ego_via_carla(transform: carla.Transform, x: float, y: float) -> tuple[float, float]:
    """The point in the vehicle frame by CARLA's own maths (x forward, y RIGHT),
    converted to ours (y LEFT)."""
    local = transform.inverse_transform(carla.Location(x=x, y=y, z=transform.location.z))
    return local.x, -local.y


def test_point_ahead_of_a_car_with_yaw_90_is_straight_ahead() -> None:
    ego = carla.Transform(carla.Location(x=0.0, y=0.0), carla.Rotation(yaw=90.0))
    forward = ego.get_forward_vector()  # (0, 1): yaw 90° points to +y in CARLA
    assert forward.x == pytest.approx(0.0, abs=1e-6)
    assert forward.y == pytest.approx(1.0)
    out = carla_to_ego([[0.0, 10.0]], [0.0, 0.0], 90.0)
    assert out.dtype == np.float32
    assert out.shape == (1, 2)
    np.testing.assert_allclose(out, [[10.0, 0.0]], atol=1e-5)


@pytest.mark.parametrize(
    ("yaw", "point", "expected"),
    [
        (0.0, (10.0, 0.0), (10.0, 0.0)),  # ahead
        (0.0, (0.0, 5.0), (0.0, -5.0)),  # CARLA +y is the car's right → our y < 0
        (0.0, (0.0, -5.0), (0.0, 5.0)),  # left
        (90.0, (0.0, 10.0), (10.0, 0.0)),
        (90.0, (-5.0, 0.0), (0.0, -5.0)),  # right of a car facing +y is −x
        (180.0, (-10.0, 0.0), (10.0, 0.0)),
        (180.0, (0.0, -5.0), (0.0, -5.0)),  # right of a car facing −x is −y
        (-90.0, (0.0, -10.0), (10.0, 0.0)),
        (-90.0, (-5.0, 0.0), (0.0, 5.0)),  # left of a car facing −y is −x
        (90.0, (0.0, -3.0), (-3.0, 0.0)),  # behind
    ],
)
def test_carla_to_ego_cases(
    yaw: float, point: tuple[float, float], expected: tuple[float, float]
) -> None:
    out = carla_to_ego([point], [0.0, 0.0], yaw)
    np.testing.assert_allclose(out[0], expected, atol=1e-5)
    ego = carla.Transform(carla.Location(x=0.0, y=0.0), carla.Rotation(yaw=yaw))
    np.testing.assert_allclose(out[0], _ego_via_carla(ego, *point), atol=1e-4)


@pytest.mark.parametrize("yaw", [0.0, 90.0, 180.0, -90.0, 37.5, -123.0])
def test_carla_to_ego_matches_carla_vectors(yaw: float) -> None:
    """Using CARLA's own forward/right vectors of a car away from the origin."""
    ego = carla.Transform(carla.Location(x=3.0, y=-4.0, z=0.5), carla.Rotation(yaw=yaw))
    fwd, right = ego.get_forward_vector(), ego.get_right_vector()
    loc = ego.location
    points = [
        [loc.x + 10 * fwd.x, loc.y + 10 * fwd.y],  # 10 m ahead
        [loc.x + 5 * right.x, loc.y + 5 * right.y],  # 5 m right
        [loc.x - 5 * right.x, loc.y - 5 * right.y],  # 5 m left
        [loc.x + 7 * fwd.x - 2 * right.x, loc.y + 7 * fwd.y - 2 * right.y],
    ]
    out = carla_to_ego(points, [loc.x, loc.y], yaw)
    np.testing.assert_allclose(out, [[10, 0], [0, -5], [0, 5], [7, 2]], atol=1e-4)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(-50, 50, (5, 2)):
        np.testing.assert_allclose(
            carla_to_ego([[x, y]], [loc.x, loc.y], yaw)[0], _ego_via_carla(ego, x, y), atol=1e-3
        )


def test_carla_to_ego_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        carla_to_ego(np.zeros((3, 3)), [0, 0], 0.0)
    with pytest.raises(ValueError):
        carla_to_ego(np.zeros((3, 2)), [0, 0, 0], 0.0)


def test_heading_error_sign_and_wrap() -> None:
    # A car whose CARLA yaw is 10° smaller than the lane's points LEFT of it.
    assert carla_heading_error(80.0, 90.0) == pytest.approx(math.radians(10.0))
    assert carla_heading_error(100.0, 90.0) == pytest.approx(math.radians(-10.0))
    assert carla_heading_error(179.0, -179.0) == pytest.approx(math.radians(2.0))
    assert carla_heading_error(-179.0, 179.0) == pytest.approx(math.radians(-2.0))
    # Consistent with carla_to_ego: the nose of a car pointing left of the lane
    # lies at y > 0 in the lane's frame.
    car = carla.Transform(carla.Location(), carla.Rotation(yaw=80.0))
    nose = car.get_forward_vector()
    in_lane_frame = carla_to_ego([[nose.x, nose.y]], [0.0, 0.0], 90.0)[0]
    assert in_lane_frame[1] > 0
    assert math.atan2(in_lane_frame[1], in_lane_frame[0]) == pytest.approx(
        carla_heading_error(80.0, 90.0), abs=1e-6
    )


# ------------------------------------------------------------------ camera
def _bgra_bytes(colours_rgb: np.ndarray) -> bytes:
    """uint8[H, W, 3] RGB → CARLA's BGRA byte layout."""
    h, w, _ = colours_rgb.shape
    bgra = np.empty((h, w, 4), np.uint8)
    bgra[..., 0] = colours_rgb[..., 2]
    bgra[..., 1] = colours_rgb[..., 1]
    bgra[..., 2] = colours_rgb[..., 0]
    bgra[..., 3] = 255
    return bgra.tobytes()


def test_camera_bgra_to_array_to_grayscale_known_colours() -> None:
    rgb = np.zeros((84, 84, 3), np.uint8)
    rgb[:42, :42] = (255, 0, 0)  # red
    rgb[:42, 42:] = (0, 255, 0)  # green
    rgb[42:, :42] = (0, 0, 255)  # blue
    rgb[42:, 42:] = (255, 255, 255)  # white
    raw = bytearray(_bgra_bytes(rgb))
    array = camera_image_to_array(raw, 84, 84)
    assert array.dtype == np.uint8
    assert array.shape == (84, 84, 4)
    assert tuple(array[0, 0]) == (0, 0, 255, 255)  # B, G, R, A of red
    raw[:4] = b"\x01\x02\x03\x04"
    assert tuple(array[0, 0]) == (0, 0, 255, 255)  # a copy, not a view of CARLA's buffer
    gray = driving_task.to_grayscale(array, channel_order="BGRA")
    assert gray.shape == (84, 84)
    assert gray[0, 0] == round(0.299 * 255)  # 76
    assert gray[0, 83] == round(0.587 * 255)  # 150
    assert gray[83, 0] == round(0.114 * 255)  # 29
    assert gray[83, 83] == 255
    # Reading the bytes as RGBA would get red and blue swapped.
    assert driving_task.to_grayscale(array, channel_order="RGBA")[0, 0] == 29


def test_camera_image_of_the_configured_size_is_resized() -> None:
    cfg = CarlaConfig()
    rgb = np.zeros((cfg.camera_height, cfg.camera_width, 3), np.uint8)
    rgb[...] = (255, 0, 0)
    array = camera_image_to_array(_bgra_bytes(rgb), cfg.camera_height, cfg.camera_width)
    gray = driving_task.to_grayscale(array, channel_order="BGRA")
    assert gray.shape == (spec.FRAME_SIZE, spec.FRAME_SIZE)
    assert (gray == 76).all()


def test_camera_image_with_wrong_byte_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected"):
        camera_image_to_array(b"\x00" * (10 * 10 * 4 - 1), 10, 10)


# ------------------------------------------------------------------ sensor/tick matching
def test_frame_buffer_returns_the_requested_frame_and_drops_older_ones() -> None:
    buffer = SensorFrameBuffer("camera")
    buffer.put(5, "five")
    buffer.put(6, "six")
    buffer.put(7, "seven")
    assert buffer.wait_for(6, timeout=5.0) == "six"
    assert len(buffer) == 1  # 5 dropped as stale, 6 consumed, 7 kept
    buffer.put(4, "late four")  # older than what was asked: ignored
    buffer.put(6, "six again")
    assert len(buffer) == 1
    assert buffer.wait_for(7, timeout=5.0) == "seven"
    assert len(buffer) == 0


def test_frame_buffer_waits_for_a_frame_from_another_thread() -> None:
    buffer = SensorFrameBuffer("camera")
    producer = threading.Timer(0.05, buffer.put, args=(10, "ten"))
    producer.start()
    try:
        assert buffer.wait_for(10, timeout=5.0) == "ten"
    finally:
        producer.cancel()


def test_frame_buffer_times_out_with_a_typed_error() -> None:
    buffer = SensorFrameBuffer("front camera", address="127.0.0.1:2000")
    buffer.put(3, "three")
    start = time.monotonic()
    # Frame 4 is never put, so the timeout is the only outcome however slow
    # the machine: its length only sets how long the test takes.
    with pytest.raises(CarlaTimeoutError) as info:
        buffer.wait_for(4, timeout=0.05)
    assert time.monotonic() - start < 30.0  # returned, did not hang
    assert isinstance(info.value, TimeoutError)
    message = str(info.value)
    assert "127.0.0.1:2000" in message
    assert "front camera" in message
    assert "frame 4" in message


def test_frame_buffer_is_bounded_and_clear_resets_staleness() -> None:
    buffer = SensorFrameBuffer(max_pending=3)
    for frame in range(10):
        buffer.put(frame, frame)
    assert len(buffer) == 3
    assert buffer.wait_for(9, timeout=5.0) == 9
    buffer.clear()  # a new episode: frame numbers may start anywhere
    buffer.put(1, "one")
    assert buffer.wait_for(1, timeout=5.0) == "one"
    with pytest.raises(ValueError):
        SensorFrameBuffer(max_pending=0)


def test_frame_event_log_pops_events_up_to_a_frame() -> None:
    log = FrameEventLog()
    log.add(12, "late")
    log.add(10, "a")
    log.add(11, "b")
    assert log.pop_through(11) == [(10, "a"), (11, "b")]
    assert log.pop_through(11) == []
    assert log.pop_through(12) == [(12, "late")]


# ------------------------------------------------------------------ actor bookkeeping
class RecordingActor:
    """Stands in for a carla.Actor: records stop()/destroy() calls in a shared log."""

    def __init__(
        self,
        name: str,
        calls: list[str],
        *,
        fail_stop: bool = False,
        fail_destroy: bool = False,
        destroy_result: bool = True,
    ) -> None:
        self.type_id, self.id = name, hash(name) % 1000
        self.calls = calls
        self.fail_stop, self.fail_destroy, self.destroy_result = (
            fail_stop,
            fail_destroy,
            destroy_result,
        )

    def stop(self) -> None:
        self.calls.append(f"stop {self.type_id}")
        if self.fail_stop:
            raise RuntimeError("stop failed")

    def destroy(self) -> bool:
        self.calls.append(f"destroy {self.type_id}")
        if self.fail_destroy:
            raise RuntimeError("time-out of 10000ms while waiting for the simulator")
        return self.destroy_result


def test_registry_stops_sensors_then_destroys_sensors_then_vehicles() -> None:
    calls: list[str] = []
    registry = ActorRegistry()
    registry.add(RecordingActor("ego", calls), "vehicle")
    registry.add(RecordingActor("camera", calls), "sensor")
    registry.add(RecordingActor("collision", calls), "sensor")
    registry.add(RecordingActor("npc1", calls), "npc")
    registry.add(RecordingActor("npc2", calls), "npc")
    assert len(registry) == 5
    assert [a.type_id for a in registry.actors("sensor")] == ["camera", "collision"]
    assert registry.destroy_all() == []
    assert calls == [
        "stop collision",
        "stop camera",
        "destroy collision",
        "destroy camera",
        "destroy npc2",
        "destroy npc1",
        "destroy ego",
    ]
    assert len(registry) == 0
    assert registry.destroy_all() == []  # nothing left: a second cleanup is a no-op
    assert len(calls) == 7


def test_registry_tolerates_failures_and_reports_them(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []
    registry = ActorRegistry()
    registry.add(RecordingActor("ego", calls, fail_destroy=True), "vehicle")
    registry.add(RecordingActor("camera", calls, fail_stop=True), "sensor")
    registry.add(RecordingActor("lane", calls, destroy_result=False), "sensor")
    registry.add(RecordingActor("npc", calls), "npc")
    with caplog.at_level("WARNING"):
        failures = registry.destroy_all()
    # Every actor still got its destroy() call despite the failures.
    assert {c for c in calls if c.startswith("destroy")} == {
        "destroy ego",
        "destroy camera",
        "destroy lane",
        "destroy npc",
    }
    assert calls.index("destroy camera") > calls.index("stop lane")  # all stops first
    assert len(failures) == 3
    assert any("stop camera" in f for f in failures)
    assert any("destroy ego" in f and "time-out" in f for f in failures)
    assert any("destroy lane" in f for f in failures)
    assert "actor cleanup" in caplog.text
    assert len(registry) == 0


def test_registry_forget_and_kind_check() -> None:
    calls: list[str] = []
    registry = ActorRegistry()
    registry.add(RecordingActor("ego", calls), "vehicle")
    assert registry.forget() == 1
    assert calls == []
    assert len(registry) == 0
    with pytest.raises(ValueError):
        registry.add(RecordingActor("x", calls), "walker")  # type: ignore[arg-type]


# ------------------------------------------------------------------ route
class LaneStub:
    """A waypoint-like node with ``next()``: exercises our branch choice only."""

    def __init__(self, road_id: int, s: float, graph: dict[tuple[int, float], list[Any]]):
        self.road_id, self.section_id, self.lane_id, self.s = road_id, 0, -1, s
        self._graph = graph

    def next(self, distance: float) -> list[Any]:
        return self._graph.get((self.road_id, self.s), [])


def _fork_graph() -> LaneStub:
    """Road 1 for 3 m, then a fork into roads 2 and 3 (each 5 m, then a dead end)."""
    graph: dict[tuple[int, float], list[Any]] = {}
    start = LaneStub(1, 0.0, graph)
    graph[(1, 0.0)] = [LaneStub(1, 1.0, graph)]
    graph[(1, 1.0)] = [LaneStub(1, 2.0, graph)]
    graph[(1, 2.0)] = [LaneStub(3, 0.0, graph), LaneStub(2, 0.0, graph)]
    for road in (2, 3):
        for s in range(5):
            graph[(road, float(s))] = [LaneStub(road, float(s + 1), graph)]
    return start


def test_route_branches_are_chosen_deterministically_by_seed() -> None:
    roads = set()
    for seed in range(8):
        a = build_route(_fork_graph(), 100.0, 1.0, np.random.default_rng(seed))
        b = build_route(_fork_graph(), 100.0, 1.0, np.random.default_rng(seed))
        assert [(w.road_id, w.s) for w in a] == [(w.road_id, w.s) for w in b]
        assert len(a) == 3 + 6  # stops at the dead end
        roads.add(a[-1].road_id)
    assert roads == {2, 3}  # both branches are reachable
    short = build_route(_fork_graph(), 2.0, 1.0, np.random.default_rng(0))
    assert len(short) == 3


def test_route_tracker_progress_lateral_and_lookahead() -> None:
    points = np.stack([np.arange(0.0, 101.0), np.zeros(101)], axis=1)  # along +x
    route = RouteTracker(points, goal_m=50.0)
    assert route.length_m == pytest.approx(100.0)
    progress, lateral, yaw, distance = route.advance([10.0, -1.0])  # CARLA y<0: left
    assert progress == pytest.approx(10.0)
    assert lateral == pytest.approx(1.0)
    assert yaw == pytest.approx(0.0)
    assert distance == pytest.approx(1.0)
    progress, lateral, _, _ = route.advance([12.0, 0.5])
    assert progress == pytest.approx(2.0)
    assert lateral == pytest.approx(-0.5)  # right of the route
    progress, _, _, _ = route.advance([11.0, 0.0])  # backwards
    assert progress == pytest.approx(-1.0)
    assert route.completion == pytest.approx(11.0 / 50.0)
    ahead = route.lookahead(5.0)
    assert ahead.shape == (spec.NUM_WAYPOINTS, 2)
    np.testing.assert_allclose(ahead[:, 0], 11.0 + 5.0 * np.arange(1, 11))
    route.advance([60.0, 0.0])  # beyond the goal (within the search window)
    route.advance([80.0, 0.0])
    assert route.completion == 1.0
    np.testing.assert_allclose(route.lookahead(5.0)[-1], [100.0, 0.0])  # clamped at the end


def test_route_tracker_in_a_turn_and_with_a_route_crossing_back() -> None:
    # Along +x, a right turn to +y (CARLA yaw 90), then back along −x 4 m to the right of
    # the first leg.
    leg1 = [[x, 0.0] for x in range(0, 51)]
    leg2 = [[50.0, y] for y in range(1, 5)]
    leg3 = [[x, 4.0] for x in range(49, -1, -1)]
    route = RouteTracker(np.array(leg1 + leg2 + leg3, float), goal_m=200.0)
    s, lateral, _, _ = route.locate([10.0, 3.0])  # nearer the return leg, but it is far ahead
    assert s == pytest.approx(10.0)
    assert lateral == pytest.approx(-3.0)
    route.advance([45.0, 0.0])
    route.advance([50.5, 2.0])
    s, lateral, yaw, _ = route.locate([50.5, 2.0])
    assert yaw == pytest.approx(90.0)
    assert lateral == pytest.approx(0.5)  # facing +y, +x is the LEFT (CARLA's right is −x)
    right = carla.Transform(carla.Location(), carla.Rotation(yaw=90.0)).get_right_vector()
    assert right.x == pytest.approx(-1.0)
    assert carla_to_ego([[50.5, 2.0]], [50.0, 2.0], yaw)[0, 1] == pytest.approx(lateral)
    assert s == pytest.approx(52.0)
    with pytest.raises(ValueError):
        RouteTracker(np.zeros((3, 2)), 10.0)  # no distinct points


# ------------------------------------------------------------------ the environment, no server
def test_env_construction_does_not_connect_and_validates() -> None:
    port = closed_port()
    start = time.monotonic()
    env = CarlaEnv(carla={"host": "127.0.0.1", "port": port}, task={"route_length_m": 100.0})
    assert time.monotonic() - start < 1.0
    assert env.carla_config.port == port
    assert env.task_config.route_length_m == 100.0
    assert env.observation_space == spec.observation_space()
    assert env.action_space == spec.action_space()
    assert env.metadata["render_fps"] == 20
    env.close()
    env.close()  # idempotent, and a no-op without a connection
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(2, np.float32))
    with pytest.raises(pydantic.ValidationError, match="fixed_delta_seconds"):
        CarlaEnv(carla={"fixed_delta_seconds": 0.2})
    with pytest.raises(pydantic.ValidationError, match="hostname"):
        CarlaEnv(carla={"hostname": "x"})  # unknown key
    with pytest.raises(pydantic.ValidationError):
        CarlaEnv(task={"target_speed_mps": -1.0})
    assert CarlaEnv(carla=CarlaConfig(port=port)).carla_config.port == port


def test_gymnasium_make_builds_the_env_without_a_server() -> None:
    env = gymnasium.make(rollout_workers.CARLA_ID, carla={"host": "127.0.0.1", "port": 1})
    try:
        assert isinstance(env.unwrapped, CarlaEnv)
        assert env.observation_space == spec.observation_space()
    finally:
        env.close()


def test_unreachable_server_fails_fast_with_a_typed_error() -> None:
    port = closed_port()
    env = CarlaEnv(
        carla={
            "host": "127.0.0.1",
            "port": port,
            "timeout_s": 1.0,
            "reconnect_attempts": 1,
            "reconnect_backoff_s": 0.05,
        }
    )
    start = time.monotonic()
    with pytest.raises(CarlaConnectionError) as info:
        env.reset()
    elapsed = time.monotonic() - start
    # Two tries of ~1 s each (the client's time-out) plus a 0.05 s back-off.
    assert elapsed < 15.0
    assert isinstance(info.value, ConnectionError)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "get_server_version" in message
    assert "2 attempt" in message
    assert isinstance(info.value.__cause__, CarlaConnectionError)
    assert isinstance(info.value.__cause__.__cause__, RuntimeError)  # the client's, translated
    env.close()  # nothing to clean up, must not raise


# ------------------------------------------------------------------ carla-check, no server
def test_check_server_on_a_closed_port_reports_instead_of_raising() -> None:
    port = closed_port()
    # Nothing listens there: refused or timed out, the report says unreachable
    # whatever the machine's load, so the timeout only bounds the test's time.
    report = check_server("127.0.0.1", port, timeout_s=1.0)
    assert set(report) == set(REPORT_FIELDS)
    assert report["host"] == "127.0.0.1"
    assert report["port"] == port
    assert report["reachable"] is False
    assert report["tick_ok"] is False
    assert report["tick_ms"] is None
    assert report["server_version"] is None
    assert report["client_version"] == "0.9.16"
    assert f"127.0.0.1:{port}" in report["error"]
    text = format_report(report)
    assert len(text.splitlines()) == len(REPORT_FIELDS)
    assert "reachable       False" in text


def test_check_server_with_an_impossible_port_does_not_raise() -> None:
    report = check_server("127.0.0.1", 70000, timeout_s=0.5)  # invalid port: never reachable
    assert report["reachable"] is False
    assert report["error"]


def test_carla_check_main_returns_1_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code = main(["--host", "127.0.0.1", "--port", str(port), "--timeout", "0.5", "--json"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["reachable"] is False
    assert report["port"] == port


# ------------------------------------------------------------------ with a CARLA server
def _server() -> tuple[str, int]:
    return os.environ.get("CARLA_HOST", "localhost"), int(os.environ.get("CARLA_PORT", "2000"))


def _server_config(**overrides: Any) -> dict[str, Any]:
    host, port = _server()
    config: dict[str, Any] = {
        "host": host,
        "port": port,
        "tm_port": int(os.environ.get("CARLA_TM_PORT", "8000")),
        "timeout_s": 20.0,
        "reconnect_attempts": 1,
        "reconnect_backoff_s": 1.0,
    }
    if os.environ.get("CARLA_TOWN"):
        config["town"] = os.environ["CARLA_TOWN"]
    config.update(overrides)
    return config


def _inspect_world() -> Any:
    host, port = _server()
    client = carla.Client(host, port)
    client.set_timeout(20.0)
    return client.get_world()


def _hero_count(world: Any) -> int:
    return sum(
        1 for a in world.get_actors().filter("vehicle.*") if a.attributes.get("role_name") == "hero"
    )


@pytest.mark.carla
def test_server_check_reports_a_ticking_server() -> None:
    host, port = _server()
    report = check_server(host, port, timeout_s=10.0)
    assert report["reachable"], report
    assert report["tick_ok"], report
    assert report["error"] is None


@pytest.mark.carla
def test_reset_steps_and_close_clean_up_against_a_server() -> None:
    world = _inspect_world()
    before = world.get_settings()
    heroes_before = _hero_count(world)
    vehicles_before = len(world.get_actors().filter("vehicle.*"))
    sensors_before = len(world.get_actors().filter("sensor.*"))
    env = CarlaEnv(carla=_server_config(npc_vehicles=2))
    try:
        obs, info = env.reset(seed=1)
        assert env.observation_space.contains(obs)
        assert obs["image"].std() > 0  # the camera sees something
        assert "frame" in info
        world = _inspect_world()
        assert world.get_settings().synchronous_mode
        assert world.get_settings().fixed_delta_seconds == pytest.approx(0.05)
        assert _hero_count(world) == heroes_before + 1
        frames = [info["frame"]]
        for _ in range(20):
            obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.6], np.float32))
            assert env.observation_space.contains(obs)
            assert np.isfinite(reward)
            assert set(info["reward_components"]) == {
                "progress",
                "overspeed",
                "lane_keeping",
                "comfort",
                "safety",
            }
            frames.append(info["frame"])
            if terminated or truncated:
                assert "episode_metrics" in info
                break
        assert frames == sorted(frames)
        assert len(set(frames)) == len(frames)  # one tick per step
    finally:
        env.close()
    env.close()  # idempotent
    world = _inspect_world()
    assert _hero_count(world) == heroes_before
    assert len(world.get_actors().filter("vehicle.*")) == vehicles_before
    assert len(world.get_actors().filter("sensor.*")) == sensors_before
    after = world.get_settings()
    assert after.synchronous_mode == before.synchronous_mode
    assert after.fixed_delta_seconds == pytest.approx(before.fixed_delta_seconds or 0.0)


@pytest.mark.carla
def test_time_limit_truncates_with_episode_metrics_against_a_server() -> None:
    env = CarlaEnv(carla=_server_config(), task={"max_episode_steps": 5})
    try:
        env.reset(seed=2)
        for _ in range(5):
            _, _, terminated, truncated, info = env.step(np.array([0.0, 0.0], np.float32))
            if terminated:
                pytest.skip(f"episode terminated early ({info['end_reason']})")
        assert truncated and not terminated
        assert info["episode_metrics"]["length"] == 5
        assert info["episode_metrics"]["end_reason"] == "time_limit"
        obs, _ = env.reset()  # a second episode reuses the connection
        assert env.observation_space.contains(obs)
    finally:
        env.close()
