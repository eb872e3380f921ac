"""CARLA 0.9.16 as a gymnasium environment (DESIGN.md §5): ``td3drive/Carla-v0``.

The adapter only produces raw state and camera frames; the reward, the
termination rules, the episode metrics and the observation builders come from
:mod:`rollout_workers.driving_task`, shared with every other simulator.

One environment drives one CARLA server (one server per rollout worker; see
``deploy/carla/README.md``). It runs the server in synchronous mode with a
fixed time-step, so one :meth:`CarlaEnv.step` is exactly one ``world.tick()``
of ``fixed_delta_seconds`` simulated seconds, and the Traffic Manager that
drives the NPCs runs in synchronous mode on its own port.

Modules, one concern each:

* :mod:`~rollout_workers.carla.env`: :class:`CarlaEnv`, the gymnasium API;
* :mod:`~rollout_workers.carla.connection`: the server connection and the typed errors;
* :mod:`~rollout_workers.carla.recovery`: reusing or forgetting a server after a failure;
* :mod:`~rollout_workers.carla.spawning`: episode setup (ego vehicle, route, sensors, NPCs);
* :mod:`~rollout_workers.carla.observation`: the driving state and the observation;
* :mod:`~rollout_workers.carla.episode`: per-episode reward and termination bookkeeping;
* :mod:`~rollout_workers.carla.transforms`: CARLA ↔ ego-frame coordinates, control mapping;
* :mod:`~rollout_workers.carla.sensors`: sensor data and events matched to ticks;
* :mod:`~rollout_workers.carla.registry`: every spawned actor, destroyed in order;
* :mod:`~rollout_workers.carla.route`: the route and the car's place on it;
* :mod:`~rollout_workers.carla.check`: ``td3drive carla-check``, a read-only server probe
  (not imported here: run it as ``python -m rollout_workers.carla.check``).

Pure parts, unit-tested with the real ``carla`` types but without a server:
:func:`carla_to_ego`, :func:`carla_heading_error`, :func:`to_vehicle_control`,
:func:`camera_image_to_array`, :class:`SensorFrameBuffer`,
:class:`FrameEventLog`, :class:`ActorRegistry`, :class:`RouteTracker` and
:func:`build_route`. Everything that talks to a server is exercised only by
the ``carla``-marked tests.

Errors (:class:`CarlaConnectionError`, :class:`CarlaTimeoutError`,
:class:`CarlaSpawnError`) are defined in :mod:`~rollout_workers.carla.connection`;
when :class:`CarlaEnv` raises which is in :mod:`~rollout_workers.carla.env`.
"""

from rollout_workers.carla.connection import (
    LOAD_WORLD_TIMEOUT_S,
    CarlaConnection,
    CarlaConnectionError,
    CarlaSpawnError,
    CarlaTimeoutError,
)
from rollout_workers.carla.env import CarlaEnv
from rollout_workers.carla.registry import ActorKind, ActorRegistry
from rollout_workers.carla.route import (
    ROUTE_RESOLUTION_M,
    ROUTE_SEARCH_AHEAD_M,
    ROUTE_SEARCH_BEHIND_M,
    RouteTracker,
    build_route,
)
from rollout_workers.carla.sensors import (
    EgoSensors,
    FrameEventLog,
    SensorFrameBuffer,
    camera_image_to_array,
)
from rollout_workers.carla.spawning import (
    CAMERA_TRANSFORM,
    EGO_BLUEPRINT,
    EGO_ROLE_NAME,
    MAX_SPAWN_TRIES,
    NPC_ROLE_NAME,
    WARMUP_SECONDS,
)
from rollout_workers.carla.transforms import (
    carla_heading_error,
    carla_to_ego,
    to_vehicle_control,
)

__all__ = [
    "CAMERA_TRANSFORM",
    "EGO_BLUEPRINT",
    "EGO_ROLE_NAME",
    "LOAD_WORLD_TIMEOUT_S",
    "MAX_SPAWN_TRIES",
    "NPC_ROLE_NAME",
    "ROUTE_RESOLUTION_M",
    "ROUTE_SEARCH_AHEAD_M",
    "ROUTE_SEARCH_BEHIND_M",
    "WARMUP_SECONDS",
    "ActorKind",
    "ActorRegistry",
    "CarlaConnection",
    "CarlaConnectionError",
    "CarlaEnv",
    "CarlaSpawnError",
    "CarlaTimeoutError",
    "EgoSensors",
    "FrameEventLog",
    "RouteTracker",
    "SensorFrameBuffer",
    "build_route",
    "camera_image_to_array",
    "carla_heading_error",
    "carla_to_ego",
    "to_vehicle_control",
]
