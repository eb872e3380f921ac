"""`td3drive report`: PNGs from a run directory's metrics.jsonl, robust to the
lines a real run writes (null sections early on, a line cut off by a kill)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image

from td3drive.app.report import (
    ReportError,
    find_videos,
    learner_figure,
    load_metrics,
    make_report,
    rollout_figure,
    system_figure,
)
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import DrivingTaskConfig


def _line(i: int) -> dict[str, Any]:
    """Report interval ``i`` of a plausible run: no episode before i=2, no learner
    before i=3 (replay still below min_size_to_sample)."""
    env_steps = 1280 * i
    updates = max(0, 80 * (i - 2))
    line: dict[str, Any] = {
        "time_s": 10.0 * i,
        "env_steps": env_steps,
        "learner_updates": updates,
        "episodes": i // 2,
        "env_steps_per_s": 128.0 + i,
        "updates_per_s": 8.0 if updates else 0.0,
        "episode": None,
        "learner": None,
        "replay": {
            "size": env_steps,
            "bytes": 1200 * env_steps,
            "bytes_per_transition": 1200.0,
            "compression_ratio": 23.5,
        },
        "policy_lag_updates_mean": None,
    }
    if i >= 2:
        line["episode"] = {
            "count": i // 2,
            "return_mean": -20.0 + 4.0 * i,
            "success_rate": min(1.0, 0.05 * i),
            "route_completion_mean": min(1.0, 0.08 * i),
            "mean_speed_kmh": 10.0 + i,
            "collision_rate": max(0.0, 0.6 - 0.05 * i),
        }
    if i >= 3:
        line["policy_lag_updates_mean"] = 12.0
        line["learner"] = {
            M.CRITIC_LOSS: 2.0 / i,
            M.ACTOR_LOSS: -0.5 * i,
            M.Q1_MEAN: 0.5 * i,
            M.Q2_MEAN: 0.45 * i,
            M.TARGET_Q_MEAN: 0.48 * i,
            M.ACTOR_GRAD_NORM_PRECLIP: 30.0 / i,
            M.ACTOR_GRAD_NORM_POSTCLIP: min(10.0, 30.0 / i),
            M.CRITIC_GRAD_NORM_PRECLIP: 50.0 / i,
            M.CRITIC_GRAD_NORM_POSTCLIP: min(10.0, 50.0 / i),
            M.ACTOR_ENCODER_WEIGHT_DELTA: 0.01 * i,
            M.CRITIC_ENCODER_WEIGHT_DELTA: 0.02 * i,
            M.ACTOR_UPDATED: 1.0,
        }
    return line


def _write_run(run_dir: Path, lines: int = 12) -> Path:
    run_dir.mkdir()
    rows = [json.dumps(_line(i)) for i in range(1, lines + 1)]
    rows.insert(4, '{"time_s": 40.0, "env_steps": 51')  # cut off mid-write
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n\n")
    (run_dir / "config.yaml").write_text(
        "learner:\n  actor_max_grad_norm: 10.0\n  critic_max_grad_norm: 10.0\n"
        "task:\n  target_speed_mps: 8.0\n"
    )
    (run_dir / "summary.json").write_text(
        json.dumps({"env_steps": 15360, "eval": {"return_mean": 31.5, "success_rate": 0.67}})
    )
    return run_dir


def test_report_writes_readable_pngs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = _write_run(tmp_path / "run")
    out = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="td3drive.app.report"):
        paths = make_report(run_dir, stream=out)

    assert [p.name for p in paths] == ["rollout.png", "learner.png", "system.png", "index.html"]
    for path in paths[:3]:
        assert path.parent == run_dir / "report"
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 1000 and image.height >= 700
            colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50  # not a blank canvas
    assert "skipped 1 malformed line(s) (first at line 5)" in caplog.text
    printed = out.getvalue()
    assert "12 line(s), 1 skipped" in printed
    assert f"{(run_dir / 'report' / 'index.html').resolve()}: open in a browser" in printed
    assert "eval.return_mean: 31.5" in printed and "eval.success_rate: 0.67" in printed


REFERENCE_LINES = ("max_grad_norm", "target speed", "first non-finite loss")


def _curves(fig: Any) -> dict[str, dict[str, int]]:
    """{axes title: {curve label: points}} of the data curves (not reference lines)."""
    found: dict[str, dict[str, int]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            label = line.get_label()
            if label.startswith("_") or label.startswith(REFERENCE_LINES):
                continue
            found.setdefault(ax.get_title(), {})[label] = len(line.get_xdata())
    return found


def test_figures_plot_every_series(tmp_path: Path) -> None:
    records = load_metrics(_write_run(tmp_path / "run") / "metrics.jsonl").records
    assert len(records) == 12

    rollout = _curves(rollout_figure(records))
    assert rollout["Episode return"] == {"return (mean)": 11}  # line 1 has episode: null
    assert rollout["Success and collision rate"] == {"success": 11, "collision": 11}
    assert set(rollout) == {
        "Episode return",
        "Success and collision rate",
        "Route completion (mean)",
        "Mean speed",
    }

    learner = _curves(learner_figure(records))
    assert learner["Critic loss (TD MSE, both critics)"] == {"critic": 10}
    assert learner["Q values (batch mean)"] == {"Q1": 10, "Q2": 10, "TD target": 10}
    assert learner["Actor gradient L2 norm"] == {"before clipping": 10, "after clipping": 10}
    assert learner["Critic gradient L2 norm"] == {"before clipping": 10, "after clipping": 10}
    assert learner["Encoder weight change"] == {"actor encoder": 10, "critic encoder": 10}
    assert len(learner) == 6

    system = _curves(system_figure(records))
    assert system["Policy lag"] == {"policy lag": 10}
    assert system["Replay size"] == {"held": 12}
    assert system[""] == {"compression ratio": 12}  # right-hand axis of the bytes panel
    assert len(system) == 7


def test_non_finite_loss_is_marked_and_left_out(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run")
    bad = _line(13)
    bad["learner"][M.CRITIC_LOSS] = math.nan
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(bad) + "\n")  # json writes NaN, json.loads reads it back
    records = load_metrics(run_dir / "metrics.jsonl").records
    fig = learner_figure(records)
    loss_ax = fig.axes[0]
    marks = [line for line in loss_ax.get_lines() if line.get_label() == "first non-finite loss"]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == bad["learner_updates"]
    assert _curves(fig)["Critic loss (TD MSE, both critics)"] == {"critic": 10}


def test_early_run_without_learner_or_episodes_still_reports(tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        json.dumps({"time_s": 10.0, "env_steps": 1280, "episode": None, "learner": None}) + "\n"
    )
    paths = make_report(run_dir, stream=io.StringIO())
    assert all(p.is_file() for p in paths)


def test_missing_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such run directory"):
        make_report(tmp_path / "nope")


def test_missing_metrics_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"metrics\.jsonl: missing"):
        make_report(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "not json\n[1, 2]\n{}\n"])
def test_no_usable_line_is_a_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ReportError, match="no usable line"):
        make_report(tmp_path)
    assert not (tmp_path / "report").exists()


def _episode_chunk(speeds: list[float], rewards: list[float], terminated: bool, episode: int):
    """A compressed chunk whose step t has speed ``speeds[t]`` (m/s) in its vector;
    ``speeds`` has one more entry than ``rewards`` (the last next_obs)."""
    from td3drive.contracts.codec import Chunk, compress
    from td3drive.contracts.spec import Transition

    task = DrivingTaskConfig()
    image = np.zeros((4, 84, 84), np.uint8)

    def obs(speed: float) -> dict[str, np.ndarray]:
        vector = np.zeros(23, np.float32)
        vector[0] = speed / task.target_speed_mps
        return {"image": image, "vector": vector}

    steps = len(rewards)
    transitions = [
        Transition(
            obs=obs(speeds[t]),
            action=np.zeros(2, np.float32),
            reward=rewards[t],
            next_obs=obs(speeds[t + 1]),
            terminated=terminated and t == steps - 1,
            truncated=False,
            policy_version=0,
            episode_id=episode,
            step=t,
        )
        for t in range(steps)
    ]
    return compress(Chunk.from_transitions(transitions))


def test_replay_census_classifies_crashes_stops_and_driving() -> None:
    from td3drive.app.replay_census import census

    task = DrivingTaskConfig()
    chunks = [
        # drives at 5 m/s, then 12 m/s (overspeed), then crashes at speed
        _episode_chunk([5.0, 5.0, 12.0, 12.0], [1.0, 1.0, -9.5], terminated=True, episode=1),
        # stands still, then the stuck rule ends it
        _episode_chunk([0.0, 0.0, 0.0], [0.0, -10.0], terminated=True, episode=2),
        # completes the route
        _episode_chunk([6.0, 6.0], [1.0], terminated=True, episode=3),
    ]
    result = census(chunks, task)
    assert result["transitions"] == 6 and result["episodes"] == 3
    assert result["counts"] == {
        "crash": 1,
        "stuck_end": 1,
        "route_complete": 1,
        "stopped": 1,
        "overspeed": 0,
        "driving": 2,
    }
    assert sum(result["fractions"].values()) == pytest.approx(1.0)
    assert result["policy_version_0_fraction"] == 1.0


# --- the HTML page ---------------------------------------------------------------


class _References(HTMLParser):
    """The ``src``/``href`` of every tag, as ``(tag, attribute value)``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [(tag, value) for name, value in attrs if name in ("src", "href") and value]


def _references(page: Path) -> list[tuple[str, Path]]:
    """``(tag, file)`` of every reference on the page, resolved against it;
    asserts that each is relative (the run directory can move)."""
    from urllib.parse import unquote

    parser = _References()
    parser.feed(page.read_text(encoding="utf-8"))
    resolved = []
    for tag, value in parser.found:
        assert "://" not in value and not value.startswith("/"), value
        resolved.append((tag, (page.parent / unquote(value)).resolve()))
    return resolved


def _clip(path: Path, frames: int, mtime: float) -> Path:
    """A short real clip (MP4 or GIF by suffix) of moving frames, dated ``mtime``."""
    from rollout_workers.video import EvaluationVideo, video_format, write_video

    rng = np.random.default_rng(frames)
    with EvaluationVideo(video_format(path), fps=5) as video:
        for step in range(frames):
            view = np.full((120, 160, 3), 90, np.uint8)
            view[40:60, 10 + 10 * step : 30 + 10 * step] = (230, 200, 20)
            observed = rng.integers(0, 256, (84, 84), dtype=np.uint8)
            video.add(view, observed, episode=0, step=step, action=[0.1, 0.5], speed_mps=8.0)
        data = video.finish()
    write_video(path, data)
    os.utime(path, (mtime, mtime))
    return path


def test_html_report_embeds_the_curves_and_the_latest_clip(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run with space")
    (run_dir / "eval.jsonl").write_text(
        json.dumps({"env_steps": 1000, "return_mean": 3.0})
        + "\n"
        + json.dumps({"env_steps": 2000, "return_mean": 7.5, "route_completion_mean": 0.25})
        + "\n"
    )
    older = _clip(run_dir / "videos" / "eval-000001000.gif", 4, mtime=1_000_000)
    latest = _clip(run_dir / "videos" / "eval-000002000.mp4", 9, mtime=2_000_000)
    (run_dir / "videos" / "notes.txt").write_text("not a clip")
    assert find_videos(run_dir) == [older, latest]

    paths = make_report(run_dir, stream=io.StringIO())
    page = run_dir / "report" / "index.html"
    assert paths[-1] == page
    frames = [p for p in paths if p.parent.name == "frames"]
    assert [p.name for p in frames] == [
        f"key-{i}-frame-{n}.png" for i, n in enumerate((0, 3, 5, 8))
    ]

    references = _references(page)
    assert references, "the page references nothing"
    for _, target in references:
        assert target.is_file(), target
    targets = {target for _, target in references}
    assert ("video", latest.resolve()) in references  # embedded, plays in a browser
    assert ("a", older.resolve()) in references  # earlier clips linked
    assert {p.resolve() for p in paths if p.suffix == ".png"} <= targets  # curves and frames
    for frame in frames:
        with Image.open(frame) as image:
            assert image.size == (672, 384) and np.asarray(image).std() > 10
    text = page.read_text(encoding="utf-8")
    assert "route_completion_mean" in text and "0.25" in text  # the latest evaluation
    assert "eval.return_mean" in text  # summary.json


def test_html_report_without_clips_and_with_a_broken_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _write_run(tmp_path / "run")
    paths = make_report(run_dir, stream=io.StringIO())
    page = run_dir / "report" / "index.html"
    assert [tag for tag, _ in _references(page)] == ["img", "img", "img"]
    assert all(target.is_file() for _, target in _references(page))

    broken = run_dir / "videos" / "eval-000000500.mp4"
    broken.parent.mkdir()
    broken.write_bytes(b"not an mp4")
    with caplog.at_level(logging.WARNING, logger="td3drive.app.report"):
        paths = make_report(run_dir, stream=io.StringIO())
    assert "no key frames" in caplog.text
    assert not [p for p in paths if p.parent.name == "frames"]
    assert ("video", broken.resolve()) in _references(page)  # still offered
