"""``td3drive evaluate`` evaluates a checkpoint under its run's settings.

The run directory is written by hand (a fresh learner's checkpoint and a
``config.yaml``), without training; the CLI runs in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from learner.td3 import TD3Learner
from td3drive.app.cli import main
from td3drive.contracts.config import LearnerConfig, TD3DriveConfig
from tests.test_learner_resume import write_as_if_saved_on_cuda

TINY_LEARNER = LearnerConfig(device="cpu", features_dim=32, actor_hidden=(32,), critic_hidden=(32,))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory: ``checkpoints/learner.pt`` and a ``config.yaml`` whose
    task ends episodes after 7 steps and whose env steers at most 0.4 rad."""
    run = tmp_path_factory.mktemp("run")
    TD3Learner(TINY_LEARNER).save_checkpoint(run / "checkpoints" / "learner.pt")
    config = TD3DriveConfig.model_validate(
        {
            "learner": TINY_LEARNER.model_dump(mode="json"),
            "task": {"max_episode_steps": 7},
            "rollout": {"env_kwargs": {"max_steering_rad": 0.4}, "seed": 1},
            "run": {"eval_seed": 3},
        }
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return run


def assert_time_limit(episodes: list[dict], limit: int) -> None:
    """No episode outlives ``limit`` steps, and the limit is what ended some."""
    assert all(episode["length"] <= limit for episode in episodes)
    timed_out = [e["length"] for e in episodes if e.get("end_reason") == "time_limit"]
    assert timed_out and all(length == limit for length in timed_out)


def evaluate(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "out.json"
    code = main(["evaluate", *args, "--episodes", "2", "--json", str(out)])
    return code, json.loads(out.read_text()) if code == 0 else {}


def test_evaluates_under_the_runs_settings(run_dir: Path, tmp_path: Path) -> None:
    code, result = evaluate(tmp_path, "--checkpoint", str(run_dir / "checkpoints" / "learner.pt"))
    assert code == 0
    assert len(result["episodes"]) == 2
    assert_time_limit(result["episodes"], 7)
    assert result["config_source"] == str(run_dir / "config.yaml")
    assert result["env_id"] == "td3drive/Racetrack-v0"
    assert result["env_kwargs"]["max_steering_rad"] == 0.4
    assert result["env_kwargs"]["task"]["max_episode_steps"] == 7
    assert result["seed"] == 3  # run.eval_seed, as the training evaluator


def test_run_dir_and_overrides(run_dir: Path, tmp_path: Path) -> None:
    code, result = evaluate(
        tmp_path, "--run-dir", str(run_dir), "--set", "task.max_episode_steps=3", "--seed", "5"
    )
    assert code == 0
    assert_time_limit(result["episodes"], 3)
    assert result["env_kwargs"]["task"]["max_episode_steps"] == 3
    assert result["env_kwargs"]["max_steering_rad"] == 0.4
    assert result["seed"] == 5
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "learner.pt")


def test_explicit_config_file(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"task": {"max_episode_steps": 2}}))
    code, result = evaluate(
        tmp_path,
        "--checkpoint",
        str(run_dir / "checkpoints" / "learner.pt"),
        "--config",
        str(other),
    )
    assert code == 0
    assert result["config_source"] == str(other)
    assert_time_limit(result["episodes"], 2)
    assert "max_steering_rad" not in result["env_kwargs"]


def test_env_kwargs_reach_the_environment(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An impossible steering limit is refused by the environment itself.
    code, _ = evaluate(
        tmp_path, "--run-dir", str(run_dir), "--set", "rollout.env_kwargs.max_steering_rad=2.0"
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("td3drive: error: ")
    assert "max_steering_rad" in err[0]


def test_bare_checkpoint_uses_defaults_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "elsewhere" / "learner.pt"
    TD3Learner(TINY_LEARNER).save_checkpoint(checkpoint)
    # The defaults' time limit (1000 steps) would make this slow; the override
    # keeps it short and shows that --set works without a config too.
    code, result = evaluate(
        tmp_path, "--checkpoint", str(checkpoint), "--set", "task.max_episode_steps=4"
    )
    assert code == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "default settings" in warnings[0]
    assert result["config_source"] == "defaults"
    defaults = TD3DriveConfig()
    assert result["env_id"] == defaults.rollout.env_id
    assert result["seed"] == defaults.run.eval_seed
    assert "max_steering_rad" not in result["env_kwargs"]
    expected_task = defaults.task.model_dump(mode="json") | {"max_episode_steps": 4}
    assert result["env_kwargs"]["task"] == expected_task
    assert_time_limit(result["episodes"], 4)


@pytest.mark.parametrize(
    "args",
    [
        ("--checkpoint", "{tmp}/nowhere/checkpoints/learner.pt"),
        ("--run-dir", "{tmp}/no-run"),
        ("--run-dir", "{run}", "--set", "task.max_episode_steps=0"),
        ("--run-dir", "{run}", "--set", "no-equals-sign"),
        ("--run-dir", "{run}", "--set", "task.no_such_key=1"),
        ("--run-dir", "{run}", "--config", "{tmp}/missing.yaml"),
        ("--run-dir", "{run}", "--video", "{tmp}/clip.avi"),
        ("--run-dir", "{run}", "--video", "{tmp}/clip.mp4", "--video-fps", "0"),
    ],
    ids=[
        "missing-checkpoint",
        "missing-run-dir",
        "bad-value",
        "bad-syntax",
        "unknown-key",
        "bad-config",
        "bad-video-suffix",
        "bad-video-fps",
    ],
)
def test_errors_are_one_line_and_exit_2(
    args: tuple[str, ...], run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [arg.format(tmp=tmp_path, run=run_dir) for arg in args]
    assert main(["evaluate", *argv, "--episodes", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("td3drive: error: "), captured.err


def test_a_checkpoint_saved_on_a_gpu_evaluates_on_a_cpu(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its tensors are tagged ``cuda:0`` and its generator state is a CUDA
    generator's 16 bytes (a CPU one takes 5,056): only the policy is needed."""
    learner = TD3Learner(TINY_LEARNER)
    checkpoint = write_as_if_saved_on_cuda(
        learner.state_dict(), tmp_path / "gpu-run" / "checkpoints" / "learner.pt"
    )
    code, result = evaluate(
        tmp_path, "--checkpoint", str(checkpoint), "--config", str(run_dir / "config.yaml")
    )
    assert code == 0, capsys.readouterr().err
    assert result["policy_version"] == 0
    assert_time_limit(result["episodes"], 7)


def test_episodes_default_to_ten() -> None:
    from td3drive.app.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--run-dir", "somewhere"])
    assert args.episodes == 10
    assert args.env is None and args.seed is None and args.overrides == []
    assert args.video is None and args.video_episodes == 1 and args.video_fps is None


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_of_the_evaluation(
    suffix: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--video`` writes a clip of the first ``--video-episodes`` episodes: the
    env's view beside the policy's frame, one frame per step after the reset."""
    from tests.test_video import assert_frames_have_content, read_frames

    clip = tmp_path / "clips" / f"eval{suffix}"
    code, result = evaluate(
        tmp_path, "--run-dir", str(run_dir), "--video", str(clip), "--video-episodes", "2"
    )
    assert code == 0, capsys.readouterr().err
    assert len(result["episodes"]) == 2
    frames = sum(episode["length"] + 1 for episode in result["episodes"])
    assert result["video"] == {
        "path": str(clip.resolve()),
        "format": suffix[1:],
        "fps": 5.0,
        "episodes": 2,
        "frames": frames,
        "size_bytes": clip.stat().st_size,
    }
    assert_frames_have_content(read_frames(clip), frames)
    assert f"wrote {clip.resolve()} ({frames} frames of 2 episode(s)" in capsys.readouterr().err


def test_video_episodes_beyond_the_evaluation_record_them_all(
    run_dir: Path, tmp_path: Path
) -> None:
    clip = tmp_path / "eval.mp4"
    code, result = evaluate(
        tmp_path, "--run-dir", str(run_dir), "--video", str(clip), "--video-episodes", "5"
    )
    assert code == 0 and result["video"]["episodes"] == 2  # --episodes 2
