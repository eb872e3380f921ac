"""The console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "td3drive", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "bench" in result.stdout
    result = run_cli("bench", "learner", "--help")
    assert result.returncode == 0
    assert "overhead_ratio" in result.stdout


def test_bench_learner_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "learner.json"
    result = run_cli(
        "bench",
        "learner",
        "--batch-size",
        "4",
        "--updates",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    assert report["device"] == "cpu"
    rows = {(r["encoder"], r["batch_size"]) for r in report["results"]}
    assert rows == {("separate", 4), ("shared", 4)}
    assert {(r["encoder"], r["batch_size"]) for r in report["reference_updates_per_s"]} == rows
    assert all(r["updates_per_s"] > 0 for r in report["results"])
    separate = next(r for r in report["results"] if r["encoder"] == "separate")
    reference = next(r for r in report["reference_updates_per_s"] if r["encoder"] == "separate")
    assert report["overhead_ratio"] == separate["updates_per_s"] / reference["updates_per_s"]
    assert "ratio" in result.stderr  # progress lines go to stderr


def test_bad_arguments_fail_with_usage() -> None:
    result = run_cli("bench", "learner", "--updates", "0")
    assert result.returncode == 2
    assert "must be >= 1" in result.stderr


def test_bench_replay_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    result = run_cli(
        "bench",
        "replay",
        "--transitions",
        "512",
        "--chunk-steps",
        "32",
        "--sample-batches",
        "2",
        "--batch-size",
        "64",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["source"] == "synthetic" and "synthetic" in report["source_note"]
    assert report["naive_bytes_per_transition"] == 2 * 4 * 84 * 84 + 2 * 23 * 4 + 2 * 4 + 4 + 4
    assert 0 < report["bytes_per_transition"] < report["naive_bytes_per_transition"]
    assert report["memory_ratio"] == pytest.approx(
        report["naive_bytes_per_transition"] / report["bytes_per_transition"]
    )
    for key in ("insert_transitions_per_s", "sample_batches_per_s", "naive_sample_batches_per_s"):
        assert report[key] > 0


def test_bench_replay_on_simulator_frames(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    result = run_cli(
        "bench",
        "replay",
        "--source",
        "racetrack",
        "--transitions",
        "256",
        "--chunk-steps",
        "64",
        "--sample-batches",
        "2",
        "--batch-size",
        "32",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["source"] == "racetrack" and "simulator" in report["source_note"]
    assert report["memory_ratio"] > 10


def test_bench_rollout_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "rollout.json"
    result = run_cli("bench", "rollout", "--workers", "1", "--steps", "40", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [row["workers"] for row in report["results"]] == [1]
    assert report["results"][0]["aggregate_steps_per_s"] > 0
    assert report["results"][0]["scaling_efficiency"] == pytest.approx(1.0)
    assert report["bare_env_steps_per_s"] > 0
    assert report["inference_latency_ms"]["mean"] > 0


def test_carla_check_reports_an_unreachable_server() -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli(
        "carla-check", "--host", "127.0.0.1", "--port", str(port), "--timeout", "1", "--json"
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["reachable"] is False and f"127.0.0.1:{port}" in report["error"]
