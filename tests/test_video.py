"""Evaluation clips: frames with content, MP4 and GIF read back, the evaluator
actor recording one on a real Ray instance."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import ray

import rollout_workers
from learner.td3 import TD3Learner
from rollout_workers.evaluation import evaluate_policy
from rollout_workers.racetrack_env import RacetrackEnv
from rollout_workers.ray_actor import remote_evaluator_class, remote_weights_board_class
from rollout_workers.video import (
    FRAME_HEIGHT,
    FRAME_WIDTH,
    PANEL_PX,
    EvaluationVideo,
    VideoError,
    compose_frame,
    key_frames,
    video_format,
    write_video,
)
from td3drive.contracts.config import LearnerConfig, config_from_dict
from td3drive.contracts.networks import Actor, policy_for

TINY_LEARNER = LearnerConfig(device="cpu", features_dim=32, actor_hidden=(32,), critic_hidden=(32,))
STEPS = 6
"""Time limit of the test episodes (the clip of one has at most STEPS + 1 frames)."""
ENV_KWARGS = {"task": {"max_episode_steps": STEPS}}


def read_frames(path: Path) -> np.ndarray:
    """Every frame of a clip, ``uint8[N, H, W, 3]``."""
    options = {"plugin": "FFMPEG"} if path.suffix == ".mp4" else {}
    frames = iio.imread(path, index=None, **options)
    return np.asarray(frames)[..., :3]


def assert_frames_have_content(frames: np.ndarray, count: int) -> None:
    """``count`` frames of the clip layout whose panels are not blank and
    whose pictures change over the clip."""
    assert frames.dtype == np.uint8
    assert frames.shape == (count, FRAME_HEIGHT, FRAME_WIDTH, 3)
    view = frames[:, :PANEL_PX, :PANEL_PX].astype(np.float32)
    policy = frames[:, :PANEL_PX, PANEL_PX:].astype(np.float32)
    strip = frames[:, PANEL_PX:].astype(np.float32)
    # Blank (uniform) frames are what highway-env draws under SDL_VIDEODRIVER=dummy.
    for panel in (view, policy, strip):
        assert all(frame.std() > 10 for frame in panel), [float(f.std()) for f in panel]
    # The car moves: the policy's frames (and the env's view) change over the clip.
    assert np.abs(policy[0] - policy[-1]).mean() > 1
    assert np.abs(view[0] - view[-1]).mean() > 1
    assert len({frame.tobytes() for frame in frames}) > 1


@pytest.fixture(scope="module")
def policy() -> Actor:
    return policy_for(TINY_LEARNER)


def test_video_format_by_suffix() -> None:
    assert video_format("a/clip.mp4") == "mp4"
    assert video_format(Path("CLIP.GIF")) == "gif"
    for bad in ("clip.avi", "clip", "clip.mp4.txt"):
        with pytest.raises(VideoError, match=r"must end in \.mp4 or \.gif") as caught:
            video_format(bad)
        assert "\n" not in str(caught.value)


def test_compose_frame_layout() -> None:
    rng = np.random.default_rng(0)
    view = rng.integers(0, 256, (600, 400, 3), dtype=np.uint8)  # any size, fitted
    observed = rng.integers(0, 256, (84, 84), dtype=np.uint8)
    frame = compose_frame(view, observed, action=[0.5, -0.3], speed_mps=10.0, text="step 1")
    assert frame.dtype == np.uint8 and frame.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    # The policy's frame, 4x nearest-neighbour, fills the right panel (below the label).
    right = frame[40:PANEL_PX, PANEL_PX:, 0]
    np.testing.assert_array_equal(right, np.repeat(np.repeat(observed, 4, 0), 4, 1)[40:])
    assert frame[PANEL_PX:].std() > 10  # the text strip has text
    # No render: the left panel says so; the frame is still made.
    blank = compose_frame(None, observed)
    assert blank.shape == frame.shape
    with pytest.raises(VideoError, match=r"uint8\[84, 84\]"):
        compose_frame(view, observed[:40])
    with pytest.raises(VideoError, match="uint8"):
        compose_frame(view.astype(np.float32), observed)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_evaluation_clip_frames_have_content(policy: Actor, suffix: str, tmp_path: Path) -> None:
    with EvaluationVideo(video_format(f"x{suffix}"), episodes=1, caption="policy v0") as video:
        episodes = evaluate_policy(
            policy, rollout_workers.RACETRACK_ID, ENV_KWARGS, 2, seed=0, video=video
        )
        data = video.finish()
    # Recording changes nothing of what is evaluated.
    assert episodes == evaluate_policy(policy, rollout_workers.RACETRACK_ID, ENV_KWARGS, 2, seed=0)
    assert len(episodes) == 2
    # Only the first episode: its reset frame and one frame per step.
    expected = episodes[0]["length"] + 1
    assert video.frames == expected and video.recorded_episodes == {0}
    assert video.fps == RacetrackEnv.metadata["render_fps"]  # real time, from the env
    path = write_video(tmp_path / f"clip{suffix}", data)
    assert path.read_bytes() == data
    assert_frames_have_content(read_frames(path), expected)
    assert video.describe(str(path), data) == {
        "path": str(path),
        "format": suffix[1:],
        "fps": 5.0,
        "episodes": 1,
        "frames": expected,
        "size_bytes": len(data),
    }
    picked = key_frames(path, 3)
    assert [index for index, _ in picked] == [0, expected // 2, expected - 1][: len(picked)]
    assert all(frame.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3) for _, frame in picked)


def test_no_video_no_rendering(policy: Actor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a clip the env gets no render mode and render() is never called."""
    made: list[object] = []

    def render(self: RacetrackEnv) -> None:
        raise AssertionError("render() called without a video")

    original_init = RacetrackEnv.__init__

    def init(self: RacetrackEnv, *args: object, **kwargs: object) -> None:
        made.append(kwargs.get("render_mode"))
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RacetrackEnv, "render", render)
    monkeypatch.setattr(RacetrackEnv, "__init__", init)
    episodes = evaluate_policy(policy, rollout_workers.RACETRACK_ID, ENV_KWARGS, 1, seed=0)
    assert len(episodes) == 1 and made == [None]


def test_blank_views_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    observed = np.random.default_rng(0).integers(0, 256, (84, 84), dtype=np.uint8)
    with EvaluationVideo("gif", fps=5) as video:
        for step in range(3):
            video.add(np.zeros((84, 84, 3), np.uint8), observed, episode=0, step=step)
        with caplog.at_level(logging.WARNING, logger="rollout_workers.video"):
            data = video.finish()
    assert data[:6] == b"GIF89a"
    assert "SDL_VIDEODRIVER=dummy" in caplog.text


def test_errors_are_video_errors() -> None:
    with pytest.raises(VideoError, match="no frames"), EvaluationVideo("mp4") as video:
        video.finish()
    with pytest.raises(VideoError, match="episodes must be >= 1"):
        EvaluationVideo("mp4", episodes=0)
    with pytest.raises(VideoError, match="fps must be > 0"):
        EvaluationVideo("gif", fps=0)
    with pytest.raises(VideoError, match="format"):
        EvaluationVideo("avi")


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_evaluator_actor_records_a_clip(ray_instance: None, tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "learner": TINY_LEARNER.model_dump(mode="json"),
            "task": {"max_episode_steps": STEPS},
            "rollout": {"num_workers": 1},
        }
    )
    board = remote_weights_board_class().remote()
    learner = TD3Learner(config.learner)
    version, weights = learner.policy_weights()
    ray.get(board.publish.remote(version, weights), timeout=60)
    evaluator = remote_evaluator_class(num_cpus=0).remote(config.model_dump(mode="json"), board)

    path = tmp_path / "videos" / "eval-000000100.mp4"
    result = ray.get(evaluator.evaluate.remote(2, video_path=str(path)), timeout=300)
    assert result["policy_version"] == version and len(result["episodes"]) == 2
    clip = result["video"]
    expected = result["episodes"][0]["length"] + 1
    assert clip["path"] == str(path.resolve()) and clip["format"] == "mp4"
    assert clip["frames"] == expected and clip["episodes"] == 1
    assert clip["size_bytes"] == path.stat().st_size and "data" not in clip
    assert_frames_have_content(read_frames(path), expected)

    # The bytes instead of a file: the caller stores them wherever the run lives.
    named = tmp_path / "elsewhere" / "clip.gif"
    result = ray.get(
        evaluator.evaluate.remote(
            3, video_path=str(named), video_episodes=2, return_video_bytes=True
        ),
        timeout=300,
    )
    clip = result["video"]
    assert not named.exists() and clip["path"] == str(named) and clip["format"] == "gif"
    frames = sum(episode["length"] + 1 for episode in result["episodes"][:2])
    assert clip["episodes"] == 2 and clip["frames"] == frames
    assert_frames_have_content(read_frames(write_video(named, clip["data"])), frames)

    # No clip: no "video" key; a bad suffix fails the call with the one-line VideoError.
    assert "video" not in ray.get(evaluator.evaluate.remote(1), timeout=300)
    with pytest.raises(ray.exceptions.RayTaskError, match=r"must end in \.mp4 or \.gif"):
        ray.get(evaluator.evaluate.remote(1, video_path=str(tmp_path / "x.avi")), timeout=300)
    ray.kill(evaluator)
    ray.kill(board)


def test_a_training_run_stores_its_evaluation_clips(ray_instance: None, tmp_path: Path) -> None:
    """``run.eval_video_every_env_steps``: the evaluator returns the clip and
    the driver stores it with the run; ``eval.jsonl`` names it."""
    import json

    from td3drive.app.driver import TrainingRun
    from tests.test_train import tiny_config

    config = config_from_dict(
        tiny_config(
            task={"max_episode_steps": STEPS},
            run={
                "total_env_steps": 256,
                "eval_every_env_steps": 128,
                "eval_video_every_env_steps": 128,
                "eval_episodes": 1,
            },
        )
    )
    run = TrainingRun(config, tmp_path / "run", log_line=lambda _: None)
    try:
        run.run()
    finally:
        run.shutdown()
    lines = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    clips = [line["video"] for line in lines if "video" in line]
    assert clips and clips[-1] == f"videos/eval-{lines[-1]['env_steps']:09d}.mp4"
    for clip in clips:
        frames = read_frames(tmp_path / "run" / clip)
        assert_frames_have_content(frames, len(frames))
