"""Rollout workers: the driving task, the simulators and the acting loop.

Importing this package registers the environments with gymnasium:

* ``td3drive/Racetrack-v0``: the embedded simulator (highway-env's racetrack);
* ``td3drive/Carla-v0``: CARLA 0.9.16 through its Python client (needs a server);
* ``td3drive/Faulty-v0``: another env that raises on chosen steps (chaos tests).
"""

import gymnasium

RACETRACK_ID = "td3drive/Racetrack-v0"
CARLA_ID = "td3drive/Carla-v0"
FAULTY_ID = "td3drive/Faulty-v0"

if RACETRACK_ID not in gymnasium.registry:
    gymnasium.register(id=RACETRACK_ID, entry_point="rollout_workers.racetrack_env:RacetrackEnv")
if CARLA_ID not in gymnasium.registry:
    gymnasium.register(id=CARLA_ID, entry_point="rollout_workers.carla_env:CarlaEnv")
if FAULTY_ID not in gymnasium.registry:
    gymnasium.register(id=FAULTY_ID, entry_point="rollout_workers.faults:FaultyEnv")
