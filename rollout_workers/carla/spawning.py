"""Episode setup: the ego vehicle and its route, its sensors, the NPC traffic.

* :func:`set_up_episode`: all of the below, then the brakes-on warm-up ticks;
* :func:`spawn_ego_and_route`: the ego at a seeded free spawn point with a long enough route;
* :func:`ego_blueprint`: the ego's blueprint (``role_name=hero``);
* :func:`spawn_sensors`: front RGB camera, collision and lane-invasion sensors, wired to buffers;
* :func:`spawn_npcs`: Traffic-Manager NPC vehicles.

Every actor spawned goes into the environment's :class:`ActorRegistry` at
once, so a failure half-way leaves nothing behind after the cleanup.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import carla
import numpy as np

from rollout_workers.carla.connection import CarlaConnection, CarlaSpawnError
from rollout_workers.carla.registry import ActorRegistry
from rollout_workers.carla.route import ROUTE_RESOLUTION_M, RouteTracker, build_route
from rollout_workers.carla.sensors import EgoSensors, camera_image_to_array
from td3drive.contracts import spec
from td3drive.contracts.config import DrivingTaskConfig

logger = logging.getLogger(__name__)

EGO_BLUEPRINT = "vehicle.tesla.model3"
"""Blueprint of the ego vehicle (falls back to any 4-wheeled vehicle if absent)."""
EGO_ROLE_NAME = "hero"
"""``role_name`` attribute of the ego vehicle (CARLA's convention for the ego)."""
NPC_ROLE_NAME = "autopilot"
CAMERA_TRANSFORM = ((1.6, 0.0, 1.7), (-10.0, 0.0, 0.0))
"""Front camera mount relative to the vehicle: ``(x, y, z)`` m (x forward, z up)
and ``(pitch, yaw, roll)`` degrees: above the bonnet, tilted 10° down."""
MAX_SPAWN_TRIES = 20
"""Spawn points tried before :class:`CarlaSpawnError`."""
WARMUP_SECONDS = 0.5
"""Simulated seconds ticked after spawning (brakes on) so the car settles on the road."""


def set_up_episode(
    connection: CarlaConnection,
    registry: ActorRegistry,
    sensors: EgoSensors,
    task_config: DrivingTaskConfig,
    rng: np.random.Generator,
) -> tuple[Any, RouteTracker, int, int]:
    """Spawn the ego vehicle and its route, its sensors and the NPCs, then tick
    :data:`WARMUP_SECONDS` (at least one tick) with the brakes on.

    Returns:
        ``(vehicle, route, spawn_index, frame)``: ``frame`` is the last warm-up tick's.

    Raises:
        CarlaSpawnError: no spawn point was free.
        CarlaTimeoutError: a tick timed out.
        RuntimeError: a request failed (the ``carla`` client's, untranslated).
    """
    vehicle, route, spawn_index = spawn_ego_and_route(connection, registry, task_config, rng)
    spawn_sensors(connection, registry, vehicle, sensors)
    spawn_npcs(connection, registry, rng, exclude=spawn_index)
    vehicle.apply_control(carla.VehicleControl(brake=1.0))
    frame = connection.tick()
    for _ in range(max(1, math.ceil(WARMUP_SECONDS / connection.config.fixed_delta_seconds))):
        frame = connection.tick()
    return vehicle, route, spawn_index, frame


def spawn_ego_and_route(
    connection: CarlaConnection,
    registry: ActorRegistry,
    task_config: DrivingTaskConfig,
    rng: np.random.Generator,
) -> tuple[Any, RouteTracker, int]:
    """Spawn the ego vehicle at a free spawn point whose route is long enough.

    Tries up to :data:`MAX_SPAWN_TRIES` spawn points in an order drawn from
    ``rng``; a route of ``route_length_m`` plus the look-ahead
    (``NUM_WAYPOINTS · waypoint_spacing_m``) is built from each with
    :func:`build_route`.

    Returns:
        ``(vehicle, route, spawn_index)``; the vehicle is in ``registry``.

    Raises:
        CarlaSpawnError: the map has no spawn points, or none of those tried
            was free with a long enough route.
    """
    world, carla_map, address = connection.world, connection.map, connection.address
    spawn_points = carla_map.get_spawn_points()
    if not spawn_points:
        raise CarlaSpawnError(f"{address}: the map has no spawn points")
    blueprint = ego_blueprint(world, address)
    spacing = task_config.waypoint_spacing_m
    wanted = task_config.route_length_m + spec.NUM_WAYPOINTS * spacing
    order = rng.permutation(len(spawn_points))[:MAX_SPAWN_TRIES]
    for index in order:
        transform = spawn_points[int(index)]
        start = carla_map.get_waypoint(
            transform.location, project_to_road=True, lane_type=carla.LaneType.Driving
        )
        if start is None:
            continue
        route = build_route(start, wanted, ROUTE_RESOLUTION_M, rng)
        xy = np.array([[w.transform.location.x, w.transform.location.y] for w in route], np.float64)
        if len(xy) < 2 or np.hypot(*np.diff(xy, axis=0).T).sum() < wanted - 1.0:
            continue  # dead end before the route is long enough
        vehicle = world.try_spawn_actor(blueprint, transform)
        if vehicle is None:
            continue
        registry.add(vehicle, "vehicle")
        return vehicle, RouteTracker(xy, task_config.route_length_m), int(index)
    raise CarlaSpawnError(
        f"{address}: no free spawn point with a {wanted:.0f} m route among {len(order)} tried"
    )


def ego_blueprint(world: Any, address: str) -> Any:
    """:data:`EGO_BLUEPRINT`, else the first 4-wheeled vehicle by id; ``role_name=hero``.

    Raises:
        CarlaSpawnError: the server has no 4-wheeled vehicle blueprint.
    """
    library = world.get_blueprint_library()
    try:
        blueprint = library.find(EGO_BLUEPRINT)
    except (IndexError, RuntimeError):
        cars = _four_wheelers(library)
        if not cars:
            raise CarlaSpawnError(f"{address}: no 4-wheeled vehicle blueprint") from None
        blueprint = cars[0]
    if blueprint.has_attribute("role_name"):
        blueprint.set_attribute("role_name", EGO_ROLE_NAME)
    return blueprint


def spawn_sensors(
    connection: CarlaConnection,
    registry: ActorRegistry,
    vehicle: Any,
    sensors: EgoSensors,
) -> None:
    """Attach the front RGB camera (``camera_width × camera_height``, ``camera_fov``
    degrees, at :data:`CAMERA_TRANSFORM`), a collision and a lane-invasion sensor
    to ``vehicle``; their callbacks fill ``sensors`` (camera frames as
    ``uint8[H, W, 4]`` BGRA, collisions with the other actor's ``type_id``)."""
    cfg = connection.config
    world = connection.world
    library = world.get_blueprint_library()
    camera_bp = library.find("sensor.camera.rgb")
    camera_bp.set_attribute("image_size_x", str(cfg.camera_width))
    camera_bp.set_attribute("image_size_y", str(cfg.camera_height))
    camera_bp.set_attribute("fov", str(cfg.camera_fov))
    camera_bp.set_attribute("sensor_tick", "0.0")
    (x, y, z), (pitch, yaw, roll) = CAMERA_TRANSFORM
    mount = carla.Transform(
        carla.Location(x=x, y=y, z=z), carla.Rotation(pitch=pitch, yaw=yaw, roll=roll)
    )
    camera = registry.add(world.spawn_actor(camera_bp, mount, attach_to=vehicle), "sensor")
    buffer = sensors.camera

    def on_image(image: Any) -> None:
        try:
            array = camera_image_to_array(image.raw_data, image.height, image.width)
        except ValueError:
            logger.exception("malformed camera image of frame %s", image.frame)
            return
        buffer.put(int(image.frame), array)

    camera.listen(on_image)

    collisions, invasions = sensors.collisions, sensors.lane_invasions
    collision = registry.add(
        world.spawn_actor(
            library.find("sensor.other.collision"), carla.Transform(), attach_to=vehicle
        ),
        "sensor",
    )
    collision.listen(
        lambda event: collisions.add(int(event.frame), getattr(event.other_actor, "type_id", None))
    )
    invasion = registry.add(
        world.spawn_actor(
            library.find("sensor.other.lane_invasion"),
            carla.Transform(),
            attach_to=vehicle,
        ),
        "sensor",
    )
    invasion.listen(lambda event: invasions.add(int(event.frame), None))


def spawn_npcs(
    connection: CarlaConnection,
    registry: ActorRegistry,
    rng: np.random.Generator,
    exclude: int,
) -> None:
    """Spawn up to ``npc_vehicles`` 4-wheeled NPCs (``role_name=autopilot``) on the
    Traffic Manager's autopilot, at spawn points other than ``exclude`` drawn
    from ``rng``; fewer (logged) when spawn points are taken."""
    count = connection.config.npc_vehicles
    if count == 0:
        return
    world = connection.world
    library = world.get_blueprint_library()
    blueprints = _four_wheelers(library)
    spawn_points = connection.map.get_spawn_points()
    candidates = [i for i in rng.permutation(len(spawn_points)) if i != exclude]
    tm_port = connection.config.tm_port
    spawned = 0
    for index in candidates:
        if spawned >= count:
            break
        blueprint = blueprints[int(rng.integers(len(blueprints)))]
        if blueprint.has_attribute("role_name"):
            blueprint.set_attribute("role_name", NPC_ROLE_NAME)
        npc = world.try_spawn_actor(blueprint, spawn_points[int(index)])
        if npc is None:
            continue
        registry.add(npc, "npc")
        npc.set_autopilot(True, tm_port)
        spawned += 1
    if spawned < count:
        logger.warning("%s: spawned %d of %d NPC vehicles", connection.address, spawned, count)


def _four_wheelers(library: Any) -> list[Any]:
    """The library's 4-wheeled vehicle blueprints, sorted by id (seeded picks stay stable)."""
    return sorted((b for b in library.filter("vehicle.*") if _wheels(b) == 4), key=lambda b: b.id)


def _wheels(blueprint: Any) -> int:
    if not blueprint.has_attribute("number_of_wheels"):
        return 0
    return int(blueprint.get_attribute("number_of_wheels").as_int())
