"""A tiny RGB pixel environment from outside td3drive, for ``module:EnvId`` tests.

Importing this module registers (as a user's own module would):

* ``td3drive_tests/PixelFixtureRaw-v0``: :class:`SquareEnv`, raw RGB frames;
* ``td3drive_tests/PixelFixture-v0``: the same through
  :class:`rollout_workers.adapters.PixelEnvAdapter` (:func:`adapted`).

So ``rollout.env_id: "tests.pixel_env_fixture:td3drive_tests/PixelFixture-v0"``
trains on it: gymnasium imports this module in the driver and in every Ray
worker. Ray workers started by a local ``ray.init`` get the driver's working
directory on their ``sys.path`` (Ray adds it for every job without a
``working_dir``), so the tests, run from the repository root, can import
``tests.pixel_env_fixture`` there too.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from rollout_workers.adapters import PixelEnvAdapter
from td3drive.contracts import spec

RAW_ID = "td3drive_tests/PixelFixtureRaw-v0"
ADAPTED_ID = "td3drive_tests/PixelFixture-v0"
HEIGHT, WIDTH = 48, 64
SQUARE = 8


class SquareEnv(gym.Env[np.ndarray, np.ndarray]):
    """A red square on a grey-green field that the action moves.

    Observation ``uint8[48, 64, 3]`` (RGB); action ``float32[2]`` in
    ``[action_low, action_high]`` per dimension: the square's velocity
    ``(dx, dy)`` in pixels per step after mapping to ``[-3, 3]``. Reward: ``-``
    the distance to the centre in pixels / 10. Episodes are truncated after
    ``episode_steps`` steps; :attr:`actions` records every action received.
    """

    def __init__(
        self,
        episode_steps: int = 40,
        action_low: tuple[float, float] = (-1.0, -1.0),
        action_high: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.observation_space = gym.spaces.Box(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        self._low = np.array(action_low, np.float32)
        self._high = np.array(action_high, np.float32)
        self.action_space = gym.spaces.Box(self._low, self._high, dtype=np.float32)
        self.episode_steps = episode_steps
        self.actions: list[np.ndarray] = []
        self._position = np.zeros(2)
        self._steps = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._position = self.np_random.uniform([0, 0], [WIDTH - SQUARE, HEIGHT - SQUARE])
        self._steps = 0
        return self._frame(), {"position": self._position.copy()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float32)
        self.actions.append(action.copy())
        velocity = ((action - self._low) / (self._high - self._low) * 2.0 - 1.0) * 3.0
        self._position = np.clip(self._position + velocity, 0, [WIDTH - SQUARE, HEIGHT - SQUARE])
        self._steps += 1
        centre = np.array([WIDTH - SQUARE, HEIGHT - SQUARE]) / 2.0
        reward = -float(np.linalg.norm(self._position - centre)) / 10.0
        truncated = self._steps >= self.episode_steps
        return self._frame(), reward, False, truncated, {"position": self._position.copy()}

    def _frame(self) -> np.ndarray:
        frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
        frame[:] = (90, 140, 90)
        frame[::8, :] = (60, 60, 60)  # a grid, so the field itself is not blank
        x, y = self._position.astype(int)
        frame[y : y + SQUARE, x : x + SQUARE] = (220, 30, 30)
        return frame


def position_vector(env: gym.Env, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    """``vector_fn``: the square's position (pixels / 100) in the first two slots."""
    vector = np.zeros(spec.VECTOR_SHAPE, dtype=np.float32)
    vector[:2] = np.asarray(info["position"]) / 100.0
    return vector


def adapted(vector_fn: Any = position_vector, **kwargs: Any) -> PixelEnvAdapter:
    """``td3drive_tests/PixelFixture-v0``: :class:`SquareEnv` through the adapter."""
    return PixelEnvAdapter(SquareEnv(**kwargs), vector_fn=vector_fn)


if RAW_ID not in gym.registry:
    gym.register(id=RAW_ID, entry_point="tests.pixel_env_fixture:SquareEnv")
if ADAPTED_ID not in gym.registry:
    gym.register(id=ADAPTED_ID, entry_point="tests.pixel_env_fixture:adapted")
