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

A failed push (``push`` raised: the replay timed out, a shard failed) never
changes what the worker does with its environment: the episode bookkeeping
(the step counted, an episode end recorded and the next step starting a new
episode) happens first, the chunk is encoded and the pending steps cleared,
and only then is it pushed. A chunk whose push raised is kept as the one
*unsent* chunk, counted in ``push_failures`` and logged, and :meth:`run`
returns early (``stats["push_error"]`` says why, ``stats["steps"]`` counts
the steps really taken). Every later :meth:`run` or :meth:`flush` first sends
the unsent chunk again and takes no step until it went out, so the worker
holds at most one unsent chunk, never steps a finished episode, never builds
a chunk longer than ``chunk_steps``, and loses nothing while the replay comes
back. Only :meth:`close` with a chunk that still cannot be sent drops it;
it counts it in ``chunks_dropped`` and ``transitions_dropped`` and logs an error.
(A worker process that dies loses its unsent chunk and its partial chunk.)

Episode ids are unique per run: ``(worker_index << 48) | (incarnation << 32)
| count`` (:func:`episode_id`), where ``incarnation`` distinguishes a worker
that Ray restarted (or a resumed run's new worker) from its earlier lives.
A restarted worker also skips the warm-up (``warmup=False``): the replay
already holds the warm-up data, so it acts with the policy as soon as the
first weights arrive.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import rollout_workers  # noqa: F401  (registers the td3drive environments)
from rollout_workers.scripted import lane_follower
from td3drive.contracts import spec
from td3drive.contracts.codec import Chunk, encode
from td3drive.contracts.config import (
    DrivingTaskConfig,
    LearnerConfig,
    RolloutConfig,
    TD3DriveConfig,
    carla_for_worker,
    split_env_id,
)
from td3drive.contracts.networks import load_policy_weights, policy_for
from td3drive.contracts.spec import Transition

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_ENV_FAILURES = 10
"""A worker gives up (raises) after this many environment failures in a row."""

EPISODE_COUNT_BITS = 32
"""Low bits of an episode id: the worker's episode count in this incarnation."""
INCARNATION_BITS = 16
"""Middle bits of an episode id: the worker's incarnation (:func:`episode_id`)."""
MAX_WORKER_INDEX = (1 << (63 - EPISODE_COUNT_BITS - INCARNATION_BITS)) - 1
"""The largest worker index whose episode ids fit a non-negative int64 (32,767)."""


class EnvironmentFailure(RuntimeError):
    """The environment keeps failing even after being rebuilt."""


class EnvironmentSpecError(ValueError):
    """The configured environment cannot be built, or its spaces are not the contract's."""


class PushError(RuntimeError):
    """A chunk could not be pushed; the worker keeps it and sends it again later."""


WeightsSource = Callable[[int, int], "tuple[int, int, Mapping[str, np.ndarray]] | None"]
"""Called with the ``(generation, version)`` a worker holds (``(0, -1)`` before
any weights); returns newer ``(generation, version, weights)`` or ``None``.
Newer means a larger ``(generation, version)`` tuple
(:class:`td3drive.contracts.weights.WeightsBoard`)."""


TASK_SECTION_ENVS: dict[str, tuple[str, ...]] = {
    "td3drive/Racetrack-v0": ("task",),
    "td3drive/Carla-v0": ("task", "carla"),
}
"""Environments that read config sections, and which: each gets the run's
``task`` (and ``carla``) section as a keyword argument of the same name.
Keys are registered ids; a ``module:`` prefix of ``rollout.env_id`` is
ignored when looking them up (:func:`split_env_id`)."""

IMPORTABLE_HINT = (
    "it must be importable by the driver and by every Ray worker: pip install it, put its "
    "directory on PYTHONPATH, or ship it with the job (ray job submit --working-dir, "
    "runtime_env py_modules)"
)
"""How to make a ``module:EnvId`` module importable everywhere (error messages)."""

ADAPTER_HINT = (
    "wrap it with rollout_workers.adapters.PixelEnvAdapter (deploy/README.md, "
    "'Training on your own pixel env')"
)
"""How to turn a pixel environment into the contract (error messages)."""


def episode_id(worker_index: int, incarnation: int, count: int) -> int:
    """The id of a worker's ``count``-th episode in one incarnation.

    ``(worker_index << 48) | (incarnation << 32) | count``: a non-negative
    int64 (the codec's ``episode_id``), unique across workers and, as long as
    incarnations differ, across a worker's lives.

    Args:
        worker_index: ``0 ≤ worker_index ≤`` :data:`MAX_WORKER_INDEX`.
        incarnation: ``0 ≤ incarnation < 2**16``.
        count: ``0 ≤ count < 2**32``.

    Raises:
        ValueError: an argument out of its range.
    """
    if not 0 <= worker_index <= MAX_WORKER_INDEX:
        raise ValueError(f"worker_index must be in [0, {MAX_WORKER_INDEX}], got {worker_index}")
    if not 0 <= incarnation < 1 << INCARNATION_BITS:
        raise ValueError(f"incarnation must be in [0, 2**16), got {incarnation}")
    if not 0 <= count < 1 << EPISODE_COUNT_BITS:
        raise ValueError(f"episode count must be in [0, 2**32), got {count}")
    return (
        (worker_index << (INCARNATION_BITS + EPISODE_COUNT_BITS))
        | (incarnation << EPISODE_COUNT_BITS)
        | count
    )


def worker_env_kwargs(env_kwargs: Mapping[str, Any], worker_index: int) -> dict[str, Any]:
    """Environment kwargs of one worker: a ``carla`` section gets the worker's
    own server ports (:func:`td3drive.contracts.config.carla_for_worker`); everything
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
    the section is the one source of truth. ``rollout.env_id`` may carry a
    ``module:`` prefix (:func:`split_env_id`).
    """
    kwargs = dict(config.rollout.env_kwargs)
    for section in TASK_SECTION_ENVS.get(split_env_id(config.rollout.env_id)[1], ()):
        kwargs[section] = getattr(config, section).model_dump()
    return worker_env_kwargs(kwargs, worker_index)


def check_spaces(env: gym.Env, env_id: str) -> None:
    """Check an environment's spaces against the contract (:mod:`td3drive.contracts.spec`).

    Raises:
        EnvironmentSpecError: the observation or action space differs; the
            one-line message names the space, what ``env_id`` has and what
            the contract expects (:func:`describe_space`), and what to do: an
            RGB or grayscale image observation is pointed to
            :class:`rollout_workers.adapters.PixelEnvAdapter`, a ``Dict`` to
            its first wrong key.
    """
    expected_obs, expected_action = spec.observation_space(), spec.action_space()
    if env.observation_space != expected_obs:
        raise EnvironmentSpecError(
            f"rollout.env_id={env_id!r}: environment observation space "
            f"{describe_space(env.observation_space)} is not the contract's "
            f"{describe_space(expected_obs)}{_observation_hint(env.observation_space)}"
        )
    if env.action_space != expected_action:
        raise EnvironmentSpecError(
            f"rollout.env_id={env_id!r}: environment action space {env.action_space} "
            f"is not the contract's {expected_action}; map the contract's [steer, "
            "throttle_brake] to it with a gymnasium.ActionWrapper (PixelEnvAdapter's action_fn "
            "for a pixel env)"
        )


def describe_space(space: gym.Space[Any]) -> str:
    """A short one-line description: ``Dict(image uint8[4,84,84], vector float32[23])``
    for a ``Dict`` of ``Box`` es, gymnasium's own ``str`` for anything else."""
    if isinstance(space, gym.spaces.Dict):
        parts = []
        for key, sub in space.spaces.items():
            if isinstance(sub, gym.spaces.Box):
                parts.append(f"{key} {sub.dtype}[{','.join(map(str, sub.shape))}]")
            else:
                parts.append(f"{key} {sub}")
        return f"Dict({', '.join(parts)})"
    return str(space)


def _observation_hint(space: gym.Space[Any]) -> str:
    """What to do about an observation space that is not the contract's."""
    if (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and (len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3))
    ):
        return f" (an RGB or grayscale image); {ADAPTER_HINT}"
    if isinstance(space, gym.spaces.Dict):
        expected = spec.observation_space().spaces
        for key, sub in expected.items():
            if key not in space.spaces:
                return f"; the key {key!r} is missing"
            if space.spaces[key] != sub:
                return f"; {key!r} is {space.spaces[key]}, expected {sub}"
        extra = sorted(set(space.spaces) - set(expected))
        if extra:
            return f"; unexpected key(s) {', '.join(map(repr, extra))}"
    return ""


def check_environment(config: TD3DriveConfig) -> None:
    """Build worker 0's environment once, check its spaces, close it.

    The driver calls this before it starts any worker, so that a wrong
    ``rollout.env_id`` stops the run with one line instead of a worker actor
    that Ray restarts forever. The environment is built exactly as worker 0
    builds it (``gymnasium.make(rollout.env_id, **env_kwargs_for(config, 0))``;
    for CARLA that connects to worker 0's server).

    ``rollout.env_id`` may be ``module:EnvId`` (gymnasium's syntax): the
    module is imported here first (it registers ``EnvId``), so that a module
    that cannot be imported is named as such; every worker imports it again
    when it makes its environment.

    Raises:
        EnvironmentSpecError: the ``module:`` cannot be imported (or raises
            while importing), the id is not registered with gymnasium (after
            importing the module), the environment cannot be built (a missing
            dependency, a wrong keyword, a simulator that does not answer), or
            its observation or action space is not the contract's (with what
            to do about a pixel environment). The message is one line and
            starts with ``rollout.env_id=...``.
    """
    env_id = config.rollout.env_id
    module, name = split_env_id(env_id)
    if module is not None:
        _import_env_module(env_id, module)
    try:
        env = gym.make(env_id, **env_kwargs_for(config, 0))
    except gym.error.UnregisteredEnv as exc:
        registered_by = f"; importing {module!r} did not register {name!r}" if module else ""
        raise EnvironmentSpecError(
            f"rollout.env_id={env_id!r}: no such gymnasium environment{registered_by} "
            f"({_one_line(exc)})"
        ) from exc
    except Exception as exc:
        raise EnvironmentSpecError(
            f"rollout.env_id={env_id!r}: the environment cannot be built: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from exc
    try:
        check_spaces(env, env_id)
    finally:
        try:
            env.close()
        except Exception as exc:  # closing a probe must not hide the check's outcome
            log.warning("closing the probe environment %r: %r", env_id, exc)


def _import_env_module(env_id: str, module: str) -> None:
    """Import the ``module`` of a ``module:EnvId`` id.

    Raises:
        EnvironmentSpecError: the module is not found (with where it must be
            importable), or importing it raised (a dependency of it missing,
            an error in it).
    """
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(f"{exc.name}.")):
            raise EnvironmentSpecError(
                f"rollout.env_id={env_id!r}: cannot import module {module!r} "
                f"({_one_line(exc)}); {IMPORTABLE_HINT}"
            ) from exc
        raise EnvironmentSpecError(
            f"rollout.env_id={env_id!r}: importing module {module!r} failed: "
            f"ModuleNotFoundError: {_one_line(exc)}"
        ) from exc
    except Exception as exc:
        raise EnvironmentSpecError(
            f"rollout.env_id={env_id!r}: importing module {module!r} failed: "
            f"{type(exc).__name__}: {_one_line(exc)}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class RolloutWorker:
    """Collects transitions from one environment and pushes them in chunks.

    Args:
        rollout: environment id and kwargs, exploration, polling.
        chunk_steps: steps per pushed chunk (``replay.chunk_steps``).
        learner: network shape of the policy (``features_dim``, ``actor_hidden``, ``cnn``).
        push: sends one encoded chunk (bytes) to the replay service; may block
            (back-pressure). When it raises, the chunk is kept and sent
            again (see the module docstring).
        weights_source: see :data:`WeightsSource`; ``None`` keeps exploring randomly.
        worker_index: distinguishes workers' seeds and episode ids,
            ``0 ≤ worker_index ≤`` :data:`MAX_WORKER_INDEX`.
        task: the driving task's scaling, for the lane follower's reading of
            the privileged vector (defaults if ``None``).
        env_kwargs: the ``gymnasium.make`` kwargs (:func:`env_kwargs_for` builds
            them from a run config); defaults to ``rollout.env_kwargs`` with
            the worker's CARLA ports.
        env_factory: builds the environment; defaults to
            ``gymnasium.make(rollout.env_id, **env_kwargs)``.
        incarnation: which life of this worker this is, ``0 ≤ incarnation <
            2**16``; part of every episode id (:func:`episode_id`), so a
            restarted worker never reuses its earlier lives' ids. It also
            offsets the episode seeds.
        warmup: ``False`` skips the warm-up (a restarted worker, whose replay
            already holds warm-up data): the policy acts from the first
            weights on (before any weights arrive there is nothing else to
            act with than the warm-up policy).

    Raises:
        gymnasium.error.Error: an unknown environment id.
        EnvironmentSpecError: an environment whose spaces differ from the
            contract, or a ``module:EnvId`` whose module this worker cannot
            import (a ``ValueError``).
        ValueError: ``worker_index`` or ``incarnation`` out of range.
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
        incarnation: int = 0,
        warmup: bool = True,
    ) -> None:
        episode_id(worker_index, incarnation, 0)  # validates both ranges
        self.config = rollout
        self.chunk_steps = chunk_steps
        self.push = push
        self.weights_source = weights_source
        self.worker_index = worker_index
        self.incarnation = incarnation
        self.warmup_steps = rollout.warmup_steps if warmup else 0
        self.task = task or DrivingTaskConfig()
        if env_kwargs is None:
            env_kwargs = worker_env_kwargs(rollout.env_kwargs, worker_index)
        self.env_kwargs = dict(env_kwargs)
        self._env_factory = env_factory or (lambda: gym.make(rollout.env_id, **self.env_kwargs))
        self.seed = rollout.seed + 1000 * worker_index
        # A restarted worker must not replay its earlier life's episodes.
        self._episode_seed_base = self.seed + (incarnation << EPISODE_COUNT_BITS)
        self.rng = np.random.default_rng([self.seed, incarnation] if incarnation else self.seed)
        self.policy = policy_for(learner)
        self.policy.eval()
        self.policy_version = -1
        self.policy_generation = 0
        self.env = self._make_env()
        self._obs: dict[str, np.ndarray] | None = None
        self._privileged: np.ndarray | None = None
        self._episode_count = 0
        self._episode_id = 0
        self._episode_step = 0
        self._pending: list[Transition] = []
        self._unsent: tuple[bytes, int] | None = None
        self.last_push_error: str | None = None
        self.total_steps = 0
        self.episodes: list[dict[str, Any]] = []
        self.counters = {
            "env_restarts": 0,
            "chunks_pushed": 0,
            "weight_updates": 0,
            "push_failures": 0,
            "chunks_dropped": 0,
            "transitions_dropped": 0,
        }

    # ------------------------------------------------------------ acting
    def run(self, num_steps: int) -> dict[str, Any]:
        """Take up to ``num_steps`` environment steps (episodes carry over between calls).

        Steps lost to an environment failure do not count. A failed push ends
        the call early (the chunk is kept and sent first by the next call);
        an unsent chunk from an earlier call is sent before any step.

        Returns:
            ``{"steps" (taken by this call, ``num_steps`` unless a push
            failed), "steps_per_s", "episodes": [episode metrics of episodes
            that ended], "policy_version", "policy_generation", "total_steps",
            "incarnation", "unsent_chunks" (0 or 1), "push_error" (``None``,
            or the one-line reason this call stopped early), **counters}``
            where the counters are ``env_restarts``, ``chunks_pushed``,
            ``weight_updates``, ``push_failures`` (failed push attempts),
            ``chunks_dropped`` and ``transitions_dropped`` (dropped by
            :meth:`close`), all over the worker's life.

        Raises:
            EnvironmentFailure: the environment failed more than
                :data:`MAX_CONSECUTIVE_ENV_FAILURES` times in a row.
        """
        start = time.perf_counter()
        finished_before = len(self.episodes)
        self.last_push_error = None
        taken = failures = 0
        self._send_unsent()
        while taken < num_steps and self._unsent is None:
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
            "steps": taken,
            "steps_per_s": taken / elapsed if elapsed > 0 else 0.0,
            "episodes": self.episodes[finished_before:],
            "policy_version": self.policy_version,
            "policy_generation": self.policy_generation,
            "total_steps": self.total_steps,
            "incarnation": self.incarnation,
            "unsent_chunks": int(self._unsent is not None),
            "push_error": self.last_push_error,
            **self.counters,
        }

    def act(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The exploring action for ``obs``: ``float32[2]`` in ``[−1, 1]``."""
        if self.total_steps < self.warmup_steps or self.policy_version < 0:
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
        newer = self.weights_source(self.policy_generation, self.policy_version)
        if newer is None:
            return False
        generation, version, weights = newer
        load_policy_weights(self.policy, weights)
        self.policy_generation, self.policy_version = generation, version
        self.counters["weight_updates"] += 1
        return True

    def flush(self) -> None:
        """Push the unsent chunk, if any, then the partial chunk, if any.

        Raises:
            PushError: a push failed; the chunk is kept (see the module
                docstring) and the next :meth:`run` or :meth:`flush` sends it.
        """
        if self._send_unsent():
            self._encode_pending()
            self._send_unsent()
        if self._unsent is not None:
            raise PushError(
                f"worker {self.worker_index}: a chunk of {self._unsent[1]} steps could not be "
                f"pushed: {self.last_push_error}"
            )

    def close(self) -> None:
        """Push what is pending and close the environment.

        A chunk that still cannot be pushed is dropped: counted in
        ``chunks_dropped``/``transitions_dropped`` and logged.
        """
        try:
            self.flush()
        except PushError as exc:
            assert self._unsent is not None
            self.counters["chunks_dropped"] += 1
            self.counters["transitions_dropped"] += self._unsent[1]
            self._unsent = None
            log.error("%s; dropped at close", exc)
        finally:
            self.env.close()

    # ------------------------------------------------------------ internals
    def _make_env(self) -> gym.Env:
        try:
            env = self._env_factory()
        except ModuleNotFoundError as exc:
            module, _ = split_env_id(self.config.env_id)
            if module is None:
                raise
            # gymnasium re-raises the import failure; its cause names the module.
            cause = exc.__cause__ or exc
            raise EnvironmentSpecError(
                f"rollout.env_id={self.config.env_id!r}: rollout worker {self.worker_index} "
                f"cannot import module {module!r} ({_one_line(cause)}); {IMPORTABLE_HINT}"
            ) from exc
        try:
            check_spaces(env, self.config.env_id)
        except EnvironmentSpecError:
            env.close()
            raise
        return env

    def _encode_pending(self) -> None:
        """Move the pending steps into the unsent chunk (none must be unsent)."""
        assert self._unsent is None, "a second unsent chunk"
        if self._pending:
            payload = encode(Chunk.from_transitions(self._pending))
            self._unsent = (payload, len(self._pending))
            self._pending = []

    def _send_unsent(self) -> bool:
        """Push the unsent chunk, if any; ``True`` when nothing is left unsent.
        A failure is counted, logged and remembered; it never raises."""
        if self._unsent is None:
            return True
        payload, steps = self._unsent
        try:
            self.push(payload)
        except Exception as exc:
            self.counters["push_failures"] += 1
            self.last_push_error = f"{type(exc).__name__}: {_one_line(exc)}"
            log.warning(
                "worker %d: pushing a chunk of %d steps failed (%s); kept, sent again "
                "before the next step",
                self.worker_index,
                steps,
                self.last_push_error,
            )
            return False
        self._unsent = None
        self.counters["chunks_pushed"] += 1
        return True

    def _reset(self) -> None:
        self._episode_count += 1
        self._episode_id = episode_id(self.worker_index, self.incarnation, self._episode_count)
        self._episode_step = 0
        self._obs, info = self.env.reset(seed=self._episode_seed_base + self._episode_count)
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
        ended = terminated or truncated
        if ended:
            metrics = dict(info.get("episode_metrics", {}))
            metrics.setdefault("length", self._episode_step)
            metrics["worker"] = self.worker_index
            metrics["policy_version"] = self.policy_version
            self.episodes.append(metrics)
            self._obs = None
        # Bookkeeping is done; the push may fail without changing it.
        if ended or len(self._pending) >= self.chunk_steps:
            self._encode_pending()
            self._send_unsent()
        return True

    def _recover(self, exc: Exception) -> None:
        log.warning("worker %d: environment failed (%r); restarting it", self.worker_index, exc)
        self.counters["env_restarts"] += 1
        self._obs = None
        if self._pending:
            self._pending[-1] = dataclasses.replace(self._pending[-1], truncated=True)
            self._encode_pending()
            self._send_unsent()
        try:
            self.env.close()
        except Exception as close_exc:  # the broken env may not close cleanly
            log.warning(
                "worker %d: closing the failed environment: %r", self.worker_index, close_exc
            )
        self.env = self._make_env()
