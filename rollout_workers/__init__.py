"""Rollout workers: the driving task, the simulators and the acting loop.

The environments are registered with gymnasium by ``import td3drive``
(:data:`td3drive.ENVIRONMENTS`, the one table of ids; this package imports
it, so importing it registers them too):

* ``td3drive/Racetrack-v0``: the embedded simulator (highway-env's racetrack);
* ``td3drive/Carla-v0``: CARLA 0.9.16 through its Python client (needs a server);
* ``td3drive/Faulty-v0``: another env that raises on chosen steps (chaos tests);
* ``td3drive/CarRacingPixels-v0``: gymnasium's ``CarRacing-v3`` through
  :class:`rollout_workers.adapters.PixelEnvAdapter` (needs ``box2d``).
"""

from td3drive import (
    CAR_RACING_PIXELS_ID,
    CARLA_ID,
    FAULTY_ID,
    RACETRACK_ID,
    register_environments,
)

__all__ = ["CARLA_ID", "CAR_RACING_PIXELS_ID", "FAULTY_ID", "RACETRACK_ID"]

register_environments()  # idempotent; already done by ``import td3drive``
