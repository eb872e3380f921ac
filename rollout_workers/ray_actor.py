"""Rollout workers as Ray actors: the only module of ``rollout_workers/`` that imports Ray.

:class:`RolloutWorkerActor` builds a :class:`RolloutWorker` whose ``push`` is a
:class:`buffer_service.ray_actor.ReplayWriter` (bounded in-flight pushes) and
whose weights come from the driver's weights board: every
``weights_poll_steps`` steps it asks the board for a version newer than its
own and, if there is one, reads the numpy weights from the object store
(zero-copy). Ray restarts a worker actor that dies (``max_restarts=-1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from buffer_service.ray_actor import ReplayWriter
from learner.networks import load_policy_weights, policy_for
from rollout_workers.evaluation import evaluate_policy, summarize
from rollout_workers.worker import RolloutWorker, env_kwargs_for
from td3drive.config import TD3DriveConfig
from td3drive.weights import WeightsBoard


class RolloutWorkerActor:
    """Ray-side wrapper of :class:`RolloutWorker`.

    Args:
        config: the run configuration (rollout, replay and learner sections are used).
        shards: replay shard actor handles.
        weights_board: a ``WeightsBoard`` actor handle, or ``None``.
        worker_index: this worker's index.
    """

    def __init__(
        self,
        config: TD3DriveConfig,
        shards: Sequence[Any],
        weights_board: Any | None,
        worker_index: int,
    ) -> None:
        torch.set_num_threads(config.run.worker_torch_threads)
        self._writer = ReplayWriter(
            shards, max_in_flight=config.replay.max_pushes_in_flight, first_shard=worker_index
        )
        self._board = weights_board
        self._timeout_s = config.replay.rate_limit_timeout_s
        self.worker = RolloutWorker(
            rollout=config.rollout,
            chunk_steps=config.replay.chunk_steps,
            learner=config.learner,
            push=lambda payload: self._writer.push(payload, timeout_s=self._timeout_s),
            weights_source=self._newer_weights if weights_board is not None else None,
            worker_index=worker_index,
            task=config.task,
            env_kwargs=env_kwargs_for(config, worker_index),
        )

    def _newer_weights(self, version: int) -> tuple[int, Mapping[str, np.ndarray]] | None:
        assert self._board is not None
        newer = ray.get(self._board.newer_than.remote(version), timeout=self._timeout_s)
        if newer is None:
            return None
        latest, wrapped = newer
        return latest, ray.get(wrapped[0], timeout=self._timeout_s)

    def run(self, num_steps: int) -> dict[str, Any]:
        """Collect ``num_steps`` steps; returns the worker's run stats plus
        the writer's (``pushed``, ``rejected``, ``push_wait_s_total``)."""
        stats = self.worker.run(num_steps)
        stats.update(
            pushed=self._writer.pushed,
            rejected=self._writer.rejected,
            push_wait_s_total=self._writer.wait_s_total,
        )
        return stats

    def flush(self) -> int:
        """Push the partial chunk and wait for every push; returns pushes so far."""
        self.worker.flush()
        self._writer.flush(timeout_s=self._timeout_s)
        return self._writer.pushed

    def policy_version(self) -> int:
        return self.worker.policy_version

    def policy_action(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The deterministic action for ``obs`` (for checks against the learner)."""
        return self.worker.policy_action(obs)

    def torch_threads(self) -> int:
        """torch intra-op threads in this worker's process (``run.worker_torch_threads``)."""
        return torch.get_num_threads()


class EvaluatorActor:
    """Evaluates the latest published policy, deterministically, on a fresh env."""

    def __init__(self, config: TD3DriveConfig, weights_board: Any) -> None:
        torch.set_num_threads(config.run.worker_torch_threads)
        self.config = config
        self._board = weights_board
        learner = config.learner
        self.policy = policy_for(learner)

    def evaluate(self, episodes: int) -> dict[str, Any]:
        """Run ``episodes`` episodes with the newest weights.

        Returns:
            ``{"policy_version", "episodes": [...metrics], "summary": {...}}``.
        """
        newer = ray.get(self._board.newer_than.remote(-1))
        version = -1
        if newer is not None:
            version, wrapped = newer
            load_policy_weights(self.policy, ray.get(wrapped[0]))
        rollout = self.config.rollout
        # The evaluator is the worker after the last one (its own CARLA server).
        env_kwargs = env_kwargs_for(self.config, rollout.num_workers)
        results = evaluate_policy(
            self.policy, rollout.env_id, env_kwargs, episodes, self.config.run.eval_seed
        )
        return {"policy_version": version, "episodes": results, "summary": summarize(results)}


def remote_evaluator_class(num_cpus: float = 1.0) -> Any:
    """:class:`EvaluatorActor` as a Ray actor class."""
    return ray.remote(num_cpus=num_cpus, max_restarts=-1)(EvaluatorActor)


def remote_worker_class(num_cpus: float = 1.0) -> Any:
    """:class:`RolloutWorkerActor` as a Ray actor class that Ray restarts when it dies."""
    return ray.remote(num_cpus=num_cpus, max_restarts=-1)(RolloutWorkerActor)


def remote_weights_board_class() -> Any:
    """:class:`td3drive.weights.WeightsBoard` as a tiny Ray actor class."""
    return ray.remote(num_cpus=0)(WeightsBoard)
