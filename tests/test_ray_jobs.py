"""``td3drive train`` as a Ray user runs it: ``ray start --head``, then
``ray job submit --working-dir .`` (DESIGN.md §6, deploy/README.md).

A real single-node Ray cluster is started with the ``ray`` CLI (its own
processes, its own ports), jobs are submitted, followed and stopped with the
``ray job`` CLI, and what the user reads afterwards is checked: the job's
status and logs, and the run directory at the absolute location the driver
printed (not in Ray's working-dir cache). Stopping a job (SIGTERM from Ray
Jobs) saves the run; a second job resumes it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_until
from tests.test_train import tiny_config

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The `ray` CLI of this interpreter's environment (a venv's bin/), else PATH's.
RAY = (
    str(Path(sys.executable).with_name("ray"))
    if Path(sys.executable).with_name("ray").exists()
    else shutil.which("ray") or "ray"
)
HANG_S = 900.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``ray start --head --block`` on free ports; its dashboard address is
    what ``ray job`` talks to. Stopping the ``--block`` process stops this
    cluster only (``ray stop`` would stop every Ray on the machine)."""
    directory = tmp_path_factory.mktemp("cluster")
    log = directory / "head.log"
    dashboard, gcs = _free_port(), _free_port()
    # Ray 2.60 clusters require a token; the `ray job` CLI sends it only in
    # token mode. This cluster's own token, as a user's ~/.ray/auth_token.
    token = directory / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    jobs_env = {**env, "RAY_ADDRESS": address}

    def answers() -> bool:
        assert head.poll() is None, log.read_text()
        return _ray(["job", "list"], jobs_env, check=False).returncode == 0

    try:
        wait_until(answers, "the head node's job API", timeout_s=HANG_S, poll_s=1.0)
        yield jobs_env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)
        # `ray start` records the cluster for a bare ray.init() to join; a
        # stopped head can leave the record behind: remove ours.
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if record.exists() and record.read_text().strip().endswith(f":{gcs}"):
            record.unlink(missing_ok=True)


def _ray(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [RAY, *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    if check:
        assert result.returncode == 0, f"ray {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def _status(job: str, env: dict[str, str]) -> str:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), from
    Ray's job SDK in a process with the cluster's address and token (Ray reads
    its auth mode once per process)."""
    script = (
        "import os, sys; from ray.job_submission import JobSubmissionClient; "
        "print(JobSubmissionClient(os.environ['RAY_ADDRESS']).get_job_status(sys.argv[1]).value)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, job], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def _submit(job: str, env: dict[str, str], *train_args: str) -> None:
    """``ray job submit --no-wait --working-dir .`` from the repository root,
    with the stop grace the docs recommend."""
    runtime_env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}
    _ray(
        [
            "job",
            "submit",
            "--no-wait",
            f"--submission-id={job}",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "td3drive",
            "train",
            *train_args,
        ],
        env,
    )


def _finished(job: str, env: dict[str, str]) -> str:
    terminal = {"SUCCEEDED", "FAILED", "STOPPED"}
    wait_until(
        lambda: _status(job, env) in terminal, f"job {job} finished", timeout_s=HANG_S, poll_s=1.0
    )
    return _status(job, env)


def test_a_submitted_job_trains_stops_and_resumes(cluster: dict[str, str], tmp_path: Path) -> None:
    storage = tmp_path / "store"  # run.storage_path: outside Ray's working-dir cache
    config = tmp_path / "tiny.yaml"
    # An environment that crashes once per worker: the workers' warnings must
    # reach the job's log (Ray forwards and deduplicates them).
    config.write_text(
        yaml.safe_dump(
            tiny_config(
                rollout={"env_id": "td3drive/Faulty-v0", "env_kwargs": {"fail_on_steps": [40]}},
                run={"total_env_steps": 1_000_000},
            )
        )
    )

    # A long job, stopped the way a user stops it: `ray job stop` (SIGTERM).
    _submit(
        "td3drive-first", cluster, "--config", str(config), "--set", f"run.storage_path={storage}"
    )

    def progressed() -> bool:
        assert _status("td3drive-first", cluster) in {"PENDING", "RUNNING"}, _ray(
            ["job", "logs", "td3drive-first"], cluster, check=False
        ).stdout
        runs = list(storage.glob("*/metrics.jsonl"))  # <storage_path>/<UTC timestamp>/
        metrics = runs[0] if runs else storage / "none"
        return metrics.exists() and any(
            json.loads(line)["learner_updates"] > 0 for line in metrics.read_text().splitlines()
        )

    wait_until(progressed, "training progress in the job", timeout_s=HANG_S, poll_s=1.0)
    (run_dir,) = [path.parent for path in storage.glob("*/metrics.jsonl")]
    _ray(["job", "stop", "td3drive-first"], cluster)
    assert _finished("td3drive-first", cluster) == "STOPPED"
    logs = _ray(["job", "logs", "td3drive-first"], cluster).stdout
    assert f"run directory: {run_dir}" in logs  # the absolute location, in the job's log
    assert "SIGTERM received" in logs
    assert "environment failed" in logs and "RolloutWorkerActor" in logs  # a worker's warning
    assert len(logs.splitlines()) < 500  # progress lines, not per-step chatter
    stopped = json.loads((run_dir / "summary.json").read_text())
    assert stopped["status"] == "stopped" and stopped["env_steps"] > 0
    assert (run_dir / "checkpoints" / "learner.pt").exists()

    # The next job resumes it to a budget and succeeds.
    budget = stopped["env_steps"] + 200
    _submit(
        "td3drive-resume",
        cluster,
        "--resume",
        str(run_dir),
        "--total-env-steps",
        str(budget),
    )
    status = _finished("td3drive-resume", cluster)
    logs = _ray(["job", "logs", "td3drive-resume"], cluster).stdout
    assert status == "SUCCEEDED", logs
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "completed" and done["env_steps"] >= budget
    assert "final evaluation" in logs and f"td3drive report {run_dir}" in logs


def test_a_failing_job_says_why_in_its_log(cluster: dict[str, str], tmp_path: Path) -> None:
    """An environment that does not fit the contract fails the job at once,
    with the message in `ray job logs` (not only in a worker's .err file)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(rollout={"env_id": "CartPole-v1"})))
    _submit("td3drive-bad-env", cluster, "--config", str(config), "--run-dir", str(tmp_path / "r"))
    assert _finished("td3drive-bad-env", cluster) == "FAILED"
    logs = _ray(["job", "logs", "td3drive-bad-env"], cluster).stdout
    assert "CartPole-v1" in logs and "observation space" in logs
    assert "Traceback" not in logs
