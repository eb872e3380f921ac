"""Fault injection for testing how workers survive simulator crashes.

``td3drive/Faulty-v0`` wraps another environment and raises
:class:`SimulatedCrash` from ``step`` at the given step counts (counted over
the wrapper's lifetime, so a rebuilt environment starts counting again). It
stands in for a CARLA server that dies mid-episode; use it in chaos tests,
never in training configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np


class SimulatedCrash(RuntimeError):
    """Raised by :class:`FaultyEnv` where a real simulator would have failed."""


class FaultyEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    """Raises :class:`SimulatedCrash` on the listed ``step`` calls.

    Args:
        env_id: the environment to wrap (made with ``gymnasium.make``).
        fail_on_steps: 1-based counts of ``step`` calls that raise.
        env_kwargs: passed to ``gymnasium.make``.
    """

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's plain class attribute)

    def __init__(
        self,
        env_id: str = "td3drive/Racetrack-v0",
        fail_on_steps: Sequence[int] = (),
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.inner = gym.make(env_id, **(env_kwargs or {}))
        self.observation_space = self.inner.observation_space
        self.action_space = self.inner.action_space
        self.fail_on_steps = set(fail_on_steps)
        self.calls = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        return self.inner.reset(seed=seed, options=options)

    def step(self, action: np.ndarray) -> Any:
        self.calls += 1
        if self.calls in self.fail_on_steps:
            raise SimulatedCrash(f"simulated simulator crash at step call {self.calls}")
        return self.inner.step(action)

    def close(self) -> None:
        self.inner.close()
