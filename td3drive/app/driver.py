"""``td3drive train``: build the services from a config, run to the budget.

The driver connects to the Ray cluster it runs in (``ray job submit`` sets
``RAY_ADDRESS``) or starts a local Ray instance, then starts

* ``replay.num_shards`` replay shards (threaded actors, snapshots under
  ``checkpoints/replay/shard-<i>``, restarted by Ray from their last snapshot),
* a weights board, the learner (GPU when ``run.learner_num_gpus > 0``),
* ``rollout.num_workers`` rollout workers (restarted by Ray when they die),
* one evaluation worker.

Everything the run writes goes under one *run location*
(:class:`td3drive.contracts.storage.RunStorage`): ``<run.storage_path>/<UTC timestamp>``
(``./runs`` by default) or the ``--run-dir``/``--resume`` location, a local or
shared path or a URI (``s3://``, ``gs://``, ``file://``), made absolute in this
process before any actor sees it. The driver writes ``config.yaml``,
``metrics.jsonl``, ``eval.jsonl``, ``eval.json``, ``summary.json`` and
``checkpoints/driver.json``; the learner actor ``checkpoints/learner.pt``; shard
``i`` its snapshots under ``checkpoints/replay/shard-<i>/``, each on whatever
node it runs, so the location must be storage every node reaches.

It keeps one ``run`` call in flight per worker and one ``train`` call on the
learner, reacting to whichever finishes first; the replay shards' rate
limiter paces both sides. Every ``run.report_interval_s`` it writes a line to
``metrics.jsonl`` and updates the Prometheus endpoint; every
``run.checkpoint_every_updates`` learner updates it checkpoints the learner
and snapshots the shards. At the env-step budget it stops the learner,
flushes the workers, writes a final checkpoint, evaluates the deterministic
policy and writes ``summary.json``.

Failures (``docs/reliability.md``): a worker or shard that dies is restarted
by Ray and its call is retried; every restart is counted once and logged with
its cause, and the transitions lost are reported. A learner that dies is
rebuilt from its last checkpoint as a new *generation* whose weights replace
the dead one's on the weights board. A NaN/inf loss stops the run with the
learner's diagnosis, keeping the last good checkpoint (nothing is saved after
the bad update). A replay timeout gets a fresh sampler, and stops the run with
a diagnosis when it repeats. An actor whose constructor raises (an environment
that cannot be built, a checkpoint that does not fit) stops the run with that
error; so does a cluster too small for the run's reservations.

Stops: SIGTERM (``ray job stop``) and SIGINT (Ctrl-C) stop collection, save
learner, replay and counters, write ``summary.json`` with ``status: stopped``
and raise :class:`RunStopped`; ``--resume`` continues with monotone counters.
A second signal ends the process at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from ray.exceptions import RayActorError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from td3drive.app.prometheus import MetricsEndpoint, RunMetrics
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import ConfigError, TD3DriveConfig, config_from_dict
from td3drive.contracts.storage import (
    RunStorage,
    is_uri,
    join_location,
    ray_cache_warning,
    resolve_location,
)

log = logging.getLogger("td3drive.train")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.jsonl"
VIDEO_DIR = "videos"
EVAL_RESULT_FILE = "eval.json"
STATE_FILE = "checkpoints/driver.json"
LEARNER_CHECKPOINT = "checkpoints/learner.pt"
REPLAY_SNAPSHOTS = "checkpoints/replay"


# A run started inside a Ray Tune trial (td3drive sweep) must not be squeezed
# into the trial's placement group: its actors reserve their own resources.
_OUTSIDE_ANY_PLACEMENT_GROUP = {
    "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None)  # type: ignore[arg-type]
}


class TrainingError(RuntimeError):
    """The run stopped; the message says why and what was kept."""


class RunStopped(TrainingError):
    """SIGTERM/SIGINT stopped the run after saving it.

    Attributes:
        signum: the signal received.
        exit_code: ``128 + signum``, the shell's convention for a process ended
            by a signal (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


MAX_CONSECUTIVE_CALL_FAILURES = 10
"""A rollout worker whose calls fail this many times in a row (raising, not
dying) stops the run with its last error instead of being retried forever."""

MAX_REPLAY_TIMEOUTS = 3
"""Replay timeouts in a row after which the run stops with a diagnosis; each
earlier one gets the learner a fresh sampler."""

STOP_GRACE_S = 30.0
"""After SIGTERM/SIGINT, how long the driver waits for the calls in flight
(a worker's chunk, the learner's current update) before saving anyway, s.
Ray Jobs SIGKILLs a stopped job after ``RAY_JOB_STOP_WAIT_TIME_S`` (3 s by
default): give the job ``RAY_JOB_STOP_WAIT_TIME_S=60`` in its runtime_env."""


@dataclass
class Progress:
    """Counters that survive a resume (``checkpoints/driver.json``).

    Attributes:
        env_steps, episodes: collected by every worker incarnation.
        learner_updates: updates applied by every learner generation (monotone;
            a rebuilt learner's own count, its policy version, restarts from
            its checkpoint).
        learner_updates_lost: updates a dead learner applied after its last
            checkpoint.
        launches: starts of the run (1 + resumes); spaces episode ids apart.
        worker_restarts, shard_restarts, learner_restarts: one per restart.
        transitions_pushed: transitions the workers sent to the replay shards.
        transitions_rejected: transitions in chunks a shard refused as invalid.
        transitions_dropped: transitions a worker could not send at all (a
            chunk still unsent when it closed).
        wall_s: wall-clock seconds of the run, over resumes.
    """

    env_steps: int = 0
    episodes: int = 0
    learner_updates: int = 0
    learner_updates_lost: int = 0
    launches: int = 0
    worker_restarts: int = 0
    shard_restarts: int = 0
    learner_restarts: int = 0
    transitions_pushed: int = 0
    transitions_rejected: int = 0
    transitions_dropped: int = 0
    wall_s: float = 0.0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "recent"}


DEFAULT_STORAGE_PATH = "runs"
"""``run.storage_path`` when the config leaves it null: ``./runs``, made
absolute against the driver's working directory."""


def resolve_run_dir(
    run_dir: str | Path | None, storage_path: str | None = None, base: str | Path | None = None
) -> str:
    """The run location, as a string every actor can open: an absolute path or a URI.

    Precedence: ``run_dir`` (``--run-dir``/``--resume``: the run location
    itself, a path or a URI); else ``<storage_path>/<UTC timestamp>``; else
    ``./runs/<UTC timestamp>``. Relative paths are resolved against ``base``
    (default: this process's working directory, the driver's).

    Raises:
        td3drive.contracts.storage.StorageError: an empty location.
    """
    if run_dir is not None:
        return resolve_location(run_dir, base)
    root = resolve_location(storage_path or DEFAULT_STORAGE_PATH, base)
    return join_location(root, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))


def load_run_config(run_dir: str | Path | RunStorage) -> TD3DriveConfig:
    """The resolved config a run location was started with.

    Args:
        run_dir: the run location: a local path, a URI or a storage.

    Raises:
        ConfigError: no ``config.yaml`` there, or it does not validate.
        td3drive.contracts.storage.StorageError: the storage cannot be opened or read.
    """
    storage = run_dir if isinstance(run_dir, RunStorage) else RunStorage(run_dir)
    if not storage.is_file(CONFIG_FILE):
        raise ConfigError(f"{storage.display} is not a td3drive run directory (no {CONFIG_FILE})")
    text = storage.read_text(CONFIG_FILE)
    return config_from_dict(yaml.safe_load(text), source=storage.path(CONFIG_FILE))


class TrainingRun:
    """One training run at the run location ``run_dir``.

    Args:
        config: the resolved configuration (written to ``config.yaml``).
        run_dir: the run location: a local path (relative paths are resolved
            here, against the driver's working directory), a URI or a storage;
            ``None`` = ``<run.storage_path>/<UTC timestamp>``
            (:func:`resolve_run_dir`). Created if missing. A fresh run refuses
            a location that already holds a run (``config.yaml`` or
            checkpoints): ``resume`` continues one.
        resume: continue from ``checkpoints/`` (counters, learner, replay).
        log_line: where progress lines go (a TTY display or a logger).
        on_report: called with each metrics line instead of logging it (a
            live display).

    Raises:
        td3drive.contracts.storage.StorageError: the location cannot be opened
            (an unknown URI scheme, an empty location, unreachable storage).
    """

    def __init__(
        self,
        config: TD3DriveConfig,
        run_dir: str | Path | RunStorage | None = None,
        resume: bool = False,
        log_line: Callable[[str], None] | None = None,
        on_report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        if not isinstance(run_dir, RunStorage):
            run_dir = RunStorage(resolve_run_dir(run_dir, config.run.storage_path))
        self.storage = run_dir
        self.resume = resume
        self.log_line = log_line or log.info
        self.on_report = on_report
        self.progress = Progress(recent=deque(maxlen=config.run.recent_episodes))
        self.metrics = RunMetrics(run_id=self.storage.name)
        self.learner_stats: dict[str, Any] = {}
        self.worker_rates: dict[int, float] = {}
        self.shard_stats: list[dict[str, Any]] = []
        self._endpoint: MetricsEndpoint | None = None
        self._start = time.monotonic()
        self._last_checkpoint_updates = 0
        self._env_restarts_by_worker: dict[int, int] = {}
        self._next_eval = config.run.eval_every_env_steps or None
        self._next_video = config.run.eval_video_every_env_steps or None
        # Fault bookkeeping: each worker's incarnation (a restarted actor
        # reports a new one), workers seen dead and not back yet, consecutive
        # failed calls, transitions each incarnation has reported pushing.
        self._worker_incarnation: dict[int, Any] = {}
        self._worker_restarts_seen: dict[int, int] = {}
        self._dropped_seen: dict[tuple[int, Any], int] = {}
        self._rejected_seen: dict[tuple[int, Any], int] = {}
        self._workers_down: set[int] = set()
        self._worker_failures: dict[int, int] = {}
        self._pushed_seen: dict[tuple[int, Any], int] = {}
        self._shard_restarts_seen: dict[int, int] = {}
        self._learner_version = 0  # the live learner's own update count
        self._replay_timeouts = 0
        self._stop_signal: int | None = None
        # (wall s, env steps, updates) at the previous metrics line: current rates.
        self._last_report = (0.0, 0, 0)

    # ------------------------------------------------------------ setup
    def learner_checkpoint_location(self) -> str:
        """Where the learner actor saves and loads its checkpoint: an absolute
        path or a URI, never relative (the actor's cwd is not the driver's)."""
        return self.storage.path(LEARNER_CHECKPOINT)

    def shard_snapshot_location(self, index: int) -> str:
        """Shard ``index``'s snapshot directory: an absolute path or a URI."""
        return self.storage.path(f"{REPLAY_SNAPSHOTS}/shard-{index}")

    def _prepare_dir(self) -> None:
        storage = self.storage
        if not self.resume and (storage.exists(CONFIG_FILE) or storage.list("checkpoints")):
            raise TrainingError(
                f"{self.location} already holds a run; continue it with "
                f"`td3drive train --resume {self.location}` or start over with --overwrite"
            )
        storage.make_dirs("checkpoints")
        config_text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        storage.write_text(CONFIG_FILE, config_text)
        if self.resume and storage.exists(STATE_FILE):
            state = json.loads(storage.read_text(STATE_FILE))
            for key, value in state.items():
                if key in Progress.__dataclass_fields__ and key != "recent":
                    setattr(self.progress, key, value)
            self._last_checkpoint_updates = self.progress.learner_updates
            self._last_report = (
                self.progress.wall_s,
                self.progress.env_steps,
                self.progress.learner_updates,
            )
            self._forget_after_checkpoint()
        self.progress.launches += 1

    @property
    def location(self) -> str:
        """What messages and ``summary.json`` name: the absolute path or the URI."""
        return self.storage.display

    @property
    def run_dir(self) -> Path | str:
        """The local run directory when the storage is local, else the URI."""
        return self.storage.local_path or self.storage.display

    def _before_checkpoint(self, line: str) -> bool:
        """Whether a metrics/eval line was written at or before the last
        checkpoint; a line that does not parse (an append cut short by a kill
        or a full disk) is not."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        if not isinstance(record, dict):
            return False
        return bool(
            record.get("env_steps", 0) <= self.progress.env_steps
            and record.get("learner_updates", 0) <= self.progress.learner_updates
        )

    def _forget_after_checkpoint(self) -> None:
        """On resume, drop the ``metrics.jsonl``/``eval.jsonl`` lines written
        after the last checkpoint (a driver killed without saving): the run
        goes on from the checkpoint, so its curves never go backwards."""
        for name in (METRICS_FILE, EVAL_FILE):
            if not self.storage.exists(name):
                continue
            lines = self.storage.read_text(name).splitlines()
            kept = [line for line in lines if line.strip() and self._before_checkpoint(line)]
            if len(kept) < len(lines):
                self.storage.write_text(name, "".join(f"{line}\n" for line in kept))
                self.log_line(
                    f"{name}: dropped {len(lines) - len(kept)} lines written after the last "
                    f"checkpoint ({self.progress.env_steps} env steps)"
                )

    def reserved_cpus(self) -> float:
        """CPUs this run's actors reserve: workers, shards, the learner (the
        evaluator and the weights board reserve none)."""
        cfg, run = self.config, self.config.run
        return (
            cfg.rollout.num_workers * run.worker_num_cpus
            + cfg.replay.num_shards * run.shard_num_cpus
            + run.learner_num_cpus
        )

    def _start_ray(self) -> None:
        if not ray.is_initialized():
            # Actors' warnings and errors reach this log (and `ray job logs`),
            # deduplicated by Ray; nothing logs per step at WARNING.
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=True)
                self.log_line(f"connected to the Ray cluster at {os.environ['RAY_ADDRESS']}")
            else:
                # A fresh instance of our own (address="local"), even when a
                # `ray start` cluster runs on this machine: to run there, use
                # `ray job submit` or RAY_ADDRESS=auto.
                needed = self.reserved_cpus() + 1
                cpus = max(os.cpu_count() or 1, int(np.ceil(needed)))
                ray.init(
                    address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True
                )
                self.log_line(f"started a local Ray instance ({cpus} logical CPUs)")
        self._check_cluster_fits()
        self._check_storage_reach()

    def _check_storage_reach(self) -> None:
        """Warn when the run location is one every actor may not reach: Ray's
        runtime-env cache (a relative ``./runs`` under ``ray job submit
        --working-dir``), or a local path on a cluster of several nodes (it
        must then be a shared filesystem mounted at the same path everywhere)."""
        warning = ray_cache_warning(self.storage)
        if warning:
            self.log_line(f"warning: {warning}")
        if self.storage.local_path is None:
            return
        try:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        except Exception as exc:  # the GCS query is advisory
            log.debug("node count unavailable: %r", exc)
            return
        if nodes > 1:
            self.log_line(
                f"warning: the run location {self.location} is a local path and the cluster has "
                f"{nodes} nodes: it must be a shared filesystem mounted at the same path on every "
                "node (NFS, a PVC), or set run.storage_path to a URI (s3://, gs://); otherwise "
                "checkpoints and snapshots land on whichever node wrote them"
            )

    def _check_cluster_fits(self) -> None:
        """A run whose reservations exceed the cluster would wait forever at
        ``env steps 0``: say what is short instead.

        Raises:
            TrainingError: the cluster has fewer CPUs or GPUs than the run reserves.
        """
        run = self.config.run
        resources = ray.cluster_resources()
        short = []
        cpus = float(resources.get("CPU", 0.0))
        if self.reserved_cpus() > cpus + 1e-9:
            cfg = self.config
            short.append(
                f"{self.reserved_cpus():g} CPUs ({cfg.rollout.num_workers} workers × "
                f"run.worker_num_cpus {run.worker_num_cpus:g} + {cfg.replay.num_shards} shards × "
                f"run.shard_num_cpus {run.shard_num_cpus:g} + run.learner_num_cpus "
                f"{run.learner_num_cpus:g}) but the Ray cluster has {cpus:g}"
            )
        gpus = float(resources.get("GPU", 0.0))
        if run.learner_num_gpus > gpus:
            short.append(
                f"run.learner_num_gpus={run.learner_num_gpus:g} but the Ray cluster has "
                f"{gpus:g} GPU(s)"
            )
        if short:
            raise TrainingError(
                "the run does not fit the cluster: "
                + "; ".join(short)
                + ". Lower the counts or reservations in the config (--set), or add nodes."
            )

    def _start_services(self) -> None:
        from buffer_service.ray_actor import remote_shard_class, sample_threads
        from learner.ray_actor import remote_learner_actor_class
        from rollout_workers.ray_actor import (
            remote_evaluator_class,
            remote_weights_board_class,
            remote_worker_class,
        )
        from rollout_workers.worker import EnvironmentSpecError, check_environment

        cfg, run = self.config, self.config.run
        # An environment that cannot be built would make every worker's
        # constructor raise; find out once, here, with the real error.
        try:
            check_environment(cfg)
        except EnvironmentSpecError as exc:
            raise TrainingError(str(exc)) from exc
        # Restartable actors get their constructor arguments by value: the
        # config as a dict, the shards and the board by name (an actor handle
        # is a reference, and Ray warns that a restart can fail on one,
        # ray-project/ray#53727). The names are unique to this driver.
        config_dict = cfg.model_dump(mode="json")
        tag = f"td3drive-{uuid.uuid4().hex[:8]}"
        shard_names = [f"{tag}-shard-{i}" for i in range(cfg.replay.num_shards)]
        board_name = f"{tag}-weights-board"
        shard_class = remote_shard_class(
            num_cpus=run.shard_num_cpus,
            sample_concurrency=sample_threads(cfg.replay.prefetch_batches),
        )
        self.shards = [
            shard_class.options(name=shard_names[index], **_OUTSIDE_ANY_PLACEMENT_GROUP).remote(
                cfg.replay,  # a small pydantic object, pickled by value
                cfg.learner.batch_size,
                index,
                self.shard_snapshot_location(index),  # absolute path or URI
                cfg.learner.seed,
            )
            for index in range(cfg.replay.num_shards)
        ]
        self.board = (
            remote_weights_board_class()
            .options(name=board_name, **_OUTSIDE_ANY_PLACEMENT_GROUP)
            .remote()
        )
        self._learner_class = remote_learner_actor_class(
            num_gpus=run.learner_num_gpus, num_cpus=run.learner_num_cpus
        )
        self.learner = self._new_learner()
        worker_class = remote_worker_class(num_cpus=run.worker_num_cpus)
        self.workers = [
            worker_class.options(**_OUTSIDE_ANY_PLACEMENT_GROUP).remote(
                config_dict,
                shard_names,
                board_name,
                index,
                # Episode ids stay unique over resumes: each launch starts
                # past every incarnation of the previous ones.
                incarnation_base=(self.progress.worker_restarts + self.progress.launches) % 2**16,
                skip_warmup=self.resume,  # the restored replay holds the warm-up data
            )
            for index in range(cfg.rollout.num_workers)
        ]
        self.evaluator = (
            remote_evaluator_class(num_cpus=0)
            .options(**_OUTSIDE_ANY_PLACEMENT_GROUP)
            .remote(config_dict, board_name)
        )
        self._wait_until_started()
        device = ray.get(self.learner.device.remote())
        changes = ray.get(self.learner.resume_changes.remote())
        if changes:
            self.log_line(
                "resumed with changed learner settings: "
                + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())
            )
        restored = [s for s in ray.get([s.stats.remote() for s in self.shards]) if s["size"]]
        self.log_line(
            f"{len(self.workers)} rollout workers, {len(self.shards)} replay shards"
            f"{f' ({len(restored)} restored from snapshots)' if restored else ''}, "
            f"learner on {device}"
        )

    def _wait_until_started(self) -> None:
        """Wait for every actor's constructor.

        Raises:
            TrainingError: a constructor raised (its message, once, instead of
                Ray restarting the actor forever), or actors did not start
                within ``run.start_timeout_s`` (named, with the likely cause).
        """
        actors = {
            **{f"replay shard {i}": a for i, a in enumerate(self.shards)},
            "learner": self.learner,
            **{f"rollout worker {i}": a for i, a in enumerate(self.workers)},
            "evaluator": self.evaluator,
        }
        refs = {actor.__ray_ready__.remote(): name for name, actor in actors.items()}
        timeout = self.config.run.start_timeout_s
        ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as exc:
                raise TrainingError(f"{refs[ref]} could not start: {_actor_error(exc)}") from None
        if waiting:
            names = ", ".join(refs[ref] for ref in waiting)
            raise TrainingError(
                f"{names} did not start within run.start_timeout_s={timeout:g} s; the cluster "
                f"may lack the resources they reserve (`ray status` shows what is pending)"
            )

    def _new_learner(self) -> Any:
        """Start a learner actor: fresh, from the run's checkpoint on
        ``--resume``, or, after a learner died, from its last checkpoint as
        generation ``learner_restarts`` (the checkpoint must then exist)."""
        checkpoint = self.learner_checkpoint_location()
        rebuild = self.progress.learner_restarts > 0
        return self._learner_class.options(**_OUTSIDE_ANY_PLACEMENT_GROUP).remote(
            self.config.model_dump(mode="json"),
            self.shards,
            self.board,
            checkpoint if (self.resume or rebuild) else None,
            require_checkpoint=self.resume or rebuild,
            generation=self.progress.learner_restarts,
        )

    # ------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT ask the loop to stop and save; a second one ends the
        process at once. Only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, _frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: not saving")
            self._stop_signal = signum
            self.log_line(
                f"{signal.Signals(signum).name} received: stopping collection and saving the "
                f"run (a second signal ends it without saving)"
            )

        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop as on ``signum``: save and end with :class:`RunStopped`
        (what the signal handler does; for a run in a thread)."""
        self._stop_signal = signum

    # ------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Run to the env-step budget; returns the summary.

        The metrics endpoint is bound first (a taken port fails before Ray
        starts) and stays up ``run.metrics_linger_s`` after the end with the
        final ``td3drive_run_status``, so Prometheus scrapes how the run ended.

        Raises:
            TrainingError: a NaN/inf loss or another unrecoverable failure;
                the last good checkpoint is kept.
            RunStopped: SIGTERM/SIGINT (or :meth:`request_stop`); the run was
                saved and ``--resume`` continues it.
            prometheus.MetricsPortError: ``run.metrics_port`` is taken.
        """
        port = self.config.run.metrics_port
        if port is not None:
            self._endpoint = MetricsEndpoint.bind(self.metrics, port)
            self.log_line(f"Prometheus metrics on :{self._endpoint.port}/metrics")
        self.metrics.set_status("running")
        status = "failed"
        failure: str | None = None
        previous_handlers: dict[int, Any] = {}
        try:
            self._prepare_dir()
            self._start_ray()
            # After ray.init, which installs its own SIGTERM handler (sys.exit).
            previous_handlers = self._install_signal_handlers()
            self._start_services()
            if not self.storage.exists(LEARNER_CHECKPOINT):
                self._checkpoint()  # a good checkpoint exists from the start
            self._loop()
            summary = self._finish()
            status = summary["status"]
            if status == "stopped" and self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                raise RunStopped(
                    f"{name}: saved at {self.progress.env_steps} env steps and "
                    f"{self.progress.learner_updates} updates; continue with "
                    f"`td3drive train --resume {self.location}`",
                    self._stop_signal,
                )
            return summary
        except TrainingError as exc:
            failure = str(exc)
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            try:  # lines an object store holds in memory (metrics.jsonl, eval.jsonl)
                self.storage.flush()
            except OSError as exc:
                self.log_line(f"could not upload the last metrics lines: {exc}")
            self.metrics.set_status(status)
            if self._endpoint is not None:
                linger = self.config.run.metrics_linger_s
                if linger:
                    # Said now: a stop during the linger ends the process.
                    ending = f"{status}: {failure}" if failure else status
                    self.log_line(
                        f"run {ending}; the metrics endpoint stays up {linger:g} s for the "
                        f"last scrape (run.metrics_linger_s)"
                    )
                self._endpoint.close(linger_s=linger)

    @property
    def metrics_port(self) -> int | None:
        return None if self._endpoint is None else int(self._endpoint.port)

    def _loop(self) -> None:
        """Phases: collect (workers and learner busy) until the budget; then
        drain (no new worker calls, the learner keeps sampling so blocked
        inserts land); then flush the workers' partial chunks; then stop the
        learner. A stop signal skips to ``stopping``: no new calls, the
        learner stops after its current update, and the calls in flight get
        up to :data:`STOP_GRACE_S` before the run is saved."""
        cfg = self.config.run
        budget = cfg.total_env_steps
        pending: dict[Any, tuple[str, int]] = {}

        def submit(kind: str, index: int = 0) -> None:
            if kind == "worker":
                ref = self.workers[index].run.remote(cfg.worker_steps_per_call)
            elif kind == "flush":
                ref = self.workers[index].flush.remote()
            elif kind == "eval":
                ref = self.evaluator.evaluate.remote(cfg.eval_episodes, **self._video_args(index))
            else:
                ref = self.learner.train.remote(cfg.learner_updates_per_call)
            pending[ref] = (kind, index)

        for index in range(len(self.workers)):
            submit("worker", index)
        submit("learner")
        phase = "collect"
        stop_deadline = float("inf")
        next_report = time.monotonic() + cfg.report_interval_s
        while pending:
            if self._stop_signal is not None and phase != "stopping":
                phase = "stopping"
                stop_deadline = time.monotonic() + STOP_GRACE_S
                for shard in self.shards:  # blocked inserts return, the workers' calls end
                    shard.release_rate_limit.remote()
                self.learner.stop.remote()
            if phase == "stopping" and time.monotonic() >= stop_deadline:
                self.log_line(
                    f"{len(pending)} calls still running after {STOP_GRACE_S:g} s; saving anyway"
                )
                break
            # Short waits so a stop signal is acted on within a second.
            timeout = min(1.0, max(0.0, next_report - time.monotonic()))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            for ref in ready:
                kind, index = pending.pop(ref)
                if kind == "worker":
                    self._collect_worker(ref, index)
                    if phase == "collect" and self.progress.env_steps < budget:
                        submit("worker", index)
                elif kind == "flush":
                    self._collect_flush(ref, index)
                elif kind == "eval":
                    self._collect_eval(ref, at_steps=index)
                else:
                    self._collect_learner(ref)
                    if phase not in ("stop", "stopping"):
                        submit("learner")
            if (
                phase == "collect"
                and self._next_eval is not None
                and self.progress.env_steps >= self._next_eval
                and cfg.eval_episodes
                and "eval" not in {kind for kind, _ in pending.values()}
            ):
                submit("eval", self.progress.env_steps)
                while self._next_eval <= self.progress.env_steps:
                    self._next_eval += cfg.eval_every_env_steps
            if phase == "collect" and self.progress.env_steps >= budget:
                phase = "drain"
                for shard in self.shards:  # let the last chunks land whatever the ratio
                    shard.release_rate_limit.remote()
                self.log_line(f"env-step budget {budget} reached; draining the workers")
            busy = {kind for kind, _ in pending.values()}
            if phase == "drain" and not busy & {"worker"}:
                phase = "flush"
                for index in range(len(self.workers)):
                    submit("flush", index)
            elif phase == "flush" and not busy & {"flush"}:
                phase = "stop"
                self.learner.stop.remote()
            if time.monotonic() >= next_report:
                self._report()
                next_report = time.monotonic() + cfg.report_interval_s

    def _collect_flush(self, ref: Any, index: int) -> None:
        try:
            self._count_pushes(index, ray.get(ref))
        except (RayActorError, RayTaskError) as exc:
            self.log_line(f"rollout worker {index} could not flush its last chunk: {exc!r}")

    def _count_pushes(self, index: int, stats: dict[str, Any]) -> None:
        """Add what worker ``index`` pushed, had refused and dropped since its
        last report (its counts are cumulative over its incarnation)."""
        incarnation = stats.get("incarnation", 0)
        self._worker_incarnation[index] = incarnation
        key = (index, incarnation)
        for name, total, seen in (
            ("transitions_pushed", "pushed_transitions", self._pushed_seen),
            ("transitions_rejected", "rejected_transitions", self._rejected_seen),
            ("transitions_dropped", "transitions_dropped", self._dropped_seen),
        ):
            value = int(stats.get(total, 0))
            setattr(self.progress, name, getattr(self.progress, name) + value - seen.get(key, 0))
            seen[key] = value

    def _collect_eval(self, ref: Any, at_steps: int) -> None:
        try:
            self._record_eval(ray.get(ref), at_steps=at_steps)
        except (RayActorError, RayTaskError) as exc:  # an evaluation is not worth the run
            self.log_line(f"evaluation at {at_steps} env steps failed: {_actor_error(exc)}")

    def _collect_worker(self, ref: Any, index: int) -> None:
        try:
            stats = ray.get(ref)
        except RayActorError as exc:
            if exc.actor_init_failed:
                raise TrainingError(
                    f"rollout worker {index} could not start: {_actor_error(exc)}"
                ) from None
            if index not in self._workers_down:  # logged once per death, not per retry
                self._workers_down.add(index)
                self.log_line(f"rollout worker {index} died ({_actor_error(exc)}); Ray restarts it")
            time.sleep(1.0)
            return
        except RayTaskError as exc:
            failures = self._worker_failures.get(index, 0) + 1
            self._worker_failures[index] = failures
            if failures >= MAX_CONSECUTIVE_CALL_FAILURES:
                raise TrainingError(
                    f"rollout worker {index} failed {failures} calls in a row; last error: "
                    f"{exc.cause!r}"
                ) from exc
            self.log_line(f"rollout worker {index} call failed, retrying: {exc.cause!r}")
            time.sleep(1.0)
            return
        self._worker_failures[index] = 0
        self._workers_down.discard(index)
        # Ray's restart count of this actor: exact even when it restarted
        # twice between two calls that returned.
        restarts = int(stats.get("actor_restarts", 0))
        new_restarts = restarts - self._worker_restarts_seen.get(index, 0)
        if new_restarts > 0:
            self.progress.worker_restarts += new_restarts
            self.log_line(
                f"rollout worker {index} is back (Ray restart {restarts}, incarnation "
                f"{stats.get('incarnation')}: fresh episode ids, no second warm-up)"
            )
        self._worker_restarts_seen[index] = restarts
        self._count_pushes(index, stats)
        if stats.get("push_error"):  # the chunk is kept and re-sent by the next call
            self.log_line(
                f"rollout worker {index} could not push a chunk ({stats['push_error']}); "
                f"it retries it first thing next call"
            )
            time.sleep(1.0)
        self.progress.env_steps += int(stats["steps"])
        self.worker_rates[index] = float(stats["steps_per_s"])
        for episode in stats["episodes"]:
            self.progress.episodes += 1
            self.progress.recent.append(episode)
        self._env_restarts_by_worker[index] = int(stats.get("env_restarts", 0))

    def _collect_learner(self, ref: Any) -> None:
        from buffer_service.ray_actor import ReplayTimeoutError
        from learner.td3 import NonFiniteLossError

        try:
            stats = ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, NonFiniteLossError):
                self.metrics.set_gauge("td3drive_learner_non_finite_loss", 1.0)
                self._write_summary(status="failed", error=str(exc.cause))
                raise TrainingError(
                    f"stopped: {exc.cause} The last good checkpoint is "
                    f"{self.learner_checkpoint_location()} (update "
                    f"{self._last_checkpoint_updates})."
                ) from exc.cause
            if isinstance(exc.cause, ReplayTimeoutError):
                self._on_replay_timeout(exc.cause)
                return
            raise TrainingError(f"the learner failed: {exc.cause!r}") from exc
        except RayActorError as exc:
            self._rebuild_learner(exc)
            return
        self._replay_timeouts = 0
        self.learner_stats = stats
        self.progress.learner_updates += int(stats["done"])
        self._learner_version = int(stats["updates"])
        self.metrics.update_learner(stats["metrics"])
        if (
            self.progress.learner_updates - self._last_checkpoint_updates
            >= self.config.run.checkpoint_every_updates
        ):
            self._checkpoint()

    def _on_replay_timeout(self, error: Exception) -> None:
        """A replay timeout: a fresh sampler, and the run stops with a
        diagnosis after :data:`MAX_REPLAY_TIMEOUTS` in a row."""
        self._replay_timeouts += 1
        sizes = [s.get("size") for s in self.shard_stats]
        diagnosis = (
            f"{error} (shard sizes {sizes}, env steps {self.progress.env_steps}, "
            f"workers down {sorted(self._workers_down) or 'none'})"
        )
        if self._replay_timeouts >= MAX_REPLAY_TIMEOUTS:
            self._write_summary(status="failed", error=diagnosis)
            raise TrainingError(
                f"the learner got no replay data {self._replay_timeouts} times in a row: "
                f"{diagnosis}. The last good checkpoint is {self.learner_checkpoint_location()}."
            )
        self.log_line(f"replay timeout ({diagnosis}); the learner gets a fresh sampler")
        ray.get(self.learner.reset_sampler.remote())

    def _rebuild_learner(self, exc: RayActorError) -> None:
        """The learner died: count it, log the cause, start the next
        generation from the last checkpoint and count the updates lost."""
        if exc.actor_init_failed:
            raise TrainingError(f"the learner could not start: {_actor_error(exc)}") from None
        self.progress.learner_restarts += 1
        self.log_line(
            f"the learner died ({_actor_error(exc)}); rebuilding it from "
            f"{self.learner_checkpoint_location()}"
        )
        self.learner = self._new_learner()
        try:
            restored = int(ray.get(self.learner.updates.remote()))
        except RayActorError as error:
            raise TrainingError(
                f"the learner could not be rebuilt: {_actor_error(error)}"
            ) from None
        lost = max(0, self._learner_version - restored)
        self.progress.learner_updates_lost += lost
        self._learner_version = restored
        self.log_line(
            f"learner generation {self.progress.learner_restarts} resumed at update {restored} "
            f"({lost} updates since the last checkpoint lost)"
        )

    def _checkpoint(self) -> None:
        try:
            ray.get(self.learner.save_checkpoint.remote(self.learner_checkpoint_location()))
        except RayActorError as exc:  # died between calls: rebuild, save next time
            self._rebuild_learner(exc)
            return
        for index, ref in enumerate([shard.save.remote() for shard in self.shards]):
            try:
                ray.get(ref)
            except RayActorError as exc:  # restarting; it keeps its previous snapshot
                self.log_line(f"replay shard {index} unavailable, snapshot skipped ({exc!r})")
        self._last_checkpoint_updates = self.progress.learner_updates
        state = self.progress.state()
        state["wall_s"] = self._wall_s()
        self.storage.write_text(STATE_FILE, json.dumps(state))
        self.storage.flush()

    def _wall_s(self) -> float:
        return self.progress.wall_s + (time.monotonic() - self._start)

    # ------------------------------------------------------------ reporting
    def _recent_episodes(self) -> dict[str, Any] | None:
        recent = list(self.progress.recent)
        if not recent:
            return None

        def mean(key: str) -> float:
            return float(np.mean([float(e.get(key) or 0.0) for e in recent]))

        return {
            "count": len(recent),
            "return_mean": mean("return"),
            "success_rate": mean("success"),
            "route_completion_mean": mean("route_completion"),
            "mean_speed_kmh": mean("mean_speed_kmh"),
            "collision_rate": mean("collision"),
        }

    def _replay_totals(self) -> dict[str, Any]:
        try:
            self.shard_stats = ray.get([s.stats.remote() for s in self.shards], timeout=30)
        except Exception as exc:  # a shard restarting: keep the last figures
            log.debug("shard stats unavailable: %r", exc)
        for stats in self.shard_stats:
            index, restarts = int(stats["shard"]), int(stats.get("restarts", 0))
            seen = self._shard_restarts_seen.setdefault(index, restarts)
            if restarts > seen:
                self.progress.shard_restarts += restarts - seen
                self._shard_restarts_seen[index] = restarts
                self.log_line(
                    f"replay shard {index} was restarted by Ray (restored from "
                    f"{stats.get('restored_from') or 'nothing: no snapshot yet'})"
                )
        size = sum(s["size"] for s in self.shard_stats)
        held = sum(s["bytes_held"] for s in self.shard_stats)
        raw = sum(s["compression_ratio"] * s["bytes_held"] for s in self.shard_stats)
        inserted = sum(int(s["inserted_transitions"]) for s in self.shard_stats)
        return {
            "size": size,
            "inserted_transitions": inserted,
            "bytes": held,
            "bytes_per_transition": held / size if size else 0.0,
            "compression_ratio": raw / held if held else 0.0,
        }

    def _report(self) -> dict[str, Any]:
        """Append one line to ``metrics.jsonl``, update the Prometheus
        endpoint and log a progress line.

        Rates (``env_steps_per_s``, ``updates_per_s``) are current: over the
        interval since the previous line; ``*_mean`` are since the run began.
        ``workers`` and ``shards`` carry the per-actor figures Prometheus has
        (labels ``worker``/``shard``)."""
        wall = self._wall_s()
        replay = self._replay_totals()
        episode = self._recent_episodes()
        last_wall, last_steps, last_updates = self._last_report
        interval = wall - last_wall
        line = {
            "time_s": wall,
            "env_steps": self.progress.env_steps,
            "learner_updates": self.progress.learner_updates,
            "episodes": self.progress.episodes,
            "env_steps_per_s": (self.progress.env_steps - last_steps) / interval
            if interval > 0
            else 0.0,
            "updates_per_s": (self.progress.learner_updates - last_updates) / interval
            if interval > 0
            else 0.0,
            "env_steps_per_s_mean": self.progress.env_steps / wall if wall else 0.0,
            "updates_per_s_mean": self.progress.learner_updates / wall if wall else 0.0,
            "episode": episode,
            "learner": self.learner_stats.get("metrics") or None,
            "replay": replay,
            "policy_lag_updates_mean": self.learner_stats.get("policy_lag_updates_mean"),
            "workers": {
                str(index): {
                    "env_steps_per_s": self.worker_rates.get(index, 0.0),
                    "env_restarts": self._env_restarts_by_worker.get(index, 0),
                    "actor_restarts": self._worker_restarts_seen.get(index, 0),
                    "down": index in self._workers_down,
                }
                for index in range(self.config.rollout.num_workers)
            },
            "shards": {str(s["shard"]): _shard_line(s) for s in self.shard_stats},
        }
        self._last_report = (wall, self.progress.env_steps, self.progress.learner_updates)
        self.storage.append_line(METRICS_FILE, json.dumps(line))
        self._export(line)
        if self.on_report is not None:
            self.on_report(line)
            return line
        ret = f"{episode['return_mean']:.1f}" if episode else "-"
        success = f"{episode['success_rate']:.0%}" if episode else "-"
        self.log_line(
            f"env steps {self.progress.env_steps}/{self.config.run.total_env_steps} | "
            f"updates {self.progress.learner_updates} | episodes {self.progress.episodes} | "
            f"return {ret} success {success} | {line['env_steps_per_s']:.0f} steps/s "
            f"{line['updates_per_s']:.2f} updates/s | replay {replay['size']}"
        )
        return line

    def _export(self, line: dict[str, Any]) -> None:
        m = self.metrics
        m.set_counter("td3drive_env_steps", self.progress.env_steps)
        m.set_counter("td3drive_episodes", self.progress.episodes)
        m.set_counter("td3drive_learner_updates", self.progress.learner_updates)
        m.set_counter("td3drive_worker_restarts", self.progress.worker_restarts)
        m.set_counter("td3drive_shard_restarts", self.progress.shard_restarts)
        m.set_counter("td3drive_learner_restarts", self.progress.learner_restarts)
        m.set_counter("td3drive_env_restarts", sum(self._env_restarts_by_worker.values()))
        m.set_gauge("td3drive_learner_updates_per_second", line["updates_per_s"])
        for index, rate in self.worker_rates.items():
            m.set_gauge("td3drive_env_steps_per_second", rate, str(index))
        if line["episode"]:
            e = line["episode"]
            m.set_gauge("td3drive_episode_return", e["return_mean"])
            m.set_gauge("td3drive_episode_success_ratio", e["success_rate"])
            m.set_gauge("td3drive_episode_route_completion_ratio", e["route_completion_mean"])
            m.set_gauge("td3drive_episode_speed_kmh", e["mean_speed_kmh"])
            m.set_gauge("td3drive_episode_collision_ratio", e["collision_rate"])
        if line["policy_lag_updates_mean"] is not None:
            m.set_gauge("td3drive_policy_lag_updates", line["policy_lag_updates_mean"])
        m.set_gauge("td3drive_policy_version", self.progress.learner_updates)
        for s in self.shard_stats:
            shard = str(s["shard"])
            m.set_counter("td3drive_replay_inserted_transitions", s["inserted_transitions"], shard)
            m.set_counter("td3drive_replay_sampled_transitions", s["sampled_transitions"], shard)
            m.set_counter("td3drive_replay_rejected_payloads", s["rejected_payloads"], shard)
            m.set_counter("td3drive_replay_evicted_chunks", s["evicted_chunks"], shard)
            for side in ("insert", "sample"):
                m.set_counter(
                    "td3drive_rate_limiter_wait_seconds", s[f"{side}_wait_s_total"], shard, side
                )
            m.set_gauge("td3drive_replay_size_transitions", s["size"], shard)
            m.set_gauge("td3drive_replay_bytes", s["bytes_held"], shard)
            m.set_gauge("td3drive_replay_compression_ratio", s["compression_ratio"], shard)

    # ------------------------------------------------------------ the end
    def _finish(self) -> dict[str, Any]:
        """Checkpoint, report, evaluate (not after a stop signal) and write
        ``summary.json``; returns the summary."""
        self._checkpoint()
        self._report()
        if self._stop_signal is not None:
            return self._write_summary(
                status="stopped", error=f"{signal.Signals(self._stop_signal).name} received"
            )
        evaluation: dict[str, Any] = {"episodes": 0}
        if self.config.run.eval_episodes:
            # The final weights (publishing happens every publish_every_updates):
            # the evaluation is of the checkpoint just written.
            ray.get(self.learner.publish.remote())
            self.log_line(f"evaluating the policy on {self.config.run.eval_episodes} episodes")
            try:
                video = self._video_args(self.progress.env_steps, final=True)
                result = ray.get(
                    self.evaluator.evaluate.remote(self.config.run.eval_episodes, **video)
                )
            except (RayActorError, RayTaskError) as exc:
                self.log_line(f"the final evaluation failed: {_actor_error(exc)}")
            else:
                self._record_eval(result, at_steps=self.progress.env_steps)
                evaluation = result["summary"]
                self.storage.write_text(
                    EVAL_RESULT_FILE, json.dumps(result, indent=2, default=float) + "\n"
                )
        return self._write_summary(status="completed", evaluation=evaluation)

    def _video_args(self, at_steps: int, final: bool = False) -> dict[str, Any]:
        """The evaluator's clip arguments for the evaluation started at
        ``at_steps``: the first periodic evaluation at or after each multiple
        of ``run.eval_video_every_env_steps``, and the final one. The evaluator
        returns the encoded clip and the driver stores it with the run
        (:meth:`_record_eval`), wherever the run lives."""
        every = self.config.run.eval_video_every_env_steps
        if not every:
            return {}
        if not final:
            if self._next_video is None or at_steps < self._next_video:
                return {}
            while self._next_video <= at_steps:
                self._next_video += every
        return {
            "video_path": f"{VIDEO_DIR}/eval-{at_steps:09d}.mp4",
            "return_video_bytes": True,
        }

    def _record_eval(self, result: dict[str, Any], at_steps: int) -> None:
        """Append one evaluation to ``eval.jsonl``: env steps when it was
        started, the policy version evaluated, wall time, the summary and the
        clip, if one was recorded (stored under ``videos/``)."""
        line = {
            "env_steps": at_steps,
            "policy_version": result["policy_version"],
            "wall_s": self._wall_s(),
            **result["summary"],
        }
        clip = result.pop("video", None)
        if clip is not None:
            data = clip.pop("data")
            self.storage.write_bytes(clip["path"], data)
            line["video"] = clip["path"]  # relative to the run: portable
            self.log_line(
                f"evaluation clip: {self.storage.path(clip['path'])} ({clip['frames']} frames, "
                f"{len(data) / 1e6:.2f} MB)"
            )
        self.storage.append_line(EVAL_FILE, json.dumps(line))
        self.log_line(
            f"eval at {at_steps} env steps (policy {result['policy_version']}): return "
            f"{line['return_mean']:.1f}, route {line['route_completion_mean'] or 0:.0%}"
        )

    def shutdown(self) -> None:
        """Kill this run's actors (the Ray instance stays up)."""
        for actor in [*getattr(self, "workers", []), *getattr(self, "shards", [])]:
            ray.kill(actor)
        for name in ("learner", "evaluator", "board"):
            if hasattr(self, name):
                ray.kill(getattr(self, name))

    def _write_summary(
        self, status: str, evaluation: dict[str, Any] | None = None, error: str | None = None
    ) -> dict[str, Any]:
        """Write ``summary.json``: ``status`` is ``completed``, ``stopped``
        (a signal; ``--resume`` continues) or ``failed`` (``error`` says why)."""
        wall = self._wall_s()
        metrics = self.learner_stats.get("metrics", {})
        replay = self._replay_totals()
        lag = None
        try:
            lag = ray.get(self.learner.policy_lag_mean.remote(), timeout=30)
        except Exception as exc:  # the learner may be gone after a failure
            log.debug("policy lag unavailable: %r", exc)
        pushed = self.progress.transitions_pushed
        summary = {
            "status": status,
            "error": error,
            "env_steps": self.progress.env_steps,
            "learner_updates": self.progress.learner_updates,
            "episodes": self.progress.episodes,
            "wall_s": wall,
            "env_steps_per_s": self.progress.env_steps / wall if wall else 0.0,
            "updates_per_s": self.progress.learner_updates / wall if wall else 0.0,
            "replay": {
                "size": replay["size"],
                "bytes_per_transition": replay["bytes_per_transition"],
                "compression_ratio": replay["compression_ratio"],
            },
            "encoder_weight_delta": {
                "actor": metrics.get(M.ACTOR_ENCODER_WEIGHT_DELTA, 0.0),
                "critic": metrics.get(M.CRITIC_ENCODER_WEIGHT_DELTA, 0.0),
            },
            "actor_saturation": metrics.get(M.ACTOR_SATURATION),
            "grad_norm": self.learner_stats.get("grad_norm", {}),
            "policy_lag_updates_mean": lag,
            # Where the learner's time goes: seconds it waited for replay
            # batches (the rest of its wall time was updates and publishing).
            "learner_sample_wait_s": self.learner_stats.get("sample_wait_s_total"),
            "worker_restarts": self.progress.worker_restarts,
            "shard_restarts": self.progress.shard_restarts,
            "learner_restarts": self.progress.learner_restarts,
            "learner_updates_lost": self.progress.learner_updates_lost,
            # Sent by the workers, refused by the shards as invalid, stored by
            # the shards (cumulative over snapshot restores); lost: pushed but
            # neither stored nor refused (chunks in flight when a shard died
            # or the run stopped, inserts after a dead shard's last snapshot)
            # plus chunks a worker could never send. A SIGKILLed worker's last
            # call is in neither env_steps nor transitions_pushed (it never
            # reported): its chunks that landed are in transitions_inserted,
            # those in flight and its partial chunk are lost unseen
            # (docs/reliability.md).
            "transitions_pushed": pushed,
            "transitions_rejected": self.progress.transitions_rejected,
            "transitions_inserted": replay["inserted_transitions"],
            "transitions_dropped": self.progress.transitions_dropped,
            "transitions_lost": max(
                0, pushed - self.progress.transitions_rejected - replay["inserted_transitions"]
            )
            + self.progress.transitions_dropped,
            "eval": evaluation or {"episodes": 0},
            "run_dir": self.location,  # absolute path or URI
        }
        # The metrics lines an object store holds are uploaded by run()'s
        # finally, after every summary (a failed upload here would hide the
        # error a failed run is about to raise).
        self.storage.write_text(SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        return summary


SHARD_LINE_KEYS = (
    "size",
    "bytes_held",
    "compression_ratio",
    "inserted_transitions",
    "sampled_transitions",
    "rejected_payloads",
    "evicted_chunks",
    "insert_wait_s_total",
    "sample_wait_s_total",
    "waiting_inserts",
    "restarts",
)
"""The per-shard figures of a ``metrics.jsonl`` line (from the shard's ``stats()``)."""


def _shard_line(stats: dict[str, Any]) -> dict[str, Any]:
    return {key: stats[key] for key in SHARD_LINE_KEYS if key in stats}


def _actor_error(exc: BaseException) -> str:
    """A Ray actor error's cause on one line: the constructor's exception for
    a failed start, Ray's reason (killed, node died, ...) otherwise."""
    message = getattr(exc, "error_msg", None) or str(exc)
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    # A creation-task failure carries the constructor's traceback: its last
    # line is the exception itself.
    if getattr(exc, "actor_init_failed", False) and lines:
        return lines[-1]
    return lines[0] if lines else type(exc).__name__


def closing_lines(summary: dict[str, Any], run_dir: str | Path | RunStorage) -> list[str]:
    """What a finished run tells its user: how far the car got in the final
    evaluation (mean and best route completion, successes, speed, how the
    episodes ended) and how to train further (``--resume`` with a larger budget).

    ``run_dir`` is the run location (resolved to an absolute path or URI as
    :func:`resolve_run_dir` does; a storage is named by its display): every
    command printed works from any directory."""
    if isinstance(run_dir, RunStorage):
        location, local = run_dir.display, run_dir.local_path
    else:
        location = resolve_location(run_dir)
        local = _file_uri_path(location)
    evaluation = summary.get("eval") or {}
    lines = [
        f"done: {summary['env_steps']} env steps, {summary['learner_updates']} updates in "
        f"{summary['wall_s']:.0f} s"
    ]
    episodes = int(evaluation.get("episodes") or 0)
    if episodes and evaluation.get("route_completion_mean") is not None:
        reasons = ", ".join(f"{n} {r}" for r, n in (evaluation.get("end_reasons") or {}).items())
        successes = round(float(evaluation.get("success_rate") or 0.0) * episodes)
        lines.append(
            f"final evaluation ({episodes} episodes): the car drove "
            f"{evaluation['route_completion_mean']:.0%} of the route on average "
            f"(best {evaluation.get('route_completion_max') or 0.0:.0%}), completed it "
            f"{successes}/{episodes} times at {evaluation.get('mean_speed_kmh') or 0.0:.0f} km/h; "
            f"episodes ended: {reasons or 'unknown'}"
        )
    elif episodes:
        lines.append(f"final evaluation: return {evaluation.get('return_mean')}")
    budget = int(summary["env_steps"])
    lines += [
        f"train further: td3drive train --resume {location} --total-env-steps {budget * 4}",
        f"summary: {join_location(location, SUMMARY_FILE)}",
    ]
    if local is not None:  # td3drive report reads a local run directory only
        lines.append(f"plots: td3drive report {local}")
    return lines


def _file_uri_path(location: str) -> Path | None:
    """The local path of an absolute path or a ``file://`` URI, else ``None``."""
    if location.startswith("file://"):
        return RunStorage(location).local_path
    return None if is_uri(location) else Path(location)


def console_logger() -> Callable[[str], None]:
    """Timestamped progress lines on stderr, for runs without a terminal
    (a TTY gets :class:`LiveDisplay` instead)."""

    def emit(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {line}", file=sys.stderr, flush=True)

    return emit


class LiveDisplay:
    """A live progress panel for a terminal (rich): env steps against the
    budget, updates, episodes, recent return and success, steps/s and
    updates/s. Use as a context manager; :meth:`log` prints above the panel."""

    def __init__(self, total_env_steps: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]env steps"),
            BarColumn(bar_width=20),
            TextColumn("{task.completed:>8.0f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total_env_steps, status="starting")

    def __enter__(self) -> LiveDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def log(self, line: str) -> None:
        self.progress.console.log(line)

    def update(self, line: dict[str, Any]) -> None:
        episode = line.get("episode")
        recent = (
            f"return {episode['return_mean']:.1f} success {episode['success_rate']:.0%}"
            if episode
            else "no episode yet"
        )
        status = (
            f"{line['learner_updates']} updates, {line['episodes']} episodes, {recent}, "
            f"{line['env_steps_per_s']:.0f} steps/s, {line['updates_per_s']:.1f} updates/s"
        )
        self.progress.update(self.task, completed=line["env_steps"], status=status)
