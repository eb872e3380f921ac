"""Rollout workers as Ray actors: the only module of ``rollout_workers/`` that imports Ray.

:class:`RolloutWorkerActor` builds a :class:`RolloutWorker` whose ``push`` is a
:class:`buffer_service.ray_actor.ReplayWriter` (bounded in-flight pushes) and
whose weights come from the weights board (:class:`RayWeightsBoard`): every
``weights_poll_steps`` steps it asks the board for a ``(generation, version)``
newer than its own and, if there is one, reads the numpy weights from the
object store (zero-copy). A weights object that cannot be read (lost, its
owner dead, the board unreachable) is logged and asked for again at the next
poll; it never fails the call.

Restarts: Ray restarts a worker actor that dies (``max_restarts=-1``). The
restarted actor learns it is one (Ray's actor table, the same source as
``ray.get_runtime_context().was_current_actor_reconstructed``), takes its
restart count as its *incarnation* (part of every episode id, so it never
reuses its earlier lives' ids) and skips the warm-up (the replay already
holds warm-up data). Every ``run`` reports ``actor_restarts``, so the driver
counts each restart once.

Constructor arguments (ray-project/ray#53727): Ray logs an error at every
start when an actor with ``max_restarts != 0`` gets constructor arguments
that live in the object store, which includes any (non-detached) *actor
handle*: a handle carries a reference to its actor. The worker and the
evaluator therefore accept their shards and board by *name*
(``ray.get_actor``, in the job's namespace) as well as by handle; the driver
names those actors and passes the names. The config may be a
``TD3DriveConfig`` (a small pickle, passed inline) or its
``model_dump(mode="json")`` dict.
"""

from __future__ import annotations

import logging
import os
import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from buffer_service.ray_actor import ReplayWriter
from rollout_workers.evaluation import evaluate_policy, summarize
from rollout_workers.video import EvaluationVideo, video_format, write_video
from rollout_workers.worker import INCARNATION_BITS, RolloutWorker, env_kwargs_for
from td3drive.contracts.config import TD3DriveConfig, config_from_dict
from td3drive.contracts.networks import load_policy_weights, policy_for
from td3drive.contracts.weights import Published, WeightsBoard

log = logging.getLogger(__name__)

ActorRef = Any
"""A Ray actor handle, or the name of a named actor in the job's namespace (``str``)."""

WEIGHTS_ERRORS = (ObjectLostError, GetTimeoutError, RayActorError)
"""What reading published weights may raise without failing a call:
``ObjectLostError`` (and its ``OwnerDiedError``, ``ObjectFetchTimedOutError``),
a timeout, or a board actor that died."""


def resolve_actor(actor: ActorRef) -> Any:
    """The handle of ``actor``: itself, or ``ray.get_actor(actor)`` for a name.

    Raises:
        ValueError: no live actor has that name in the job's namespace.
    """
    return ray.get_actor(actor) if isinstance(actor, str) else actor


def as_run_config(config: TD3DriveConfig | Mapping[str, Any]) -> TD3DriveConfig:
    """``config`` itself, or a config dict (``model_dump(mode="json")``) validated.

    Raises:
        td3drive.contracts.config.ConfigError: the dict does not validate.
    """
    if isinstance(config, TD3DriveConfig):
        return config
    return config_from_dict(dict(config), source="actor constructor config")


def actor_restarts() -> int:
    """How many times Ray restarted the calling actor (``0`` on its first start,
    and outside an actor).

    Read from Ray's actor table, where ``ray.get_runtime_context()
    .was_current_actor_reconstructed`` reads it. Should that table ever be
    unreadable for a restarted actor, a random count in ``[1, 2**16)`` stands
    in (logged), so the restart is still seen and its episode ids still very
    likely fresh.
    """
    if not ray.is_initialized():
        return 0  # built in-process, outside any actor
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return 0
    with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
        warnings.simplefilter("ignore", DeprecationWarning)
        if not context.was_current_actor_reconstructed:
            return 0
    try:
        from ray._private.state import actors

        info = actors(actor_id=context.get_actor_id())
        return max(1, int(info["NumRestarts"]))
    except Exception as exc:  # a private table: never let it stop a restart
        count = secrets.randbelow((1 << INCARNATION_BITS) - 1) + 1
        log.warning("restart count unreadable (%r); using %d", exc, count)
        return count


def _fetch_newer(
    board: Any, generation: int, version: int, timeout_s: float | None, who: str
) -> tuple[int, int, Mapping[str, np.ndarray]] | None:
    """Newer ``(generation, version, weights)`` from the board, or ``None``
    when there is none or it cannot be read now (logged)."""
    try:
        newer: Published | None = ray.get(
            board.newer.remote(generation, version), timeout=timeout_s
        )
        if newer is None:
            return None
        weights = ray.get(newer.ref[0], timeout=timeout_s)
    except WEIGHTS_ERRORS as exc:
        log.warning(
            "%s: newer weights could not be read (%s); keeping (generation %d, version %d) "
            "and asking again later",
            who,
            type(exc).__name__,
            generation,
            version,
        )
        return None
    return newer.generation, newer.version, weights


class RayWeightsBoard(WeightsBoard):
    """:class:`WeightsBoard` that owns what is published: run as a Ray actor
    (:func:`remote_weights_board_class`), it stores published weights in the
    object store itself (``ray.put`` in the board's process), so they stay
    readable when the publisher (a learner that died) is gone.

    ``publish(version, weights, generation=0)`` takes:

    * the weights themselves, ``dict[str, numpy array]`` (the learner's
      ``policy_weights()[1]``): the board puts them; or
    * the original form, ``[ray.put(weights)]``: the board reads the object
      and puts its own copy.

    ``newer(generation, version)`` and ``newer_than(version)`` return the
    board's ``[ObjectRef]``.
    """

    def publish(self, version: int, ref: Any, generation: int = 0) -> bool:
        """Record ``version`` of ``generation`` (see the class docstring for ``ref``).

        Returns:
            Whether it was recorded (``(generation, version)`` newer than the current).

        Raises:
            ValueError: a negative ``generation``.
            ray.exceptions.ObjectLostError: an ``[ObjectRef]`` whose object is gone.
        """
        with self._lock:
            if not self._accepts(generation, version):
                return False
        if isinstance(ref, Mapping):
            owned = [ray.put(dict(ref))]
        elif isinstance(ref, list | tuple) and len(ref) == 1 and isinstance(ref[0], ray.ObjectRef):
            owned = [ray.put(ray.get(ref[0]))]
        else:
            owned = ref
        return super().publish(version, owned, generation)


class RolloutWorkerActor:
    """Ray-side wrapper of :class:`RolloutWorker`.

    Args:
        config: the run configuration (rollout, replay, task and learner
            sections are used), or its ``model_dump(mode="json")`` dict.
        shards: replay shard actor handles, or their names.
        weights_board: a :class:`RayWeightsBoard` actor handle or name, or ``None``.
        worker_index: this worker's index.
        incarnation_base: added to the actor's restart count to make its
            incarnation (``mod 2**16``, part of every episode id). A resumed
            run, whose restored replay holds the earlier launch's episodes,
            passes a base that differs from the earlier launches'.
        skip_warmup: no warm-up even on the first start (a resumed run whose
            replay already holds data). A restarted actor always skips it.

    Raises:
        ValueError: a shard or board name that names no live actor.
        td3drive.contracts.config.ConfigError: a config dict that does not validate.
    """

    def __init__(
        self,
        config: TD3DriveConfig | Mapping[str, Any],
        shards: Sequence[ActorRef],
        weights_board: ActorRef | None,
        worker_index: int,
        incarnation_base: int = 0,
        skip_warmup: bool = False,
    ) -> None:
        config = as_run_config(config)
        torch.set_num_threads(config.run.worker_torch_threads)
        self.restarts = actor_restarts()
        self.incarnation = (incarnation_base + self.restarts) % (1 << INCARNATION_BITS)
        self._writer = ReplayWriter(
            [resolve_actor(shard) for shard in shards],
            max_in_flight=config.replay.max_pushes_in_flight,
            first_shard=worker_index,
        )
        self._board = None if weights_board is None else resolve_actor(weights_board)
        self._timeout_s = config.replay.rate_limit_timeout_s
        self.worker = RolloutWorker(
            rollout=config.rollout,
            chunk_steps=config.replay.chunk_steps,
            learner=config.learner,
            push=lambda payload: self._writer.push(payload, timeout_s=self._timeout_s),
            weights_source=self._newer_weights if self._board is not None else None,
            worker_index=worker_index,
            task=config.task,
            env_kwargs=env_kwargs_for(config, worker_index),
            incarnation=self.incarnation,
            warmup=not (skip_warmup or self.restarts > 0),
        )
        if self.restarts:
            log.warning(
                "rollout worker %d: restarted by Ray (restart %d); incarnation %d, no warm-up",
                worker_index,
                self.restarts,
                self.incarnation,
            )

    def _newer_weights(
        self, generation: int, version: int
    ) -> tuple[int, int, Mapping[str, np.ndarray]] | None:
        who = f"rollout worker {self.worker.worker_index}"
        return _fetch_newer(self._board, generation, version, self._timeout_s, who)

    def run(self, num_steps: int) -> dict[str, Any]:
        """Collect up to ``num_steps`` steps (:meth:`RolloutWorker.run`).

        Returns:
            The worker's run stats (``steps`` taken, ``push_error``,
            ``incarnation``, counters, ...) plus :meth:`push_stats`.
        """
        stats = self.worker.run(num_steps)
        stats.update(self.push_stats())
        return stats

    def push_stats(self) -> dict[str, Any]:
        """The writer's counts over this incarnation (``pushed``, ``rejected``,
        ``pushed_transitions``, ``rejected_transitions``, ``lost_transitions``,
        ``push_wait_s_total``), the worker's ``incarnation`` and
        ``transitions_dropped``, and the actor's ``actor_restarts`` (how many
        times Ray restarted this actor: it grows by one per restart, so the
        driver can count each restart once) and ``restarted``."""
        writer = self._writer
        return {
            "pushed": writer.pushed,
            "rejected": writer.rejected,
            "pushed_transitions": writer.pushed_transitions,
            "rejected_transitions": writer.rejected_transitions,
            "lost_transitions": writer.lost_transitions,
            "push_wait_s_total": writer.wait_s_total,
            "incarnation": self.incarnation,
            "transitions_dropped": self.worker.counters.get("transitions_dropped", 0),
            "actor_restarts": self.restarts,
            "restarted": self.restarts > 0,
        }

    def flush(self) -> dict[str, Any]:
        """Push the unsent and partial chunks and wait for every push.

        Returns:
            :meth:`push_stats` after the flush.

        Raises:
            rollout_workers.worker.PushError: a chunk could not be pushed (kept).
            TimeoutError: pushes still outstanding after ``replay.rate_limit_timeout_s``.
        """
        self.worker.flush()
        self._writer.flush(timeout_s=self._timeout_s)
        return self.push_stats()

    def policy_version(self) -> int:
        return self.worker.policy_version

    def policy_generation(self) -> int:
        """The learner generation whose weights this worker acts with (``-1``: none yet)."""
        return self.worker.policy_generation

    def identity(self) -> dict[str, Any]:
        """``{"pid", "incarnation", "actor_restarts", "warmup_steps"}`` of this
        actor's process (for fault tests: the pid to kill, what a restart changed)."""
        return {
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "actor_restarts": self.restarts,
            "warmup_steps": self.worker.warmup_steps,
        }

    def policy_action(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The deterministic action for ``obs`` (for checks against the learner)."""
        return self.worker.policy_action(obs)

    def torch_threads(self) -> int:
        """torch intra-op threads in this worker's process (``run.worker_torch_threads``)."""
        return torch.get_num_threads()


class EvaluatorActor:
    """Evaluates the latest published policy, deterministically, on a fresh env.

    Args:
        config: the run configuration, or its ``model_dump(mode="json")`` dict.
        weights_board: a :class:`RayWeightsBoard` actor handle or name.

    Raises:
        ValueError: a board name that names no live actor.
    """

    def __init__(self, config: TD3DriveConfig | Mapping[str, Any], weights_board: ActorRef) -> None:
        config = as_run_config(config)
        torch.set_num_threads(config.run.worker_torch_threads)
        self.config = config
        self._board = resolve_actor(weights_board)
        self.policy = policy_for(config.learner)
        self.policy_generation = 0
        self.policy_version = -1

    def evaluate(
        self,
        episodes: int,
        video_path: str | None = None,
        video_episodes: int = 1,
        return_video_bytes: bool = False,
    ) -> dict[str, Any]:
        """Run ``episodes`` episodes with the newest weights it can read.

        Weights that cannot be read now (lost, owner dead) are logged and the
        last ones read are evaluated (``policy_version`` says which; ``-1``:
        the untrained initial network).

        Args:
            episodes: how many (seeds from ``run.eval_seed``).
            video_path: records a clip of the first ``video_episodes``
                episodes (:class:`rollout_workers.video.EvaluationVideo`); its
                suffix, ``.mp4`` or ``.gif``, picks the format. Written there
                (atomically, parents created) by this actor, so on *its* node's
                filesystem, unless ``return_video_bytes``. ``None``: no clip,
                no rendering.
            video_episodes: episodes in the clip (>= 1; at most ``episodes``).
            return_video_bytes: return the encoded clip as
                ``result["video"]["data"]`` instead of writing ``video_path``
                (which then only names the format and is echoed): the caller
                stores it wherever the run lives (another node, ``pyarrow.fs``).

        Returns:
            ``{"policy_version", "policy_generation", "episodes": [...metrics],
            "summary": {...}}``, plus with a clip ``"video": {"path",
            "format", "fps", "episodes", "frames", "size_bytes"}`` (and
            ``"data": bytes`` with ``return_video_bytes``).

        Raises:
            rollout_workers.video.VideoError: a bad suffix, no ffmpeg for MP4,
                or an encoder failure (before any episode runs for the first two).
            OSError: the clip cannot be written to ``video_path``.
        """
        video = None  # checked before any work: a bad suffix fails at once
        if video_path is not None:
            video_episodes = max(1, min(video_episodes, episodes))
            video = EvaluationVideo(video_format(video_path), episodes=video_episodes)
        newer = _fetch_newer(
            self._board,
            self.policy_generation,
            self.policy_version,
            self.config.replay.rate_limit_timeout_s,
            "evaluator",
        )
        if newer is not None:
            generation, version, weights = newer
            load_policy_weights(self.policy, weights)
            self.policy_generation, self.policy_version = generation, version
        rollout = self.config.rollout
        # The evaluator is the worker after the last one (its own CARLA server).
        env_kwargs = env_kwargs_for(self.config, rollout.num_workers)
        result: dict[str, Any] = {
            "policy_version": self.policy_version,
            "policy_generation": self.policy_generation,
        }
        if video is None:
            results = evaluate_policy(
                self.policy, rollout.env_id, env_kwargs, episodes, self.config.run.eval_seed
            )
        else:
            video.caption = f"policy v{self.policy_version}"
            with video:
                results = evaluate_policy(
                    self.policy,
                    rollout.env_id,
                    env_kwargs,
                    episodes,
                    self.config.run.eval_seed,
                    video=video,
                )
                data = video.finish()
            clip = video.describe(str(video_path), data)
            if return_video_bytes:
                clip["data"] = data
            else:
                clip["path"] = str(write_video(str(video_path), data).resolve())
            result["video"] = clip
        result["episodes"] = results
        result["summary"] = summarize(results)
        return result


def remote_evaluator_class(num_cpus: float = 1.0) -> Any:
    """:class:`EvaluatorActor` as a Ray actor class (restarted by Ray when it dies;
    pass the board by name, see the module docstring)."""
    return ray.remote(num_cpus=num_cpus, max_restarts=-1)(EvaluatorActor)


def remote_worker_class(num_cpus: float = 1.0) -> Any:
    """:class:`RolloutWorkerActor` as a Ray actor class that Ray restarts when it dies
    (pass the shards and the board by name, see the module docstring)."""
    return ray.remote(num_cpus=num_cpus, max_restarts=-1)(RolloutWorkerActor)


def remote_weights_board_class() -> Any:
    """:class:`RayWeightsBoard` as a tiny Ray actor class."""
    return ray.remote(num_cpus=0)(RayWeightsBoard)
