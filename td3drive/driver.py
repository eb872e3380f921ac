"""``td3drive train``: build the services from a config, run to the budget.

The driver connects to the Ray cluster it runs in (``ray job submit`` sets
``RAY_ADDRESS``) or starts a local Ray instance, then starts

* ``replay.num_shards`` replay shards (threaded actors, snapshots under
  ``checkpoints/replay/shard-<i>``, restarted by Ray from their last snapshot),
* a weights board, the learner (GPU when ``run.learner_num_gpus > 0``),
* ``rollout.num_workers`` rollout workers (restarted by Ray when they die),
* one evaluation worker.

It keeps one ``run`` call in flight per worker and one ``train`` call on the
learner, reacting to whichever finishes first; the replay shards' rate
limiter paces both sides. Every ``run.report_interval_s`` it writes a line to
``metrics.jsonl`` and updates the Prometheus endpoint; every
``run.checkpoint_every_updates`` learner updates it checkpoints the learner
and snapshots the shards. At the env-step budget it stops the learner,
flushes the workers, writes a final checkpoint, evaluates the deterministic
policy and writes ``summary.json``.

Failures: a worker or shard that dies is restarted by Ray and its call is
retried; a learner that dies is rebuilt from its last checkpoint; a NaN/inf
loss stops the run with the learner's diagnosis, keeping the last good
checkpoint (nothing is saved after the bad update).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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

from td3drive import metric_names as M
from td3drive.config import ConfigError, TD3DriveConfig, config_from_dict
from td3drive.prometheus import RunMetrics, serve

log = logging.getLogger("td3drive.train")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.jsonl"
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


@dataclass
class Progress:
    """Counters that survive a resume (``checkpoints/driver.json``)."""

    env_steps: int = 0
    episodes: int = 0
    learner_updates: int = 0
    worker_restarts: int = 0
    learner_restarts: int = 0
    wall_s: float = 0.0
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))

    def state(self) -> dict[str, Any]:
        return {
            "env_steps": self.env_steps,
            "episodes": self.episodes,
            "learner_updates": self.learner_updates,
            "worker_restarts": self.worker_restarts,
            "learner_restarts": self.learner_restarts,
            "wall_s": self.wall_s,
        }


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    """``run_dir``, or ``runs/<UTC timestamp>`` when ``None``."""
    if run_dir is not None:
        return Path(run_dir)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def load_run_config(run_dir: Path) -> TD3DriveConfig:
    """The resolved config a run directory was started with.

    Raises:
        ConfigError: no ``config.yaml`` there, or it does not validate.
    """
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a td3drive run directory (no {CONFIG_FILE})")
    return config_from_dict(yaml.safe_load(path.read_text()), source=str(path))


class TrainingRun:
    """One training run in ``run_dir``.

    Args:
        config: the resolved configuration (written to ``config.yaml``).
        run_dir: the run directory; created if missing.
        resume: continue from ``checkpoints/`` (counters, learner, replay).
        log_line: where progress lines go (a TTY display or a logger).
        on_report: called with each metrics line instead of logging it (a
            live display).
    """

    def __init__(
        self,
        config: TD3DriveConfig,
        run_dir: Path,
        resume: bool = False,
        log_line: Callable[[str], None] | None = None,
        on_report: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.log_line = log_line or log.info
        self.on_report = on_report
        self.progress = Progress(recent=deque(maxlen=config.run.recent_episodes))
        self.metrics = RunMetrics()
        self.learner_stats: dict[str, Any] = {}
        self.worker_rates: dict[int, float] = {}
        self.shard_stats: list[dict[str, Any]] = []
        self._server: Any = None
        self._start = time.monotonic()
        self._last_checkpoint_updates = 0
        self._env_restarts_by_worker: dict[int, int] = {}
        self._next_eval = config.run.eval_every_env_steps or None

    # ------------------------------------------------------------ setup
    def _prepare_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        config_text = yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False)
        (self.run_dir / CONFIG_FILE).write_text(config_text)
        state_path = self.run_dir / STATE_FILE
        if self.resume and state_path.exists():
            state = json.loads(state_path.read_text())
            for key, value in state.items():
                if key in Progress.__dataclass_fields__ and key != "recent":
                    setattr(self.progress, key, value)
            self._last_checkpoint_updates = self.progress.learner_updates

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
            self.log_line(f"connected to the Ray cluster at {os.environ['RAY_ADDRESS']}")
        else:
            run = self.config.run
            needed = (
                self.config.rollout.num_workers * run.worker_num_cpus
                + self.config.replay.num_shards * run.shard_num_cpus
                + run.learner_num_cpus
                + 1
            )
            cpus = max(os.cpu_count() or 1, int(np.ceil(needed)))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            self.log_line(f"started a local Ray instance ({cpus} logical CPUs)")
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if self.config.run.learner_num_gpus > gpus:
            raise TrainingError(
                f"run.learner_num_gpus={self.config.run.learner_num_gpus} but the Ray cluster "
                f"has {gpus:g} GPU(s)"
            )

    def _start_services(self) -> None:
        from buffer_service.ray_actor import remote_shard_class
        from learner.ray_actor import remote_learner_actor_class
        from rollout_workers.ray_actor import (
            remote_evaluator_class,
            remote_weights_board_class,
            remote_worker_class,
        )

        cfg, run = self.config, self.config.run
        shard_class = remote_shard_class(num_cpus=run.shard_num_cpus)
        self.shards = [
            shard_class.options(**_OUTSIDE_ANY_PLACEMENT_GROUP).remote(
                cfg.replay,
                cfg.learner.batch_size,
                index,
                str(self.run_dir / REPLAY_SNAPSHOTS / f"shard-{index}"),
                cfg.learner.seed,
            )
            for index in range(cfg.replay.num_shards)
        ]
        self.board = remote_weights_board_class().options(**_OUTSIDE_ANY_PLACEMENT_GROUP).remote()
        self._learner_class = remote_learner_actor_class(
            num_gpus=run.learner_num_gpus, num_cpus=run.learner_num_cpus
        )
        self.learner = self._new_learner()
        worker_class = remote_worker_class(num_cpus=run.worker_num_cpus)
        self.workers = [
            worker_class.options(**_OUTSIDE_ANY_PLACEMENT_GROUP).remote(
                cfg, self.shards, self.board, index
            )
            for index in range(cfg.rollout.num_workers)
        ]
        self.evaluator = (
            remote_evaluator_class(num_cpus=0)
            .options(**_OUTSIDE_ANY_PLACEMENT_GROUP)
            .remote(cfg, self.board)
        )
        device = ray.get(self.learner.device.remote())
        restored = [s for s in ray.get([s.stats.remote() for s in self.shards]) if s["size"]]
        self.log_line(
            f"{len(self.workers)} rollout workers, {len(self.shards)} replay shards"
            f"{f' ({len(restored)} restored from snapshots)' if restored else ''}, "
            f"learner on {device}"
        )

    def _new_learner(self) -> Any:
        checkpoint = self.run_dir / LEARNER_CHECKPOINT
        return self._learner_class.options(**_OUTSIDE_ANY_PLACEMENT_GROUP).remote(
            self.config,
            self.shards,
            self.board,
            str(checkpoint) if (self.resume or self.progress.learner_restarts) else None,
        )

    # ------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        """Run to the env-step budget; returns the summary.

        Raises:
            TrainingError: a NaN/inf loss or another unrecoverable failure;
                the last good checkpoint is kept.
        """
        self._prepare_dir()
        self._start_ray()
        self._start_services()
        if not (self.run_dir / LEARNER_CHECKPOINT).exists():
            self._checkpoint()  # a good checkpoint exists from the start
        port = self.config.run.metrics_port
        if port is not None:
            self._server = serve(self.metrics, port)
            self.log_line(f"Prometheus metrics on :{self._server.server_port}/metrics")
        try:
            self._loop()
            return self._finish()
        finally:
            if self._server is not None:
                self._server.shutdown()

    @property
    def metrics_port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def _loop(self) -> None:
        """Phases: collect (workers and learner busy) until the budget; then
        drain (no new worker calls, the learner keeps sampling so blocked
        inserts land); then flush the workers' partial chunks; then stop the
        learner."""
        cfg = self.config.run
        budget = cfg.total_env_steps
        pending: dict[Any, tuple[str, int]] = {}

        def submit(kind: str, index: int = 0) -> None:
            if kind == "worker":
                ref = self.workers[index].run.remote(cfg.worker_steps_per_call)
            elif kind == "flush":
                ref = self.workers[index].flush.remote()
            elif kind == "eval":
                ref = self.evaluator.evaluate.remote(cfg.eval_episodes)
            else:
                ref = self.learner.train.remote(cfg.learner_updates_per_call)
            pending[ref] = (kind, index)

        for index in range(len(self.workers)):
            submit("worker", index)
        submit("learner")
        phase = "collect"
        next_report = time.monotonic() + cfg.report_interval_s
        while pending:
            timeout = max(0.0, next_report - time.monotonic())
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
                    self._record_eval(ray.get(ref), at_steps=index)
                else:
                    self._collect_learner(ref)
                    if phase != "stop":
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
            ray.get(ref)
        except (RayActorError, RayTaskError) as exc:
            self.log_line(f"rollout worker {index} could not flush its last chunk: {exc!r}")

    def _collect_worker(self, ref: Any, index: int) -> None:
        try:
            stats = ray.get(ref)
        except RayActorError as exc:
            self.progress.worker_restarts += 1
            self.log_line(f"rollout worker {index} died ({type(exc).__name__}); Ray restarts it")
            time.sleep(1.0)
            return
        except RayTaskError as exc:
            self.log_line(f"rollout worker {index} call failed, retrying: {exc.cause!r}")
            time.sleep(1.0)
            return
        self.progress.env_steps += int(stats["steps"])
        self.worker_rates[index] = float(stats["steps_per_s"])
        for episode in stats["episodes"]:
            self.progress.episodes += 1
            self.progress.recent.append(episode)
        self._env_restarts_by_worker[index] = int(stats.get("env_restarts", 0))

    def _collect_learner(self, ref: Any) -> None:
        from learner.td3 import NonFiniteLossError

        try:
            stats = ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, NonFiniteLossError):
                self.metrics.set_gauge("td3drive_learner_non_finite_loss", 1.0)
                self._write_summary(status=f"failed: {exc.cause}")
                raise TrainingError(
                    f"stopped: {exc.cause} The last good checkpoint is "
                    f"{self.run_dir / LEARNER_CHECKPOINT} (update "
                    f"{self._last_checkpoint_updates})."
                ) from exc.cause
            raise TrainingError(f"the learner failed: {exc.cause!r}") from exc
        except RayActorError as exc:
            self.progress.learner_restarts += 1
            self.log_line(
                f"the learner died ({type(exc).__name__}); rebuilding it from "
                f"{self.run_dir / LEARNER_CHECKPOINT}"
            )
            self.learner = self._new_learner()
            return
        self.learner_stats = stats
        self.progress.learner_updates = int(stats["updates"])
        self.metrics.update_learner(stats["metrics"])
        if (
            self.progress.learner_updates - self._last_checkpoint_updates
            >= self.config.run.checkpoint_every_updates
        ):
            self._checkpoint()

    def _checkpoint(self) -> None:
        ray.get(self.learner.save_checkpoint.remote(str(self.run_dir / LEARNER_CHECKPOINT)))
        for index, ref in enumerate([shard.save.remote() for shard in self.shards]):
            try:
                ray.get(ref)
            except RayActorError as exc:  # restarting; it keeps its previous snapshot
                self.log_line(f"replay shard {index} unavailable, snapshot skipped ({exc!r})")
        self._last_checkpoint_updates = self.progress.learner_updates
        state = self.progress.state()
        state["wall_s"] = self._wall_s()
        (self.run_dir / STATE_FILE).write_text(json.dumps(state))

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
        size = sum(s["size"] for s in self.shard_stats)
        held = sum(s["bytes_held"] for s in self.shard_stats)
        raw = sum(s["compression_ratio"] * s["bytes_held"] for s in self.shard_stats)
        return {
            "size": size,
            "bytes": held,
            "bytes_per_transition": held / size if size else 0.0,
            "compression_ratio": raw / held if held else 0.0,
        }

    def _report(self) -> dict[str, Any]:
        wall = self._wall_s()
        replay = self._replay_totals()
        episode = self._recent_episodes()
        line = {
            "time_s": wall,
            "env_steps": self.progress.env_steps,
            "learner_updates": self.progress.learner_updates,
            "episodes": self.progress.episodes,
            "env_steps_per_s": self.progress.env_steps / wall if wall else 0.0,
            "updates_per_s": self.progress.learner_updates / wall if wall else 0.0,
            "episode": episode,
            "learner": self.learner_stats.get("metrics") or None,
            "replay": replay,
            "policy_lag_updates_mean": self.learner_stats.get("policy_lag_updates_mean"),
        }
        with (self.run_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(line) + "\n")
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
        self._checkpoint()
        self._report()
        evaluation: dict[str, Any] = {"episodes": 0}
        if self.config.run.eval_episodes:
            self.log_line(f"evaluating the policy on {self.config.run.eval_episodes} episodes")
            result = ray.get(self.evaluator.evaluate.remote(self.config.run.eval_episodes))
            self._record_eval(result, at_steps=self.progress.env_steps)
            evaluation = result["summary"]
            with (self.run_dir / "eval.json").open("w") as handle:
                json.dump(result, handle, indent=2, default=float)
        return self._write_summary(status="completed", evaluation=evaluation)

    def _record_eval(self, result: dict[str, Any], at_steps: int) -> None:
        """Append one evaluation to ``eval.jsonl``: env steps when it was
        started, the policy version evaluated, wall time and the summary."""
        line = {
            "env_steps": at_steps,
            "policy_version": result["policy_version"],
            "wall_s": self._wall_s(),
            **result["summary"],
        }
        with (self.run_dir / EVAL_FILE).open("a") as handle:
            handle.write(json.dumps(line) + "\n")
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
        self, status: str, evaluation: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        wall = self._wall_s()
        metrics = self.learner_stats.get("metrics", {})
        replay = self._replay_totals()
        lag = None
        try:
            lag = ray.get(self.learner.policy_lag_mean.remote(), timeout=30)
        except Exception as exc:  # the learner may be gone after a failure
            log.debug("policy lag unavailable: %r", exc)
        summary = {
            "status": status,
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
            "learner_restarts": self.progress.learner_restarts,
            "eval": evaluation or {"episodes": 0},
            "run_dir": str(self.run_dir),
        }
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def closing_lines(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """What a finished run tells its user: how far the car got in the final
    evaluation (mean and best route completion, successes, speed, how the
    episodes ended) and how to train further (``--resume`` with a larger budget)."""
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
        f"train further: td3drive train --resume {run_dir} --total-env-steps {budget * 4}",
        f"summary: {run_dir / SUMMARY_FILE}",
        f"plots: td3drive report {run_dir}",
    ]
    return lines


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
