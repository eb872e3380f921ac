"""td3drive: distributed TD3 from pixels on Ray.

This package holds the shared contracts (:mod:`td3drive.contracts.spec`,
:mod:`td3drive.contracts.config`, :mod:`td3drive.contracts.metric_names`), the CLI and the
driver. Services import the contracts only, never the reverse.

Importing it registers td3drive's environments with gymnasium, so
``gymnasium.make("td3drive/Racetrack-v0")`` works after ``import td3drive``.
The entry points are strings (``"module:attribute"``): gymnasium imports the
simulator's module only when an environment is made, so this package still
imports no service (:mod:`rollout_workers` holds the simulators).
:data:`ENVIRONMENTS` is the one table of ids; :mod:`rollout_workers`
registers from it too.
"""

from __future__ import annotations

from typing import Any

import gymnasium

__version__ = "0.1.0"

RACETRACK_ID = "td3drive/Racetrack-v0"
"""The embedded simulator (highway-env's racetrack)."""
CARLA_ID = "td3drive/Carla-v0"
"""CARLA 0.9.16 through its Python client (needs a server)."""
FAULTY_ID = "td3drive/Faulty-v0"
"""Another environment that raises on chosen steps (chaos tests)."""
CAR_RACING_PIXELS_ID = "td3drive/CarRacingPixels-v0"
"""gymnasium's ``CarRacing-v3`` seen through :class:`rollout_workers.adapters.PixelEnvAdapter`
(needs ``box2d``)."""

ENVIRONMENTS: dict[str, dict[str, Any]] = {
    RACETRACK_ID: {"entry_point": "rollout_workers.racetrack_env:RacetrackEnv"},
    CARLA_ID: {"entry_point": "rollout_workers.carla.env:CarlaEnv"},
    FAULTY_ID: {"entry_point": "rollout_workers.faults:FaultyEnv"},
    CAR_RACING_PIXELS_ID: {"entry_point": "rollout_workers.adapters:car_racing_pixels"},
}
"""td3drive's gymnasium ids and their ``gymnasium.register`` keyword arguments."""


def register_environments() -> None:
    """Register every id of :data:`ENVIRONMENTS` that gymnasium does not know yet.

    Idempotent; imports nothing but gymnasium (string entry points).
    """
    for env_id, kwargs in ENVIRONMENTS.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, **kwargs)


register_environments()
