"""``td3drive train`` checks its input before Ray starts (td3drive/app/preflight.py):
a run directory that is a file or cannot be written, a directory that already
holds a run (the old behaviour silently mixed the two runs), a checkpoint to
resume that is empty, truncated or garbage, a taken metrics port. Each ends in
one line on stderr and exit 2, writes nothing and never calls ``ray.init``."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from td3drive.app import cli
from td3drive.app.preflight import PreflightError, check_resume_checkpoint, check_run_dir
from td3drive.contracts.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "learner": {
        "device": "cpu",
        "batch_size": 16,
        "features_dim": 32,
        "actor_hidden": [32],
        "critic_hidden": [32],
        "random_shift_pad": 0,
    },
    "replay": {"num_shards": 1, "chunk_steps": 32, "min_size_to_sample": 64},
    "rollout": {"num_workers": 1},
    "run": {"total_env_steps": 100, "metrics_port": None},
}


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fails the test if anything calls ``ray.init`` (Ray must not start)."""
    assert not ray.is_initialized()
    calls: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise AssertionError("ray.init was called: the preflight let a bad run through")

    monkeypatch.setattr(ray, "init", refuse)
    yield calls
    assert not calls and not ray.is_initialized()


def _config_file(tmp_path: Path, **run: Any) -> Path:
    raw = {**TINY, "run": {**TINY["run"], **run}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under ``root``: kind, size and content digest (to show that
    nothing was written, removed or changed)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            tree[str(path)] = ("dir", 0, "")
        else:
            data = path.read_bytes()
            tree[str(path)] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return tree


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``td3drive train ARGS`` in-process: (exit code, stderr)."""
    code = cli.main(["train", *args])
    return code, capsys.readouterr().err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("td3drive: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _write_run(run_dir: Path, checkpoint: bytes | None = None) -> None:
    """A run directory as the driver leaves it (config.yaml, checkpoints/, metrics)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    config = config_from_dict(TINY)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    (run_dir / "checkpoints" / "driver.json").write_text('{"env_steps": 64}')
    (run_dir / "metrics.jsonl").write_text('{"env_steps": 64}\n')
    if checkpoint is not None:
        (run_dir / "checkpoints" / "learner.pt").write_bytes(checkpoint)


def _real_checkpoint(tmp_path: Path, **learner: Any) -> bytes:
    from learner.td3 import TD3Learner

    config = config_from_dict({**TINY, "learner": {**TINY["learner"], **learner}})
    path = TD3Learner(config.learner).save_checkpoint(tmp_path / "real.pt")
    data = Path(path).read_bytes()
    Path(path).unlink()
    return data


# ------------------------------------------------------------ the run directory
def test_a_run_dir_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    config = _config_file(tmp_path)
    target = tmp_path / "run"
    target.write_text("not a directory")
    before = _snapshot(tmp_path)
    code, err = _train(capsys, "--config", str(config), "--run-dir", str(target))
    assert code == 2
    assert _one_error_line(err) == (
        f"td3drive: error: {target} is a file, not a run directory; choose another --run-dir"
    )
    assert _snapshot(tmp_path) == before
    code, err = _train(capsys, "--resume", str(target))
    assert code == 2 and "is a file, not a run directory" in _one_error_line(err)


def test_a_run_dir_below_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    config = _config_file(tmp_path)
    (tmp_path / "plain").write_text("x")
    target = tmp_path / "plain" / "sub" / "run"
    before = _snapshot(tmp_path)
    code, err = _train(capsys, "--config", str(config), "--run-dir", str(target))
    assert code == 2
    assert _one_error_line(err) == (
        f"td3drive: error: cannot create {target}: {tmp_path / 'plain'} is a file, not a directory"
    )
    assert _snapshot(tmp_path) == before


def _unwritable_parent(tmp_path: Path) -> Path:
    """A directory no run can be created in. As root, permission bits do not
    stop anything (and os.access says yes), so use sysfs, where even root cannot
    create a file; otherwise a directory without write permission."""
    if os.geteuid() == 0:
        sysfs = Path("/sys")
        try:
            (sysfs / f"td3drive-probe-{os.getpid()}").mkdir()
        except OSError:
            return sysfs
        pytest.skip("running as root on a writable /sys: no unwritable directory here")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked


def test_an_unwritable_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    config = _config_file(tmp_path)
    parent = _unwritable_parent(tmp_path)
    target = parent / f"td3drive-run-{os.getpid()}"
    try:
        before = _snapshot(tmp_path)
        code, err = _train(capsys, "--config", str(config), "--run-dir", str(target))
        line = _one_error_line(err)
        assert code == 2
        assert line.startswith(f"td3drive: error: cannot create {target}: {parent} is not writable")
        assert line.endswith("; choose another --run-dir")
        assert not target.exists() and _snapshot(tmp_path) == before
    finally:
        if parent != Path("/sys"):
            parent.chmod(0o755)


def test_an_existing_run_is_neither_reused_nor_mixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    """The old CLI trained into it: shards restored the old snapshots next to a
    fresh learner and metrics.jsonl was appended."""
    config = _config_file(tmp_path)
    run_dir = tmp_path / "runs" / "local"
    _write_run(run_dir, checkpoint=b"old learner")
    before = _snapshot(tmp_path)
    code, err = _train(capsys, "--config", str(config), "--run-dir", str(run_dir))
    assert code == 2
    assert _one_error_line(err) == (
        f"td3drive: error: {run_dir} already holds a run (config.yaml, checkpoints/); "
        f"continue it with `td3drive train --resume {run_dir}`, or start over with --overwrite"
    )
    assert _snapshot(tmp_path) == before


def test_overwrite_refuses_what_is_not_a_run_and_contradicting_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    config = _config_file(tmp_path)
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "config.yaml").write_text("database: {host: localhost}\n")  # not td3drive's
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    before = _snapshot(tmp_path)

    code, err = _train(capsys, "--config", str(config), "--run-dir", str(foreign), "--overwrite")
    assert code == 2
    assert _one_error_line(err) == (
        f"td3drive: error: {foreign} is not empty (config.yaml, notes.txt) and holds no "
        "td3drive run; choose a new or empty --run-dir"
    )
    code, err = _train(capsys, "--resume", str(run_dir), "--overwrite")
    assert code == 2 and "give only one" in _one_error_line(err)
    assert _snapshot(tmp_path) == before


def test_overwrite_removes_the_previous_run_and_keeps_other_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_run(run_dir, checkpoint=b"old learner")
    (run_dir / "checkpoints" / "replay" / "shard-0").mkdir(parents=True)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "rollout.png").write_bytes(b"png")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "eval.jsonl").write_text("{}\n")
    (run_dir / "train.log").write_text("the user's own log")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (run_dir / "eval.json").symlink_to(elsewhere / "keep.txt")  # removed, not followed

    check_run_dir(run_dir, resume=False, overwrite=True)

    assert sorted(p.name for p in run_dir.iterdir()) == ["train.log"]
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_a_new_or_empty_run_dir_passes_and_is_not_created(tmp_path: Path) -> None:
    check_run_dir(tmp_path / "a" / "b" / "run", resume=False, overwrite=False)
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty", resume=False, overwrite=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"]
    assert list((tmp_path / "empty").iterdir()) == []  # the write probe is gone


def test_resume_of_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    (tmp_path / "stuff").mkdir()
    before = _snapshot(tmp_path)
    code, err = _train(capsys, "--resume", str(tmp_path / "stuff"))
    assert code == 2
    assert _one_error_line(err).startswith(
        f"td3drive: error: cannot resume {tmp_path / 'stuff'}: not a td3drive run directory "
        "(no config.yaml)"
    )
    code, err = _train(capsys, "--resume", str(tmp_path / "missing"))
    assert code == 2
    assert _one_error_line(err) == (
        f"td3drive: error: cannot resume {tmp_path / 'missing'}: no such directory"
    )
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------ the checkpoint to resume
def _truncated(tmp_path: Path) -> bytes:
    data = _real_checkpoint(tmp_path)
    return data[: len(data) // 2]


CHECKPOINTS = {
    "empty": (lambda tmp: b"", "empty file"),
    "garbage": (lambda tmp: b"\x00garbage, not a checkpoint\n" * 64, "not a td3drive checkpoint"),
    "truncated": (_truncated, "truncated or corrupt"),
}


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_resume_with_a_bad_checkpoint(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    """The old driver found out inside the learner actor, ~50 s after start-up,
    wrapped in a Ray error, passing on torch's advice to use weights_only=False."""
    make, reason = CHECKPOINTS[kind]
    run_dir = tmp_path / "run"
    _write_run(run_dir, checkpoint=make(tmp_path))
    before = _snapshot(tmp_path)
    code, err = _train(capsys, "--resume", str(run_dir))
    line = _one_error_line(err)
    assert code == 2
    assert line.startswith(f"td3drive: error: cannot resume {run_dir}: ")
    assert str(run_dir / "checkpoints" / "learner.pt") in line and reason in line
    assert "weights_only" not in line
    assert _snapshot(tmp_path) == before


def test_resume_with_a_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_run(run_dir, checkpoint=_real_checkpoint(tmp_path, features_dim=16))
    with pytest.raises(PreflightError, match="features_dim") as raised:
        check_resume_checkpoint(run_dir, config_from_dict(TINY))
    assert "\n" not in str(raised.value)
    # The matching checkpoint passes, and so does a run stopped before its first one.
    (run_dir / "checkpoints" / "learner.pt").write_bytes(_real_checkpoint(tmp_path))
    check_resume_checkpoint(run_dir, config_from_dict(TINY))
    (run_dir / "checkpoints" / "learner.pt").unlink()
    check_resume_checkpoint(run_dir, config_from_dict(TINY))


# ------------------------------------------------------------ the metrics port
def test_a_taken_metrics_port_fails_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: list[Any]
) -> None:
    """The old driver bound the port after every actor had started and died with
    an OSError traceback a minute or two later."""
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = _config_file(tmp_path, metrics_port=port)
        before = _snapshot(tmp_path)
        expected = (
            f"td3drive: error: run.metrics_port {port} is taken (Address already in use); "
            "choose another with --set run.metrics_port=N or null to disable"
        )
        code, err = _train(capsys, "--config", str(config), "--run-dir", str(tmp_path / "new"))
        assert code == 2 and _one_error_line(err) == expected
        # --overwrite removes nothing when the run could not start anyway.
        code, err = _train(
            capsys, "--config", str(config), "--run-dir", str(run_dir), "--overwrite"
        )
        assert code == 2 and _one_error_line(err) == expected
        assert _snapshot(tmp_path) == before


# ------------------------------------------------------------ the console
def test_the_console_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    """The real command in a subprocess: no traceback (it was 18 lines for a file)."""
    config = _config_file(tmp_path)
    target = tmp_path / "run"
    target.write_text("a file")
    result = subprocess.run(
        [
            *[sys.executable, "-m", "td3drive", "train"],
            "--config",
            str(config),
            "--run-dir",
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"td3drive: error: {target} is a file, not a run directory; choose another --run-dir"
    ]


def test_main_turns_os_errors_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: Any) -> int:
        raise PermissionError(13, "Permission denied", "runs/x/report")

    monkeypatch.setattr(cli, "_report", broken)
    assert cli.main(["report", "runs/x"]) == 1
    assert capsys.readouterr().err == "td3drive: error: runs/x/report: Permission denied\n"
