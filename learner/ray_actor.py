"""The learner as a Ray actor: the only module of ``learner/`` that imports Ray.

* :func:`remote_learner_class`: the plain :class:`TD3Learner` as an actor.
* :class:`LearnerActor`: what a training run uses: it samples the replay
  shards itself (:class:`buffer_service.ray_actor.ReplaySampler`, prefetching),
  runs TD3 updates with their metrics kept on the device and fetched once per
  :meth:`LearnerActor.train` call, publishes actor+encoder weights at the end
  of a call in which the update count crossed a multiple of
  ``run.publish_every_updates`` (one ``ray.put`` per version, recorded on the
  weights board), tracks policy lag and the largest gradient norms, and
  writes checkpoints. Under ``replay.prioritized`` it sends every
  update's per-sample TD errors back to the shards as new priorities. It is a
  threaded actor so :meth:`LearnerActor.stop` can interrupt a
  :meth:`LearnerActor.train` call that waits for data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

from buffer_service.ray_actor import ReplaySampler
from learner.td3 import CheckpointError, TD3Learner
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import TD3DriveConfig, config_from_dict
from td3drive.contracts.storage import RunStorage, require_absolute

GRAD_KEYS = {
    "actor_preclip_max": M.ACTOR_GRAD_NORM_PRECLIP,
    "actor_postclip_max": M.ACTOR_GRAD_NORM_POSTCLIP,
    "critic_preclip_max": M.CRITIC_GRAD_NORM_PRECLIP,
    "critic_postclip_max": M.CRITIC_GRAD_NORM_POSTCLIP,
}


def policy_lag_updates(updates: int, policy_versions: np.ndarray) -> float:
    """Mean policy lag of a batch, in updates: ``mean(max(updates − v_i, 0))``.

    Each sample's lag is clamped at 0. After the learner is rebuilt from its
    last checkpoint, replay still holds samples that workers acted on with
    the dead learner's newer weights (versions up to its last update count,
    above the rebuilt learner's); their true lag is unknown but not negative,
    and a negative one would pull the mean below the lag of every other sample.

    Args:
        updates: the learner's update count (its current policy version).
        policy_versions: ``int[B]``, the version each sample was acted with.
    """
    lags = updates - np.asarray(policy_versions, dtype=np.int64)
    return float(np.maximum(lags, 0).mean())


def remote_learner_class(num_gpus: float = 0.0, num_cpus: float = 1.0) -> Any:
    """``TD3Learner`` as a Ray actor class with the given resources.

    Args:
        num_gpus: GPUs to reserve (0 for a CPU learner; the learner's
            ``device: auto`` then finds no CUDA device inside the actor).
        num_cpus: CPUs to reserve.

    Returns:
        The actor class; ``.remote(config)`` starts one.
    """
    return ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)(TD3Learner)


class LearnerActor:
    """A TD3 learner that feeds itself from the replay shards.

    Args:
        config: the run configuration.
        shards: replay shard actor handles.
        weights_board: the ``WeightsBoard`` actor handle.
        checkpoint_path: load this learner checkpoint when the file exists,
            under ``config.learner`` (changed non-architectural fields are
            applied; :meth:`resume_changes` lists them). An absolute path on
            storage every node reaches, or a URI (``s3://``, ``gs://``,
            ``file://``): never a relative path, which would be relative to
            this actor's working directory, not the driver's.
        require_checkpoint: the checkpoint must exist (a learner rebuilt after
            a crash, or a resume): a missing file is an error, never a fresh start.
        generation: the learner's incarnation (0 for the first, the driver's
            ``learner_restarts`` for a rebuilt one); published weights carry it.

    Raises:
        learner.td3.CheckpointError: the checkpoint does not fit the config
            (architecture fields named), is unreadable, or is missing while
            ``require_checkpoint`` is set.
        td3drive.contracts.storage.StorageError: ``checkpoint_path`` is relative, or its
            storage cannot be reached.
    """

    def __init__(
        self,
        config: TD3DriveConfig | Mapping[str, Any],
        shards: Sequence[Any],
        weights_board: Any,
        checkpoint_path: str | None = None,
        require_checkpoint: bool = False,
        generation: int = 0,
    ) -> None:
        # The driver passes the config as a plain dict: constructor arguments
        # by value let Ray restart an actor (ray-project/ray#53727).
        if not isinstance(config, TD3DriveConfig):
            config = config_from_dict(dict(config), source="learner actor config")
        self.config = config
        torch.set_num_threads(config.run.learner_threads())
        self.generation = generation
        found = False
        if checkpoint_path:
            require_absolute(checkpoint_path, "the learner checkpoint")
            storage, name = RunStorage.for_file(checkpoint_path)
            found = storage.exists(name)
        if checkpoint_path and found:
            self.learner = TD3Learner.from_checkpoint(checkpoint_path, config.learner)
            self.resumed_from: str | None = checkpoint_path
        elif require_checkpoint:
            raise CheckpointError(
                f"learner checkpoint {checkpoint_path} not found; the learner cannot be rebuilt "
                f"from it (run.storage_path must be storage every node reaches: a shared "
                f"filesystem mounted at the same path everywhere, or a URI such as s3://)"
            )
        else:
            self.learner = TD3Learner(config.learner)
            self.resumed_from = None
        # {field: (checkpoint value, value in use)} of the learner fields the resume changed.
        self._resume_changes = dict(self.learner.resume_changes)
        self.sampler = ReplaySampler(
            shards,
            config.learner.batch_size,
            prefetch=config.replay.prefetch_batches,
            timeout_s=config.replay.rate_limit_timeout_s,
            transport=config.replay.sample_transport,
            decode_threads=config.replay.sample_decode_threads,
        )
        self.prioritized = config.replay.prioritized
        self.board = weights_board
        self._stop = threading.Event()
        self.grad_norm_max = dict.fromkeys(GRAD_KEYS, 0.0)
        self.latest_metrics: dict[str, float] = {}
        self.sample_wait_s_total = 0.0
        self._lags: list[float] = []
        # An update count crossed a multiple of run.publish_every_updates since
        # the last publish: train() publishes at the end of its call.
        self._publish_due = False
        self.publish()

    def device(self) -> str:
        return str(self.learner.device)

    def sampler_settings(self) -> dict[str, Any]:
        """How this learner's sampler fetches batches: ``transport``
        (``replay.sample_transport``), ``decode_threads``
        (``replay.sample_decode_threads``, used with ``compressed``) and
        ``prefetch`` (``replay.prefetch_batches``)."""
        return {
            "transport": self.sampler.transport,
            "decode_threads": self.sampler.decode_threads,
            "prefetch": self.sampler.prefetch,
        }

    def torch_threads(self) -> int:
        """torch intra-op threads in the learner's process (``run.learner_torch_threads``)."""
        return torch.get_num_threads()

    def updates(self) -> int:
        return self.learner.updates

    def resume_changes(self) -> dict[str, tuple[Any, Any]]:
        """The learner fields whose value differs from the loaded checkpoint's,
        ``{field: (checkpoint value, value in use)}``; empty without a checkpoint
        or when nothing changed. For the driver to log."""
        return dict(self._resume_changes)

    def publish(self) -> int:
        """Publish the current actor+encoder weights as ``(generation, version)``;
        returns the version.

        The weights go to the board by value; the board
        (:class:`rollout_workers.ray_actor.RayWeightsBoard`) stores them in the
        object store itself, so they outlive this learner's process. A rebuilt
        learner's larger ``generation`` makes the board take its versions even
        though they restart below the dead learner's.
        """
        version, weights = self.learner.policy_weights()
        ray.get(self.board.publish.remote(version, weights, self.generation))
        return version

    def stop(self) -> None:
        """Make a running :meth:`train` return after its current update."""
        self._stop.set()

    def train(self, num_updates: int) -> dict[str, Any]:
        """Run up to ``num_updates`` updates (fewer if :meth:`stop` is called).

        The updates run with :meth:`learner.td3.TD3Learner.update_deferred`:
        their metrics stay on the learner's device and come to the host in one
        transfer at the end of the call (:meth:`~learner.td3.TD3Learner.fetch_metrics`),
        which also measures the encoder weight change once. Weights are
        published at the end of the call too, when the update count crossed a
        multiple of ``run.publish_every_updates`` during it (or during an
        earlier call that raised): the device-to-host copy of the weights and
        the board's round trip never interrupt the updates.

        With ``replay.prioritized``, each update also returns its per-sample
        absolute TD errors (:meth:`learner.td3.TD3Learner.last_td_errors`, one
        transfer per update) and the sampler sends them to the shards the
        samples came from as new priorities
        (:meth:`buffer_service.ray_actor.ReplaySampler.update_priorities`).
        Before returning, the call waits until the shards have acknowledged
        them, so the counts below are final.

        Returns:
            ``{"updates" (total), "done" (this call), "metrics" (the latest
            value of each metric over the actor's life: critic ones from the
            last update, actor ones from the last actor step),
            "updates_per_s", "policy_lag_updates_mean" (this call),
            "grad_norm" (running maxima), "sample_wait_s_total",
            "priority_updates" (batches whose TD errors went to the shards, over
            the actor's life; 0 without prioritized replay; also in ``metrics``
            as ``replay/priority_updates``), "priority_transitions_updated"
            (transitions the shards re-prioritised; evicted ones are skipped),
            "priority_transitions_lost" (updates lost to a shard restart)}``.

        Raises:
            learner.td3.NonFiniteLossError: a NaN/inf loss; the step was not
                applied (with ``learner.fused_adam``, neither were the later
                ones of this call) and no priorities were sent for it; nothing
                is published.
            buffer_service.ray_actor.ReplayTimeoutError: the replay gave no batch
                within ``replay.rate_limit_timeout_s`` (no data, or shards not
                answering); raised again by every later call until
                :meth:`reset_sampler`. The metrics of the updates done are
                fetched by the next call.
            TimeoutError: the shards did not acknowledge priority updates
                within ``replay.rate_limit_timeout_s``.
        """
        self._stop.clear()
        start = time.perf_counter()
        done = 0
        lags: list[float] = []
        publish_every = self.config.run.publish_every_updates
        learner = self.learner
        while done < num_updates and not self._stop.is_set():
            waited = time.perf_counter()
            try:  # None: no batch yet, check stop; a failed replay raises ReplayTimeoutError
                sample = self.sampler.poll(timeout_s=1.0)
            finally:
                self.sample_wait_s_total += time.perf_counter() - waited
            if sample is None:
                continue
            lags.append(policy_lag_updates(learner.updates, sample.sampled.policy_versions))
            learner.update_deferred(sample.sampled.batch)
            if self.prioritized:
                self.sampler.update_priorities(sample, learner.last_td_errors())
            done += 1
            if learner.updates % publish_every == 0:
                self._publish_due = True
        self._lags.extend(lags)
        fetched = learner.fetch_metrics()  # one transfer; raises NonFiniteLossError
        metrics = self.latest_metrics
        metrics.update(fetched.latest)
        if self.prioritized:
            metrics[M.PRIORITY_UPDATES] = float(self.sampler.priority_batches)
        for name, key in GRAD_KEYS.items():
            if key in fetched.grad_norm_max:
                self.grad_norm_max[name] = max(self.grad_norm_max[name], fetched.grad_norm_max[key])
        if self._publish_due:
            self.publish()
            self._publish_due = False
        if self.prioritized:
            self.sampler.flush_priorities()
        elapsed = time.perf_counter() - start
        return {
            "updates": learner.updates,
            "done": done,
            "metrics": dict(metrics),
            "updates_per_s": done / elapsed if elapsed > 0 else 0.0,
            "policy_lag_updates_mean": float(np.mean(lags)) if lags else None,
            "grad_norm": dict(self.grad_norm_max),
            "sample_wait_s_total": self.sample_wait_s_total,
            "priority_updates": self.sampler.priority_batches,
            "priority_transitions_updated": self.sampler.priority_transitions_updated,
            "priority_transitions_lost": self.sampler.priority_transitions_lost,
        }

    def reset_sampler(self) -> None:
        """Start a fresh replay prefetch thread, e.g. after :meth:`train` raised
        ``ReplayTimeoutError`` and the driver chose to retry."""
        self.sampler.reset()

    def policy_lag_mean(self) -> float | None:
        """Mean policy lag over every update so far, in updates."""
        return float(np.mean(self._lags)) if self._lags else None

    def save_checkpoint(self, path: str) -> str:
        """Atomic checkpoint of the learner (networks, targets, optimizers,
        counters) at ``path``, an absolute path or a URI on the run's storage.

        Returns:
            The checkpoint's location.

        Raises:
            td3drive.contracts.storage.StorageError: a relative ``path``; the write failed
                (any previous checkpoint is untouched).
        """
        return str(self.learner.save_checkpoint(require_absolute(path, "the learner checkpoint")))

    def policy_weights(self) -> tuple[int, dict[str, np.ndarray]]:
        return self.learner.policy_weights()

    def close(self) -> None:
        self.sampler.close()


def remote_learner_actor_class(num_gpus: float = 0.0, num_cpus: float = 1.0) -> Any:
    """:class:`LearnerActor` as a threaded Ray actor (train + stop concurrently)."""
    return ray.remote(  # type: ignore[call-overload]
        num_gpus=num_gpus, num_cpus=num_cpus, max_concurrency=4
    )(LearnerActor)
