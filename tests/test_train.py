"""``td3drive train`` end to end: the run directory contract, Prometheus,
and faults (a worker or shard killed, resume, a NaN loss)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
import yaml

from learner.td3 import TD3Learner, load_checkpoint
from td3drive.app.driver import LEARNER_CHECKPOINT, TrainingError, TrainingRun
from td3drive.contracts.config import TD3DriveConfig, config_from_dict
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """A run that fits 2 cores: small networks, 2 workers, 2 shards."""
    raw: dict[str, Any] = {
        "learner": {
            "device": "cpu",
            "batch_size": 16,
            "features_dim": 32,
            "actor_hidden": [32],
            "critic_hidden": [32],
            "random_shift_pad": 0,
        },
        "replay": {
            "num_shards": 2,
            "chunk_steps": 32,
            "min_size_to_sample": 64,
            "replay_ratio": 8.0,
            "capacity_transitions": 20_000,
            "rate_limit_timeout_s": 120,
        },
        "rollout": {"num_workers": 2, "warmup_steps": 50, "weights_poll_steps": 32},
        "run": {
            "total_env_steps": 400,
            "worker_num_cpus": 0.25,
            "shard_num_cpus": 0.0,
            "learner_num_cpus": 0.5,
            "worker_steps_per_call": 32,
            "learner_updates_per_call": 5,
            "publish_every_updates": 5,
            "checkpoint_every_updates": 20,
            "eval_episodes": 1,
            "report_interval_s": 1.0,
            "metrics_port": None,
        },
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------ the CLI, end to end
def test_train_cli_writes_the_run_directory(tmp_path: Path) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config()))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "td3drive",
            "train",
            "--config",
            str(config_path),
            "--run-dir",
            str(run_dir),
            "--set",
            "run.total_env_steps=300",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "summary:" in result.stderr and str(run_dir) in result.stderr

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["run"]["total_env_steps"] == 300  # --set reached the config
    assert config_from_dict(resolved).learner.features_dim == 32

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["env_steps"] >= 300
    # Per-actor figures, as Prometheus has them, and current rates: a line's
    # rate is its interval's steps over its interval's seconds.
    assert set(lines[-1]["workers"]) == {"0", "1"} and set(lines[-1]["shards"]) == {"0", "1"}
    assert all(w["env_steps_per_s"] > 0 for w in lines[-1]["workers"].values())
    assert sum(s["inserted_transitions"] for s in lines[-1]["shards"].values()) > 0
    for before, line in itertools.pairwise(lines):
        interval = line["time_s"] - before["time_s"]
        expected = (line["env_steps"] - before["env_steps"]) / interval
        assert line["env_steps_per_s"] == pytest.approx(expected, rel=1e-6)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["env_steps"] >= 300 and summary["learner_updates"] > 0
    for key in (
        "wall_s",
        "env_steps_per_s",
        "updates_per_s",
        "episodes",
        "policy_lag_updates_mean",
    ):
        assert summary[key] is not None, key
    assert summary["replay"]["size"] == summary["env_steps"]  # every step landed
    assert 0 < summary["replay"]["bytes_per_transition"] < 10_000
    assert summary["encoder_weight_delta"]["actor"] > 0
    assert summary["encoder_weight_delta"]["critic"] > 0
    grads = summary["grad_norm"]
    max_norm = resolved["learner"]["critic_max_grad_norm"]
    assert grads["critic_postclip_max"] <= max_norm * (1 + 1e-5)
    assert grads["actor_postclip_max"] <= resolved["learner"]["actor_max_grad_norm"] * (1 + 1e-5)
    evaluation = summary["eval"]
    assert evaluation["episodes"] == 1
    for key in (
        "return_mean",
        "success_rate",
        "route_completion_mean",
        "mean_speed_kmh",
        "collision_rate",
    ):
        assert evaluation[key] is not None, key

    checkpoint = load_checkpoint(run_dir / LEARNER_CHECKPOINT)
    assert checkpoint["updates"] == summary["learner_updates"]
    for shard in range(2):
        names = {p.suffix for p in (run_dir / "checkpoints/replay" / f"shard-{shard}").iterdir()}
        assert names == {".td3r", ".done"}

    report = subprocess.run(
        [sys.executable, "-m", "td3drive", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert (run_dir / "report" / "rollout.png").exists()

    evaluate = subprocess.run(
        [
            sys.executable,
            "-m",
            "td3drive",
            "evaluate",
            "--checkpoint",
            str(run_dir / LEARNER_CHECKPOINT),
            "--episodes",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert evaluate.returncode == 0, evaluate.stderr
    assert json.loads(evaluate.stdout)["summary"]["episodes"] == 1


def test_impossible_config_fails_before_any_actor_starts(tmp_path: Path) -> None:
    config_path = tmp_path / "bad.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(learner={"batch_size": 128})))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "td3drive",
            "train",
            "--config",
            str(config_path),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "min_size_to_sample" in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------ Prometheus
def _query(prometheus: str, expression: str) -> float | None:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    results = body["data"]["result"]
    return float(results[0]["value"][1]) if results else None


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide the Debian prometheus package (.ci/run installs it)")
        pytest.skip("the prometheus server is not installed (apt-get install prometheus)")
    return binary


def _start_prometheus(
    tmp_path: Path, metrics_port: int, rule_files: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A real Prometheus scraping ``127.0.0.1:metrics_port`` every second as
    job ``td3drive`` (and evaluating ``rule_files`` every second); returns the
    process and its base URL."""
    binary = _prometheus_binary()
    web_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": rule_files or [],
                "scrape_configs": [
                    {
                        "job_name": "td3drive",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, f"http://127.0.0.1:{web_port}"


def _train_process(tmp_path: Path, config: dict[str, Any]) -> subprocess.Popen[bytes]:
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    train_log = (tmp_path / "train.log").open("w")  # a pipe nobody reads could fill up
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "td3drive",
            "train",
            "--config",
            str(config_path),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=train_log,
    )


def test_prometheus_scrapes_the_training_endpoint(tmp_path: Path) -> None:
    _prometheus_binary()
    metrics_port = free_port()
    train = _train_process(
        tmp_path,
        tiny_config(
            run={"metrics_port": metrics_port, "total_env_steps": 1500, "metrics_linger_s": 0}
        ),
    )
    server, prometheus = _start_prometheus(tmp_path, metrics_port)
    try:
        steps = updates = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and train.poll() is None:
            time.sleep(2)
            try:
                steps = _query(prometheus, "td3drive_env_steps_total")
                updates = _query(prometheus, "td3drive_learner_updates_total")
            except OSError:
                continue  # Prometheus still starting
            if steps and updates:
                break
        assert steps and steps > 0, "Prometheus never saw td3drive_env_steps_total > 0"
        assert updates and updates > 0, "Prometheus never saw td3drive_learner_updates_total > 0"
        assert _query(prometheus, 'up{job="td3drive"}') == 1.0
        assert _query(prometheus, 'td3drive_run_status{status="running",run_id="run"}') == 1.0
        # The learner's diagnostics reach Prometheus too (set with the update count).
        saturation = _query(prometheus, "td3drive_learner_actor_saturation_ratio")
        assert saturation is not None and 0.0 <= saturation <= 1.0
    finally:
        server.terminate()
        train.terminate()
        server.wait(timeout=30)
        train.wait(timeout=60)


def test_prometheus_sees_the_nan_gauge_of_a_nan_run(tmp_path: Path) -> None:
    """The run stops on a NaN loss; its endpoint lingers with the NaN gauge
    and ``status="failed"`` until Prometheus has scraped them."""
    _prometheus_binary()
    metrics_port = free_port()
    server, prometheus = _start_prometheus(tmp_path, metrics_port)
    train = _train_process(
        tmp_path,
        tiny_config(
            learner={
                "actor_lr": 1e30,
                "critic_lr": 1e30,
                "critic_max_grad_norm": None,
                "actor_max_grad_norm": None,
            },
            run={
                "metrics_port": metrics_port,
                "metrics_linger_s": 600,  # ended below once Prometheus has seen it
                "total_env_steps": 50_000,
                "checkpoint_every_updates": 1000,
            },
        ),
    )
    try:
        nan = failed = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and train.poll() is None:
            time.sleep(1)
            try:
                nan = _query(prometheus, 'td3drive_learner_non_finite_loss{run_id="run"}')
                failed = _query(prometheus, 'td3drive_run_status{status="failed",run_id="run"}')
            except OSError:
                continue  # Prometheus still starting
            if nan == 1.0 and failed == 1.0:
                break
        log = (tmp_path / "train.log").read_text()
        assert nan == 1.0 and failed == 1.0, f"Prometheus saw nan={nan} failed={failed}; {log}"
        assert train.poll() is None  # still lingering: Prometheus saw it before the end
        assert "non-finite" in log
    finally:
        server.terminate()
        train.terminate()  # ends the linger
        server.wait(timeout=30)
        code = train.wait(timeout=120)
    assert code != 0


# ------------------------------------------------------------ faults (in-process)
@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run_in_thread(run: TrainingRun) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run.run()
        except BaseException as exc:  # reported by the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_a_killed_worker_is_restarted_and_the_run_finishes(
    ray_instance: None, tmp_path: Path
) -> None:
    config = config_from_dict(tiny_config(run={"total_env_steps": 600}))
    run = TrainingRun(config, tmp_path / "run", log_line=lambda _: None)
    thread, outcome = run_in_thread(run)
    wait_until(lambda: run.progress.env_steps >= 64, "64 env steps", poll_s=0.5)
    ray.kill(run.workers[0], no_restart=False)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["status"] == "completed" and summary["env_steps"] >= 600
    assert summary["worker_restarts"] >= 1


def test_a_killed_shard_comes_back_from_its_snapshot(ray_instance: None, tmp_path: Path) -> None:
    config = config_from_dict(tiny_config(run={"total_env_steps": 800}))
    run = TrainingRun(config, tmp_path / "run", log_line=lambda _: None)
    thread, outcome = run_in_thread(run)
    snapshot_dir = tmp_path / "run" / "checkpoints/replay/shard-0"
    wait_until(
        lambda: run.progress.learner_updates >= 25 and any(snapshot_dir.glob("*.done")),
        "25 updates and a replay snapshot",
        poll_s=0.5,
    )
    ray.kill(run.shards[0], no_restart=False)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["status"] == "completed"
    stats = ray.get(run.shards[0].stats.remote())
    assert stats["restored_from"] is not None  # the restarted shard loaded its snapshot
    assert stats["size"] > 0


def test_resume_continues_counters_and_weights(ray_instance: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = TrainingRun(
        config_from_dict(tiny_config(run={"total_env_steps": 300})),
        run_dir,
        log_line=lambda _: None,
    ).run()
    saved = TD3Learner.from_checkpoint(run_dir / LEARNER_CHECKPOINT)
    probe = {
        "image": torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8),
        "vector": torch.randn(1, 23),
    }
    with torch.no_grad():
        before = saved.actor(probe["image"], probe["vector"]).numpy()

    resumed = TrainingRun(
        config_from_dict(tiny_config(run={"total_env_steps": 600})),
        run_dir,
        resume=True,
        log_line=lambda _: None,
    )
    resumed._prepare_dir()
    assert resumed.progress.env_steps == first["env_steps"]  # counters came back
    resumed._start_ray()
    resumed._start_services()
    version, weights = ray.get(resumed.learner.policy_weights.remote())
    assert version == first["learner_updates"]
    policy = saved.actor
    policy.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        np.testing.assert_array_equal(policy(probe["image"], probe["vector"]).numpy(), before)
    resumed._loop()
    second = resumed._finish()
    assert second["env_steps"] >= 600 > first["env_steps"]
    assert second["learner_updates"] > first["learner_updates"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    ray_instance: None, tmp_path: Path
) -> None:
    # A learning rate no network survives: Q values overflow within a few updates.
    config = config_from_dict(
        tiny_config(
            learner={
                "actor_lr": 1e30,
                "critic_lr": 1e30,
                "critic_max_grad_norm": None,
                "actor_max_grad_norm": None,
            },
            run={"total_env_steps": 5000, "checkpoint_every_updates": 1000},
        )
    )
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite") as error:
        TrainingRun(config, run_dir, log_line=lambda _: None).run()
    assert "last good checkpoint" in str(error.value)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("non-finite")
    kept = TD3Learner.from_checkpoint(run_dir / LEARNER_CHECKPOINT)
    assert kept.updates == 0  # saved before the divergence, never after it
    assert all(torch.isfinite(p).all() for p in kept.actor.parameters())


def test_config_type_is_the_resolved_model() -> None:
    assert isinstance(config_from_dict(tiny_config()), TD3DriveConfig)


# ------------------------------------------------------------ evidence commands
def test_bench_learning_and_sweep_on_a_tiny_budget(tmp_path: Path) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(run={"total_env_steps": 200})))
    learning = subprocess.run(
        [
            sys.executable,
            "-m",
            "td3drive",
            "bench",
            "learning",
            "--config",
            str(config_path),
            "--env-steps",
            "200",
            "--seeds",
            "1",
            "--variants",
            "frozen,shared",
            "--eval-every",
            "100",
            "--eval-episodes",
            "1",
            "--out",
            str(tmp_path / "learning"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert learning.returncode == 0, learning.stderr[-3000:]
    report = json.loads((tmp_path / "learning" / "learning.json").read_text())
    assert set(report["variants"]) == {"frozen", "shared"}
    frozen, shared = report["variants"]["frozen"], report["variants"]["shared"]
    assert len(frozen["curve"]) >= 2  # periodic evaluations plus the final one
    assert frozen["runs"][0]["encoder_weight_delta"]["critic"] == 0.0
    assert shared["runs"][0]["encoder_weight_delta"]["critic"] > 0.0
    assert (tmp_path / "learning" / "learning.png").stat().st_size > 10_000
    assert report["complete"] is True
    saturation = shared["runs"][0]["actor_saturation"]
    assert saturation is not None and 0.0 <= saturation <= 1.0
    assert report["eval_episodes"] == 1 and frozen["runs"][0]["eval_seeds"] == [10_000_000]
    assert set(frozen["time_to_threshold"]) == {"0.5", "0.8"}
    assert report["machine"]["torch_threads"] >= 1 and report["base_config_sha256"]
    table = (tmp_path / "learning" / "learning.md").read_text()
    assert "| frozen |" in table and "| shared |" in table
    assert "- commit: " in table and "BELOW THE STANDARD" in table

    sweep = subprocess.run(
        [
            sys.executable,
            "-m",
            "td3drive",
            "sweep",
            "--config",
            str(config_path),
            "--grid",
            "learner.critic_lr=1e-4,3e-4",
            "--set",
            "run.eval_episodes=1",
            "--out",
            str(tmp_path / "sweep"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sorted(row["point"]["learner.critic_lr"] for row in rows) == [1e-4, 3e-4]
    assert all(row["eval_return_mean"] is not None and row["env_steps"] >= 200 for row in rows)
    assert "critic_lr" in (tmp_path / "sweep" / "sweep.md").read_text()
