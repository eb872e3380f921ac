"""What a run survives (docs/reliability.md): real SIGKILLs of real actor
processes found through Ray's state API, real SIGTERM/SIGINT to a real
``td3drive train`` process, and the resume after it.

Every wait is on a count or an event, with timeouts only a real hang reaches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.util.state import list_actors

from td3drive.app.driver import LEARNER_CHECKPOINT, STATE_FILE, TrainingError, TrainingRun
from td3drive.contracts.config import config_from_dict
from tests.conftest import wait_until
from tests.test_train import free_port, tiny_config

HANG_S = 600.0
"""Only a real hang reaches this."""


@pytest.fixture(scope="module")
def ray_with_state_api() -> Iterator[None]:
    """A local Ray instance with its dashboard: the state API (``ray list
    actors``) is how the tests find the actor processes to kill."""
    # A free dashboard port: another Ray on this machine may hold the default
    # 8265, and the state API would then ask the wrong cluster.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=free_port(),
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def actor_pid(handle: Any) -> int:
    """The process id of a live actor, from Ray's state API."""
    actor_id = handle._actor_id.hex()
    found: list[Any] = []

    def alive() -> bool:
        found[:] = list_actors(
            # This test's cluster, even when other Ray instances run on the machine.
            address=ray.get_runtime_context().gcs_address,
            filters=[("actor_id", "=", actor_id), ("state", "=", "ALIVE")],
        )
        return bool(found) and bool(found[0].pid)

    wait_until(alive, f"actor {actor_id} alive in the state API")
    return int(found[0].pid)


def sigkill(handle: Any) -> int:
    pid = actor_pid(handle)
    os.kill(pid, signal.SIGKILL)
    return pid


class Background:
    """A :class:`TrainingRun` in a thread, its log lines collected."""

    def __init__(self, config: dict[str, Any], run_dir: Path) -> None:
        self.lines: list[str] = []
        self.run = TrainingRun(config_from_dict(config), run_dir, log_line=self.lines.append)
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._target, daemon=True)
        self.thread.start()

    def _target(self) -> None:
        try:
            self.outcome["summary"] = self.run.run()
        except BaseException as exc:  # reported by the test
            self.outcome["error"] = exc

    def summary(self) -> dict[str, Any]:
        self.thread.join(timeout=HANG_S)
        assert not self.thread.is_alive(), "the run hung"
        if "error" in self.outcome:
            raise AssertionError(f"the run failed; log: {self.lines}") from self.outcome["error"]
        return dict(self.outcome["summary"])


def monotone(run_dir: Path, *keys: str) -> None:
    """metrics.jsonl never goes backwards in any of ``keys``."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines
    for key in keys:
        values = [line[key] for line in lines]
        assert values == sorted(values), f"{key} went backwards: {values}"


# ------------------------------------------------------------ actors killed
def test_a_sigkilled_learner_is_rebuilt_from_its_checkpoint(
    ray_with_state_api: None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    every = 20
    background = Background(
        tiny_config(run={"total_env_steps": 1200, "checkpoint_every_updates": every}), run_dir
    )
    run = background.run
    wait_until(
        lambda: (
            run.progress.learner_updates >= 3 * every and (run_dir / LEARNER_CHECKPOINT).exists()
        ),
        "learner updates past a checkpoint",
    )
    sigkill(run.learner)
    summary = background.summary()
    try:
        assert summary["status"] == "completed"
        assert summary["learner_restarts"] == 1
        assert any("the learner died" in line for line in background.lines)
        # Lost: at most what the dead learner did since its last checkpoint
        # (the driver checkpoints after the call that crosses the cadence).
        per_call = run.config.run.learner_updates_per_call
        assert 0 <= summary["learner_updates_lost"] <= every + per_call
        monotone(run_dir, "env_steps", "learner_updates", "episodes")
        # The rebuilt learner (generation 1) published, and its weights are
        # what the workers and the board hold now.
        assert ray.get(run.board.generation.remote(), timeout=60) == 1
        version = ray.get(run.board.version.remote(), timeout=60)
        assert version == ray.get(run.learner.updates.remote(), timeout=60)
        for worker in run.workers:
            assert ray.get(worker.policy_generation.remote(), timeout=60) == 1
        assert summary["eval"]["episodes"] == run.config.run.eval_episodes  # no OwnerDiedError
    finally:
        run.shutdown()


def test_a_sigkilled_worker_is_counted_once_and_its_losses_reported(
    ray_with_state_api: None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    background = Background(tiny_config(run={"total_env_steps": 800}), run_dir)
    run = background.run
    wait_until(lambda: run.progress.env_steps >= 128, "env steps collected")
    sigkill(run.workers[0])
    summary = background.summary()
    try:
        assert summary["status"] == "completed"
        assert summary["worker_restarts"] == 1  # once per restart, not per failed retry
        assert sum("rollout worker 0 died" in line for line in background.lines) == 1
        assert summary["transitions_rejected"] == summary["transitions_dropped"] == 0
        # The killed incarnation's last call never reported: its chunks that
        # landed are inserted but not counted as pushed, those in flight are
        # lost unseen. The gap is at most that one call's steps.
        gap = summary["transitions_inserted"] - summary["transitions_pushed"]
        assert abs(gap) <= run.config.run.worker_steps_per_call
        assert summary["transitions_lost"] == max(0, -gap)
        monotone(run_dir, "env_steps", "learner_updates", "episodes")
    finally:
        run.shutdown()


def test_a_sigkilled_shard_is_counted_and_its_losses_reported(
    ray_with_state_api: None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    background = Background(tiny_config(run={"total_env_steps": 1000}), run_dir)
    run = background.run
    snapshot = run_dir / "checkpoints/replay/shard-0"
    wait_until(
        lambda: run.progress.learner_updates >= 25 and any(snapshot.glob("*.done")),
        "a shard snapshot",
    )
    sigkill(run.shards[0])
    summary = background.summary()
    try:
        assert summary["status"] == "completed"
        assert summary["shard_restarts"] == 1
        assert any("replay shard 0 was restarted" in line for line in background.lines)
        # What the shard held after its snapshot is gone, and reported.
        assert summary["transitions_lost"] == (
            summary["transitions_pushed"] - summary["transitions_inserted"]
        )
        assert summary["transitions_lost"] >= 0
    finally:
        run.shutdown()


# ------------------------------------------------------------ stops and resume
def _train(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "td3drive", "train", *args],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),  # a pipe nobody reads could fill up
        env={**os.environ, "RAY_ADDRESS": ""},
    )


def _metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stop(process: subprocess.Popen[bytes], signum: int, run_dir: Path, after: int) -> int:
    """Send ``signum`` once the run reports more than ``after`` env steps and
    learner updates; returns the exit code."""
    wait_until(
        lambda: (
            process.poll() is not None
            or any(
                line["env_steps"] > after and line["learner_updates"] > 0
                for line in _metrics_lines(run_dir)
            )
        ),
        "training progress",
    )
    assert process.poll() is None, "the run ended before the signal"
    process.send_signal(signum)
    return process.wait(timeout=HANG_S)


def test_sigint_and_sigterm_save_the_run_and_resume_continues_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(run={"total_env_steps": 1_000_000})))

    first = _train(["--config", str(config), "--run-dir", str(run_dir)], tmp_path / "1.log")
    assert _stop(first, signal.SIGINT, run_dir, after=0) == 128 + signal.SIGINT
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "stopped", (tmp_path / "1.log").read_text()
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert state["env_steps"] == stopped["env_steps"] > 0
    assert state["learner_updates"] == stopped["learner_updates"] > 0
    assert (run_dir / LEARNER_CHECKPOINT).exists()

    second = _train(["--resume", str(run_dir)], tmp_path / "2.log")
    code = _stop(second, signal.SIGTERM, run_dir, after=stopped["env_steps"])
    assert code == 128 + signal.SIGTERM, (tmp_path / "2.log").read_text()
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["status"] == "stopped"
    assert again["env_steps"] > stopped["env_steps"]
    assert again["learner_updates"] > stopped["learner_updates"]

    budget = again["env_steps"] + 200
    third = _train(["--resume", str(run_dir), "--total-env-steps", str(budget)], tmp_path / "3.log")
    assert third.wait(timeout=HANG_S) == 0, (tmp_path / "3.log").read_text()
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "completed" and done["env_steps"] >= budget
    monotone(run_dir, "env_steps", "learner_updates", "episodes", "time_s")


# ------------------------------------------------------------ bad setups, fast
def test_an_environment_with_the_wrong_spaces_stops_the_run_at_once(
    ray_with_state_api: None, tmp_path: Path
) -> None:
    # CartPole builds everywhere and has the wrong spaces (CarRacing needs Box2D).
    config = config_from_dict(tiny_config(rollout={"env_id": "CartPole-v1"}))
    run = TrainingRun(config, tmp_path / "run", log_line=lambda _: None)
    with pytest.raises(TrainingError, match=r"CartPole-v1.*observation space"):
        run.run()
    assert not hasattr(run, "workers")  # checked before any worker started


def test_an_actor_whose_constructor_raises_stops_the_run_with_its_error(
    ray_with_state_api: None, tmp_path: Path
) -> None:
    """A learner that cannot load the run's checkpoint (another architecture)
    fails once, with its message, instead of being retried forever."""
    run_dir = tmp_path / "run"
    first = Background(tiny_config(run={"total_env_steps": 64, "eval_episodes": 0}), run_dir)
    first.summary()
    first.run.shutdown()
    changed = config_from_dict(tiny_config(learner={"features_dim": 48}))
    run = TrainingRun(changed, run_dir, resume=True, log_line=lambda _: None)
    try:
        with pytest.raises(TrainingError, match=r"learner could not start.*features_dim"):
            run.run()
    finally:
        run.shutdown()


def test_a_run_larger_than_the_cluster_says_what_is_short(
    ray_with_state_api: None, tmp_path: Path
) -> None:
    config = config_from_dict(tiny_config(rollout={"num_workers": 8}, run={"worker_num_cpus": 1.0}))
    run = TrainingRun(config, tmp_path / "run", log_line=lambda _: None)
    with pytest.raises(TrainingError, match=r"8.5 CPUs .* the Ray cluster has 2"):
        run.run()
    assert not hasattr(run, "workers")  # nothing was started


def test_a_sigkilled_driver_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    """Nothing can be saved when the driver itself is killed: ``--resume``
    continues from the last checkpoint, and the lines written after it leave
    ``metrics.jsonl`` so the curves never go backwards."""
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_config(run={"total_env_steps": 1_000_000, "checkpoint_every_updates": 20})
        )
    )
    driver = _train(["--config", str(config), "--run-dir", str(run_dir)], tmp_path / "1.log")
    state_path = run_dir / STATE_FILE

    def checkpointed_with_updates() -> bool:
        assert driver.poll() is None, (tmp_path / "1.log").read_text()
        return state_path.exists() and json.loads(state_path.read_text())["learner_updates"] > 0

    wait_until(checkpointed_with_updates, "a checkpoint after some updates")
    saved_before = json.loads(state_path.read_text())["env_steps"]
    wait_until(
        lambda: any(line["env_steps"] > saved_before for line in _metrics_lines(run_dir)),
        "progress after the checkpoint",
    )
    driver.kill()  # SIGKILL: no handler runs
    assert driver.wait(timeout=HANG_S) == -signal.SIGKILL
    saved = json.loads(state_path.read_text())
    assert not (run_dir / "summary.json").exists()
    after_checkpoint = any(
        line["env_steps"] > saved["env_steps"] for line in _metrics_lines(run_dir)
    )

    budget = saved["env_steps"] + 200
    resumed = _train(
        ["--resume", str(run_dir), "--total-env-steps", str(budget)], tmp_path / "2.log"
    )
    assert resumed.wait(timeout=HANG_S) == 0, (tmp_path / "2.log").read_text()
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "completed" and done["env_steps"] >= budget
    if after_checkpoint:  # (a checkpoint may have landed just before the kill)
        assert "dropped" in (tmp_path / "2.log").read_text()
    monotone(run_dir, "env_steps", "learner_updates", "episodes", "time_s")
