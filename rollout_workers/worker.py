"""The acting loop: one environment, a CPU copy of the policy, chunked pushes.

:class:`RolloutWorker` is a plain class; :mod:`rollout_workers.ray_actor`
wires it to the replay shards and the weights board as a Ray actor, and tests
drive it in-process with any ``push`` callable.

Exploration: for the first ``warmup_steps`` steps (and until the first
weights arrive) a warm-up policy acts (``rollout.warmup_policy``): uniform
random actions with ``throttle_brake`` drawn from ``[warmup_throttle_min, 1]``
so random driving still moves forward, or the scripted lane follower on the
environment's privileged lane geometry (``info["privileged_vector"]``) plus
``N(0, warmup_action_noise)``, which keeps the early replay on the road
instead of full of crashes (the data only: the trained policy is TD3's
actor; the same idea as filling a replay from demonstrations, e.g. DDPGfD,
Vecerik et al. 2017). After that the policy's action plus Gaussian noise
``N(0, exploration_noise)``, clipped to ``[−1, 1]`` (TD3's exploration,
Fujimoto et al. 2018 §6).

A crashed environment (an exception from ``step`` or ``reset``) ends the
episode as ``truncated``: the last completed transition is re-flagged
``truncated`` and the partial chunk is pushed, the environment is rebuilt,
and the loop goes on with a new episode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import rollout_workers  # noqa: F401  (registers the td3drive environments)
from buffer_service.codec import Chunk, encode
from learner.networks import load_policy_weights, policy_for
from rollout_workers.scripted import lane_follower
from td3drive import spec
from td3drive.config import (
    DrivingTaskConfig,
    LearnerConfig,
    RolloutConfig,
    TD3DriveConfig,
    carla_for_worker,
)
from td3drive.spec import Transition

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_ENV_FAILURES = 10
"""A worker gives up (raises) after this many environment failures in a row."""


class EnvironmentFailure(RuntimeError):
    """The environment keeps failing even after being rebuilt."""


WeightsSource = Callable[[int], "tuple[int, Mapping[str, np.ndarray]] | None"]
"""Called with the version a worker holds; returns newer ``(version, weights)`` or ``None``."""


TASK_SECTION_ENVS: dict[str, tuple[str, ...]] = {
    "td3drive/Racetrack-v0": ("task",),
    "td3drive/Carla-v0": ("task", "carla"),
}
"""Environments that read config sections, and which: each gets the run's
``task`` (and ``carla``) section as a keyword argument of the same name."""


def worker_env_kwargs(env_kwargs: Mapping[str, Any], worker_index: int) -> dict[str, Any]:
    """Environment kwargs of one worker: a ``carla`` section gets the worker's
    own server ports (:func:`td3drive.config.carla_for_worker`); everything
    else is shared."""
    kwargs = dict(env_kwargs)
    if isinstance(kwargs.get("carla"), Mapping):
        kwargs["carla"] = carla_for_worker(dict(kwargs["carla"]), worker_index)
    return kwargs


def env_kwargs_for(config: TD3DriveConfig, worker_index: int) -> dict[str, Any]:
    """The ``gymnasium.make`` kwargs of worker ``worker_index``'s environment.

    ``rollout.env_kwargs``, plus the config sections the environment reads
    (:data:`TASK_SECTION_ENVS`): the driving task's ``task`` section, and for
    CARLA the ``carla`` section with the worker's own ports
    (:func:`worker_env_kwargs`). The evaluator is worker ``num_workers``.
    Config validation forbids repeating a section inside ``env_kwargs``, so
    the section is the one source of truth.
    """
    kwargs = dict(config.rollout.env_kwargs)
    for section in TASK_SECTION_ENVS.get(config.rollout.env_id, ()):
        kwargs[section] = getattr(config, section).model_dump()
    return worker_env_kwargs(kwargs, worker_index)


class RolloutWorker:
    """Collects transitions from one environment and pushes them in chunks.

    Args:
        rollout: environment id and kwargs, exploration, polling.
        chunk_steps: steps per pushed chunk (``replay.chunk_steps``).
        learner: network shape of the policy (``features_dim``, ``actor_hidden``, ``cnn``).
        push: sends one encoded chunk (bytes) to the replay service; may block
            (back-pressure).
        weights_source: see :data:`WeightsSource`; ``None`` keeps exploring randomly.
        worker_index: distinguishes workers' seeds and episode ids.
        task: the driving task's scaling, for the lane follower's reading of
            the privileged vector (defaults if ``None``).
        env_kwargs: the ``gymnasium.make`` kwargs (:func:`env_kwargs_for` builds
            them from a run config); defaults to ``rollout.env_kwargs`` with
            the worker's CARLA ports.
        env_factory: builds the environment; defaults to
            ``gymnasium.make(rollout.env_id, **env_kwargs)``.

    Raises:
        gymnasium.error.Error: an unknown environment id.
        ValueError: an environment whose spaces differ from the contract.
    """

    def __init__(
        self,
        rollout: RolloutConfig,
        chunk_steps: int,
        learner: LearnerConfig,
        push: Callable[[bytes], Any],
        weights_source: WeightsSource | None = None,
        worker_index: int = 0,
        task: DrivingTaskConfig | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        env_factory: Callable[[], gym.Env] | None = None,
    ) -> None:
        self.config = rollout
        self.chunk_steps = chunk_steps
        self.push = push
        self.weights_source = weights_source
        self.worker_index = worker_index
        self.task = task or DrivingTaskConfig()
        if env_kwargs is None:
            env_kwargs = worker_env_kwargs(rollout.env_kwargs, worker_index)
        self.env_kwargs = dict(env_kwargs)
        self._env_factory = env_factory or (lambda: gym.make(rollout.env_id, **self.env_kwargs))
        self.seed = rollout.seed + 1000 * worker_index
        self.rng = np.random.default_rng(self.seed)
        self.policy = policy_for(learner)
        self.policy.eval()
        self.policy_version = -1
        self.env = self._make_env()
        self._obs: dict[str, np.ndarray] | None = None
        self._privileged: np.ndarray | None = None
        self._episode_count = 0
        self._episode_id = 0
        self._episode_step = 0
        self._pending: list[Transition] = []
        self.total_steps = 0
        self.episodes: list[dict[str, Any]] = []
        self.counters = {"env_restarts": 0, "chunks_pushed": 0, "weight_updates": 0}

    # ------------------------------------------------------------ acting
    def run(self, num_steps: int) -> dict[str, Any]:
        """Take ``num_steps`` environment steps (episodes carry over between calls).

        Steps lost to an environment failure do not count.

        Returns:
            ``{"steps", "steps_per_s", "episodes": [episode metrics of episodes
            that ended], "policy_version", **counters}``.

        Raises:
            EnvironmentFailure: the environment failed more than
                :data:`MAX_CONSECUTIVE_ENV_FAILURES` times in a row.
        """
        start = time.perf_counter()
        finished_before = len(self.episodes)
        taken = failures = 0
        while taken < num_steps:
            if self.total_steps % self.config.weights_poll_steps == 0:
                self.poll_weights()
            if self._step_once():
                taken += 1
                failures = 0
                continue
            failures += 1
            if failures > MAX_CONSECUTIVE_ENV_FAILURES:
                raise EnvironmentFailure(
                    f"worker {self.worker_index}: the environment failed "
                    f"{failures} times in a row; giving up"
                )
        elapsed = time.perf_counter() - start
        return {
            "steps": num_steps,
            "steps_per_s": num_steps / elapsed if elapsed > 0 else 0.0,
            "episodes": self.episodes[finished_before:],
            "policy_version": self.policy_version,
            "total_steps": self.total_steps,
            **self.counters,
        }

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The exploring action for ``obs``: ``float32[2]`` in ``[−1, 1]``."""
        if self.total_steps < self.config.warmup_steps or self.policy_version < 0:
            return self.warmup_action(obs)
        action = self.policy_action(obs)
        noise = self.rng.normal(0.0, self.config.exploration_noise, spec.ACTION_DIM)
        return np.clip(action + noise, -1.0, 1.0).astype(np.float32)

    def warmup_action(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The warm-up policy's action (``rollout.warmup_policy``): ``float32[2]``.

        The lane follower reads ``info["privileged_vector"]`` of the last
        reset/step, or ``obs["vector"]`` for an environment without it.
        """
        config = self.config
        if config.warmup_policy == "lane_follower":
            vector = self._privileged if self._privileged is not None else obs["vector"]
            action = lane_follower(vector, self.task, cruise_speed_mps=self.task.target_speed_mps)
            noise = self.rng.normal(0.0, config.warmup_action_noise, spec.ACTION_DIM)
            return np.clip(action + noise, -1.0, 1.0).astype(np.float32)
        steer = self.rng.uniform(-1.0, 1.0)
        throttle = self.rng.uniform(config.warmup_throttle_min, 1.0)
        return np.array([steer, throttle], dtype=np.float32)

    @torch.no_grad()
    def policy_action(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The deterministic policy's action (no noise): ``float32[2]``."""
        image = torch.from_numpy(np.ascontiguousarray(obs["image"]))[None]
        vector = torch.from_numpy(np.ascontiguousarray(obs["vector"], dtype=np.float32))[None]
        return self.policy(image, vector)[0].numpy()

    def poll_weights(self) -> bool:
        """Load newer weights if the source has any; returns whether it did."""
        if self.weights_source is None:
            return False
        newer = self.weights_source(self.policy_version)
        if newer is None:
            return False
        version, weights = newer
        load_policy_weights(self.policy, weights)
        self.policy_version = version
        self.counters["weight_updates"] += 1
        return True

    def flush(self) -> None:
        """Push the partial chunk, if any."""
        if self._pending:
            self.push(encode(Chunk.from_transitions(self._pending)))
            self.counters["chunks_pushed"] += 1
            self._pending = []

    def close(self) -> None:
        """Push what is pending and close the environment."""
        self.flush()
        self.env.close()

    # ------------------------------------------------------------ internals
    def _make_env(self) -> gym.Env:
        env = self._env_factory()
        if env.observation_space != spec.observation_space():
            raise ValueError(
                f"environment observation space {env.observation_space} is not the contract's"
            )
        if env.action_space != spec.action_space():
            raise ValueError(f"environment action space {env.action_space} is not the contract's")
        return env

    def _reset(self) -> None:
        self._episode_count += 1
        self._episode_id = (self.worker_index << 32) | self._episode_count
        self._episode_step = 0
        self._obs, info = self.env.reset(seed=self.seed + self._episode_count)
        self._privileged = info.get("privileged_vector")

    def _step_once(self) -> bool:
        try:
            if self._obs is None:
                self._reset()
            assert self._obs is not None
            obs = self._obs
            action = self.act(obs)
            next_obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as exc:  # a simulator fault: end the episode, rebuild, go on
            self._recover(exc)
            return False
        self._pending.append(
            Transition(
                obs=obs,
                action=action,
                reward=float(reward),
                next_obs=next_obs,
                terminated=bool(terminated),
                truncated=bool(truncated),
                policy_version=max(self.policy_version, 0),
                episode_id=self._episode_id,
                step=self._episode_step,
            )
        )
        self.total_steps += 1
        self._episode_step += 1
        self._obs = next_obs
        self._privileged = info.get("privileged_vector")
        if terminated or truncated or len(self._pending) >= self.chunk_steps:
            self.flush()
        if terminated or truncated:
            metrics = dict(info.get("episode_metrics", {}))
            metrics.setdefault("length", self._episode_step)
            metrics["worker"] = self.worker_index
            metrics["policy_version"] = self.policy_version
            self.episodes.append(metrics)
            self._obs = None
        return True

    def _recover(self, exc: Exception) -> None:
        log.warning("worker %d: environment failed (%r); restarting it", self.worker_index, exc)
        self.counters["env_restarts"] += 1
        if self._pending:
            self._pending[-1] = dataclasses.replace(self._pending[-1], truncated=True)
            self.flush()
        try:
            self.env.close()
        except Exception as close_exc:  # the broken env may not close cleanly
            log.warning(
                "worker %d: closing the failed environment: %r", self.worker_index, close_exc
            )
        self.env = self._make_env()
        self._obs = None
