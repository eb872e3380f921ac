"""Plots of one run directory (``td3drive report RUN_DIR``).

Reads what ``td3drive train`` writes into a run directory:

* ``metrics.jsonl``: one JSON object per report interval (``time_s``,
  ``env_steps``, ``learner_updates``, ``episodes``, throughput, and the
  ``episode``, ``learner`` and ``replay`` sections; any of them may be missing
  or ``null``, early lines usually have no episode and no learner figures);
* ``config.yaml`` (optional): the resolved config, for reference lines (the
  gradient clip norms, the target speed);
* ``summary.json`` (optional): printed as ``key: value`` lines.

and writes PNGs into ``RUN_DIR/report/``:

* ``rollout.png``: what the agent does, against environment steps;
* ``learner.png``: whether the learner learns, against learner updates;
* ``system.png``: throughput, replay and policy lag, against wall time;
* ``replay_census.json`` (when the run has replay snapshots): what the replay
  holds, crashes, stops and driving (:mod:`td3drive.app.replay_census`), also
  printed;
* ``index.html``: one page with the curves, the ``summary.json`` figures, the
  latest evaluation (``eval.jsonl``) and the latest evaluation clip, if the
  run has one (``RUN_DIR/videos/*.mp4|*.gif``: the training evaluator's
  periodic clips, or ``td3drive evaluate --video RUN_DIR/videos/NAME.mp4``),
  embedded by relative path as ``<video>``/``<img>``, with a few of its
  frames extracted as PNGs (``frames/key-<i>-frame-<n>.png``: they show without
  a video player); older clips are linked. Open it in a browser; the run directory can
  be moved or copied as a whole.

Each figure's function documents its panels. Malformed lines (not JSON, not
an object, or with none of ``time_s`` / ``env_steps`` / ``learner_updates``;
typically a last line cut off by a killed driver) are skipped and counted in
one warning. Non-finite values are left out of the curves; the first
non-finite loss is marked on the loss panels.

Rendering uses matplotlib's Agg canvas through :class:`matplotlib.figure.Figure`
(no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import yaml

from td3drive.app import replay_census
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import DrivingTaskConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
EVAL_FILE = "eval.jsonl"
REPORT_DIR = "report"
VIDEO_DIR = "videos"
HTML_FILE = "index.html"
KEY_FRAMES_DIR = "frames"
KEY_FRAMES = 4
"""Frames of the latest clip extracted as PNGs (first to last, evenly spaced)."""
VIDEO_SUFFIXES = (".mp4", ".gif")

_X_KEYS = ("time_s", "env_steps", "learner_updates")
_DPI = 100


class ReportError(ValueError):
    """A run directory that cannot be reported on: missing, no ``metrics.jsonl``,
    or no usable line in it."""


@dataclass(frozen=True)
class MetricsLog:
    """The usable lines of a ``metrics.jsonl``, in file order.

    Attributes:
        records: the JSON objects that have at least one of ``time_s``,
            ``env_steps``, ``learner_updates`` as a number.
        skipped: malformed lines left out (blank lines are not counted).
        first_skipped_line: 1-based line number of the first one, or None.
    """

    records: list[dict[str, Any]]
    skipped: int
    first_skipped_line: int | None


def load_metrics(path: Path) -> MetricsLog:
    """Parse ``metrics.jsonl``, skipping malformed lines (one warning with the count).

    Raises:
        ReportError: the file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    records: list[dict[str, Any]] = []
    skipped = 0
    first_bad: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and any(_num(record.get(k)) is not None for k in _X_KEYS):
            records.append(record)
        else:
            skipped += 1
            first_bad = first_bad or number
    if skipped:
        log.warning("%s: skipped %d malformed line(s) (first at line %d)", path, skipped, first_bad)
    return MetricsLog(records, skipped, first_bad)


def make_report(run_dir: Path, *, stream: TextIO | None = None) -> list[Path]:
    """Write the report PNGs of a run directory and print its summary.

    Args:
        run_dir: a directory written by ``td3drive train`` (needs ``metrics.jsonl``).
        stream: where the ``summary.json`` figures and a one-line account of
            ``metrics.jsonl`` are printed; None = standard output.

    Returns:
        The files written: ``run_dir/report/{rollout,learner,system}.png``,
        ``replay_census.json`` when the run has replay snapshots, the latest
        clip's key frames (``frames/key-<i>-frame-<n>.png``) and ``index.html``
        (:func:`write_html`), in that order.

    Raises:
        ReportError: ``run_dir`` is not a directory, has no ``metrics.jsonl``,
            or that file has no usable line.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "not a directory" if run_dir.exists() else "no such run directory"
        raise ReportError(f"{run_dir}: {what}")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ReportError(
            f"{metrics_path}: missing; is {run_dir} a run directory written by `td3drive train`?"
        )
    metrics = load_metrics(metrics_path)
    if not metrics.records:
        raise ReportError(
            f"{metrics_path}: no usable line ({metrics.skipped} malformed); "
            "the run may not have reached its first report interval"
        )
    config = _read_config(run_dir / CONFIG_FILE)

    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_dir.resolve().name
    figures = {
        "rollout.png": rollout_figure(metrics.records, config, title=title),
        "learner.png": learner_figure(metrics.records, config, title=title),
        "system.png": system_figure(metrics.records, title=title),
    }
    written = []
    for name, figure in figures.items():
        path = out_dir / name
        figure.savefig(path, dpi=_DPI)
        written.append(path)

    stream = stream if stream is not None else sys.stdout
    last = metrics.records[-1]
    print(
        f"{metrics_path}: {len(metrics.records)} line(s), {metrics.skipped} skipped; last at "
        f"env_steps={_fmt(last.get('env_steps'))} learner_updates="
        f"{_fmt(last.get('learner_updates'))} time_s={_fmt(last.get('time_s'))}",
        file=stream,
    )
    for line in summary_lines(run_dir / SUMMARY_FILE):
        print(line, file=stream)
    held = replay_census.census_of_run(run_dir, _task_config(config))
    if held is not None:
        census_path = out_dir / "replay_census.json"
        census_path.write_text(json.dumps(held, indent=2) + "\n")
        for line in replay_census.census_lines(held):
            print(line, file=stream)
        written.append(census_path)
    videos = find_videos(run_dir)
    frames = extract_key_frames(videos[-1], out_dir) if videos else []
    written.extend(frames)
    html_path = write_html(run_dir, written, videos, frames)
    written.append(html_path)
    print(f"{html_path.resolve()}: open in a browser", file=stream)
    return written


def find_videos(run_dir: Path) -> list[Path]:
    """The evaluation clips of a run, ``RUN_DIR/videos/*.mp4|*.gif``, oldest
    first: by modification time, then by name (the driver's
    ``eval-<env_steps>`` names sort by env steps where times tie, e.g. after a
    copy)."""
    directory = Path(run_dir) / VIDEO_DIR
    if not directory.is_dir():
        return []
    clips = [
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES and path.stat().st_size
    ]
    return sorted(clips, key=lambda path: (path.stat().st_mtime, path.name))


def extract_key_frames(video: Path, out_dir: Path, count: int = KEY_FRAMES) -> list[Path]:
    """Up to ``count`` frames of ``video`` as ``out_dir/frames/key-<i>-frame-<n>.png``
    (``n``: the frame's index in the clip; earlier key frames removed first).
    A clip that cannot be decoded is logged and gives none (the page still
    links it).

    Returns:
        The PNGs written, in frame order.
    """
    from PIL import Image

    from rollout_workers.video import VideoError, key_frames

    frames_dir = out_dir / KEY_FRAMES_DIR
    if frames_dir.is_dir():
        for stale in frames_dir.glob("key-*.png"):
            stale.unlink()
    try:
        picked = key_frames(video, count)
    except VideoError as exc:
        log.warning("%s: no key frames: %s", video, exc)
        return []
    frames_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for number, (index, frame) in enumerate(picked):
        path = frames_dir / f"key-{number}-frame-{index}.png"
        Image.fromarray(frame).save(path)
        written.append(path)
    return written


def write_html(
    run_dir: Path, files: Sequence[Path], videos: Sequence[Path], key_frames: Sequence[Path]
) -> Path:
    """``run_dir/report/index.html``: the figures among ``files`` (PNGs, JSON
    linked), ``summary.json`` and the last ``eval.jsonl`` line as tables, the
    last of ``videos`` embedded (``<video>`` for MP4, ``<img>`` for GIF) with
    its ``key_frames``, the others linked. Every reference is a path relative
    to the page, URL-quoted; every text is HTML-escaped.

    Returns:
        The page's path.
    """
    out_dir = Path(run_dir) / REPORT_DIR
    title = Path(run_dir).resolve().name

    def src(path: Path) -> str:
        return quote(Path(os.path.relpath(path, out_dir)).as_posix())

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>td3drive report: {escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}"
        "img,video{max-width:100%}table{border-collapse:collapse}"
        "td{padding:2px 10px;border-bottom:1px solid #ddd}td.v{text-align:right}"
        "figure{display:inline-block;margin:0 8px 8px 0}figcaption{font-size:small}</style>",
        "</head><body>",
        f"<h1>td3drive report: {escape(title)}</h1>",
        f"<p>{escape(str(Path(run_dir).resolve()))}</p>",
    ]
    summary = _read_json(Path(run_dir) / SUMMARY_FILE)
    if summary is not None:
        parts += ["<h2>Summary</h2>", _table(flatten(summary))]
    latest_eval = _last_json_line(Path(run_dir) / EVAL_FILE)
    if latest_eval is not None:
        parts += ["<h2>Latest evaluation</h2>", _table(flatten(latest_eval))]
    if videos:
        latest = videos[-1]
        size_mb = latest.stat().st_size / 1e6
        parts.append("<h2>Latest evaluation clip</h2>")
        parts.append(
            "<p>Left: the simulator's view; right: the 84&times;84 frame the policy saw "
            "(the newest of its 4-frame stack); below: speed, steer and throttle/brake. "
            "One frame per env step.</p>"
        )
        if latest.suffix.lower() == ".mp4":
            parts.append(
                f'<video controls loop muted playsinline preload="metadata" '
                f'src="{src(latest)}"></video>'
            )
        else:
            parts.append(f'<img src="{src(latest)}" alt="{escape(latest.name)}">')
        parts.append(f'<p><a href="{src(latest)}">{escape(latest.name)}</a> ({size_mb:.2f} MB)</p>')
        for frame in key_frames:
            index = frame.stem.rsplit("-", 1)[-1]
            parts.append(
                f'<figure><img src="{src(frame)}" alt="frame {escape(index)}" width="448">'
                f"<figcaption>frame {escape(index)}</figcaption></figure>"
            )
        if len(videos) > 1:
            parts.append("<h3>Earlier clips</h3><ul>")
            parts += [
                f'<li><a href="{src(video)}">{escape(video.name)}</a></li>'
                for video in reversed(videos[:-1])
            ]
            parts.append("</ul>")
    parts.append("<h2>Curves</h2>")
    for path in files:
        if path.suffix == ".png" and path.parent == out_dir:
            parts.append(f'<p><img src="{src(path)}" alt="{escape(path.stem)}"></p>')
        elif path.suffix == ".json":
            parts.append(f'<p><a href="{src(path)}">{escape(path.name)}</a></p>')
    parts.append("</body></html>")
    page = out_dir / HTML_FILE
    page.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return page


def _table(rows: Iterable[tuple[str, Any]]) -> str:
    cells = "".join(
        f'<tr><td>{escape(key)}</td><td class="v">{escape(_fmt(value))}</td></tr>'
        for key, value in rows
    )
    return f"<table>{cells}</table>"


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None (absent or unreadable: logged)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("%s: unreadable, left out of the page: %s", path, exc)
        return None


def _last_json_line(path: Path) -> dict[str, Any] | None:
    """The last line of a JSON-lines file that is a JSON object, or None."""
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        log.warning("%s: unreadable, left out of the page: %s", path, exc)
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return record
    return None


def _task_config(config: dict[str, Any] | None) -> DrivingTaskConfig:
    """The run's task section (for the replay census), or the defaults."""
    try:
        return DrivingTaskConfig.model_validate((config or {}).get("task") or {})
    except ValueError:
        return DrivingTaskConfig()


def summary_lines(path: Path) -> list[str]:
    """``summary.json`` as ``key: value`` lines (nested keys joined with '.');
    empty if the file is absent, one explanatory line if it is unreadable."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{path}: unreadable ({exc})"]
    lines = [f"{path}:"]
    lines.extend(f"  {key}: {_fmt(value)}" for key, value in flatten(data))
    return lines


# --- figures -----------------------------------------------------------------


def rollout_figure(
    records: Sequence[dict[str, Any]], config: dict[str, Any] | None = None, title: str = ""
) -> Any:
    """What the agent does, against environment steps (all workers together).

    Panels (each figure is over the recent episodes the driver averages,
    ``run.recent_episodes``):

    1. episode return (mean);
    2. success rate and collision rate, % of episodes;
    3. route completion (mean), % of the route;
    4. mean speed, km/h, with the task's target speed when ``config.yaml`` has it.

    Lines whose ``episode`` is null (no episode finished yet) are left out.
    """
    fig, axes = _figure(2, 2, f"{title}: rollout", (12, 8))
    x = ("env_steps",)
    ax = axes[0]
    _plot(ax, records, x, ("episode", "return_mean"), "return (mean)")
    _style(ax, "Episode return", "return", "environment steps")
    ax = axes[1]
    _plot(ax, records, x, ("episode", "success_rate"), "success", scale=100.0)
    _plot(ax, records, x, ("episode", "collision_rate"), "collision", scale=100.0)
    _style(ax, "Success and collision rate", "% of episodes", "environment steps")
    ax.set_ylim(-3, 103)
    ax = axes[2]
    _plot(ax, records, x, ("episode", "route_completion_mean"), "route completion", scale=100.0)
    _style(ax, "Route completion (mean)", "% of route", "environment steps")
    ax.set_ylim(-3, 103)
    ax = axes[3]
    _plot(ax, records, x, ("episode", "mean_speed_kmh"), "mean speed")
    target = _num(_dig(config, ("task", "target_speed_mps")))
    if target is not None and _has_data(ax):
        ax.axhline(target * 3.6, color="grey", linestyle="--", label="target speed")
    _style(ax, "Mean speed", "km/h", "environment steps")
    return fig


def learner_figure(
    records: Sequence[dict[str, Any]], config: dict[str, Any] | None = None, title: str = ""
) -> Any:
    """Whether the learner learns, against learner updates (latest values per line).

    Panels:

    1. critic loss: the sum of both critics' mean squared TD errors (log scale);
    2. actor loss: −mean Q1 of the actor's action plus the pre-tanh penalty
       (lower = higher Q), and on the right axis the actor saturation, the
       share of actions at ±1 (near 1: the tanh passes no gradient and the
       policy is stuck at the bounds);
    3. Q values: mean Q1, mean Q2 and the mean TD target (diverging or
       steadily growing values are overestimation);
    4. actor gradient L2 norm before and after clipping (log scale), with
       ``learner.actor_max_grad_norm`` from ``config.yaml`` as a line;
    5. the same for the critic;
    6. encoder weight change ‖w − w₀‖ / ‖w₀‖ of the actor's and the critic's
       CNN: a flat zero means the encoders do not learn (the reference
       system's failure).

    The first non-finite loss, if any, is marked on the loss panels.
    """
    fig, axes = _figure(3, 2, f"{title}: learner", (12, 11))
    x = ("learner_updates",)
    xlabel = "learner updates"

    def key(name: str) -> tuple[str, str]:
        return ("learner", name)

    ax = axes[0]
    _plot(ax, records, x, key(M.CRITIC_LOSS), "critic", log=True)
    _style(ax, "Critic loss (TD MSE, both critics)", "loss (log)", xlabel, log=True)
    ax = axes[1]
    _plot(ax, records, x, key(M.ACTOR_LOSS), "actor", color="C1")
    _style(ax, "Actor loss (−mean Q1 + penalty), saturation", "loss", xlabel)
    saturation_ax = ax.twinx()
    _plot(
        saturation_ax,
        records,
        x,
        key(M.ACTOR_SATURATION),
        "saturation",
        color="C3",
        linestyle=":",
    )
    saturation_ax.set_ylim(-0.02, 1.02)
    saturation_ax.set_ylabel("share of actions at ±1", color="C3")
    for ax in axes[:2]:
        for name in (M.CRITIC_LOSS, M.ACTOR_LOSS):
            bad = _first_non_finite(records, x, key(name))
            if bad is not None:
                ax.axvline(bad, color="red", linestyle=":", label="first non-finite loss")
                ax.legend(loc="best", fontsize="small")
                break
    ax = axes[2]
    _plot(ax, records, x, key(M.Q1_MEAN), "Q1")
    _plot(ax, records, x, key(M.Q2_MEAN), "Q2")
    _plot(ax, records, x, key(M.TARGET_Q_MEAN), "TD target", linestyle="--")
    _style(ax, "Q values (batch mean)", "Q", xlabel)
    for ax, net, pre, post in (
        (axes[3], "actor", M.ACTOR_GRAD_NORM_PRECLIP, M.ACTOR_GRAD_NORM_POSTCLIP),
        (axes[4], "critic", M.CRITIC_GRAD_NORM_PRECLIP, M.CRITIC_GRAD_NORM_POSTCLIP),
    ):
        _plot(ax, records, x, key(pre), "before clipping", log=True)
        _plot(ax, records, x, key(post), "after clipping", log=True, linestyle="--")
        clip = _num(_dig(config, ("learner", f"{net}_max_grad_norm")))
        if clip is not None and clip > 0 and _has_data(ax):
            ax.axhline(clip, color="grey", linestyle=":", label=f"max_grad_norm {clip:g}")
        _style(ax, f"{net.capitalize()} gradient L2 norm", "norm (log)", xlabel, log=True)
    ax = axes[5]
    _plot(ax, records, x, key(M.ACTOR_ENCODER_WEIGHT_DELTA), "actor encoder")
    _plot(ax, records, x, key(M.CRITIC_ENCODER_WEIGHT_DELTA), "critic encoder")
    _style(ax, "Encoder weight change", "‖w − w₀‖ / ‖w₀‖", xlabel)
    return fig


def system_figure(records: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Throughput, replay and staleness, against wall time (minutes since start).

    Panels:

    1. environment steps per second (all workers);
    2. learner updates per second;
    3. replay size, transitions (all shards);
    4. replay memory, MB (all shards);
    5. bytes per stored transition, and the compression ratio
       (uncompressed / held bytes) on the right axis;
    6. policy lag: mean learner updates between acting and training on a sample.
    """
    fig, axes = _figure(3, 2, f"{title}: throughput, replay, policy lag", (12, 10))
    x = ("time_s",)
    xlabel = "wall time (min)"
    minutes = 1.0 / 60.0
    ax = axes[0]
    _plot(ax, records, x, ("env_steps_per_s",), "env steps/s", xscale=minutes)
    _style(ax, "Environment steps per second", "steps/s", xlabel, count_x=False)
    ax = axes[1]
    _plot(ax, records, x, ("updates_per_s",), "updates/s", xscale=minutes, color="C1")
    _style(ax, "Learner updates per second", "updates/s", xlabel, count_x=False)
    ax = axes[2]
    _plot(ax, records, x, ("replay", "size"), "held", xscale=minutes)
    _style(ax, "Replay size", "transitions", xlabel, count_x=False)
    _eng_y(ax)
    ax = axes[3]
    _plot(ax, records, x, ("replay", "bytes"), "held", xscale=minutes, scale=1e-6)
    _style(ax, "Replay memory", "MB", xlabel, count_x=False)
    ax = axes[4]
    _plot(ax, records, x, ("replay", "bytes_per_transition"), "bytes/transition", xscale=minutes)
    _style(ax, "Bytes per transition and compression", "bytes/transition", xlabel, count_x=False)
    right = ax.twinx()
    _plot(
        right,
        records,
        x,
        ("replay", "compression_ratio"),
        "compression ratio",
        xscale=minutes,
        color="C2",
        linestyle="--",
    )
    right.set_ylabel("uncompressed / held")
    if not _has_data(right):
        right.set_yticks([])
    elif _has_data(ax):
        handles, labels = ax.get_legend_handles_labels()
        more_handles, more_labels = right.get_legend_handles_labels()
        ax.legend(handles + more_handles, labels + more_labels, loc="best", fontsize="small")
    else:
        right.legend(loc="best", fontsize="small")
    ax = axes[5]
    _plot(ax, records, x, ("policy_lag_updates_mean",), "policy lag", xscale=minutes)
    _style(ax, "Policy lag", "learner updates", xlabel, count_x=False)
    return fig


# --- helpers -----------------------------------------------------------------


def _figure(rows: int, cols: int, title: str, size: tuple[float, float]) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # Agg canvas on savefig; no pyplot state

    fig = Figure(figsize=size, layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    return fig, axes


def _style(
    ax: Any, title: str, ylabel: str, xlabel: str, *, log: bool = False, count_x: bool = True
) -> None:
    """Titles, labels, grid and legend; ``count_x``: x is a count (10k, 2M ticks)."""
    from matplotlib.ticker import EngFormatter

    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not _has_data(ax):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        return
    if count_x:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")


def _eng_y(ax: Any) -> None:
    from matplotlib.ticker import EngFormatter

    ax.yaxis.set_major_formatter(EngFormatter(sep=""))


def _has_data(ax: Any) -> bool:
    return any(len(line.get_xdata()) for line in ax.get_lines())


def _plot(
    ax: Any,
    records: Sequence[dict[str, Any]],
    x_key: Sequence[str],
    y_key: Sequence[str],
    label: str,
    *,
    log: bool = False,
    scale: float = 1.0,
    xscale: float = 1.0,
    **style: Any,
) -> None:
    xs, ys = _series(records, x_key, y_key, positive=log)
    if xs:
        ax.plot(
            [v * xscale for v in xs],
            [v * scale for v in ys],
            label=label,
            marker="." if len(xs) < 30 else None,
            **style,
        )


def _series(
    records: Iterable[dict[str, Any]],
    x_key: Sequence[str],
    y_key: Sequence[str],
    *,
    positive: bool = False,
) -> tuple[list[float], list[float]]:
    """Points where both values are finite numbers (and y > 0 if ``positive``)."""
    xs: list[float] = []
    ys: list[float] = []
    for record in records:
        x, y = _num(_dig(record, x_key)), _num(_dig(record, y_key))
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        if positive and y <= 0:
            continue
        xs.append(x)
        ys.append(y)
    return xs, ys


def _first_non_finite(
    records: Iterable[dict[str, Any]], x_key: Sequence[str], y_key: Sequence[str]
) -> float | None:
    for record in records:
        x, y = _num(_dig(record, x_key)), _dig(record, y_key)
        # json.loads reads NaN/Infinity as floats; a driver may also write them as strings.
        bad = (isinstance(y, float) and not math.isfinite(y)) or (
            isinstance(y, str) and y.strip().lower() in {"nan", "inf", "-inf", "infinity"}
        )
        if bad and x is not None and math.isfinite(x):
            return x
    return None


def _dig(data: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _read_config(path: Path) -> dict[str, Any] | None:
    """The run's resolved config as a plain mapping, or None (absent or unreadable:
    the figures then go without reference lines)."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        log.warning("%s: unreadable, plotting without reference lines: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as ``(dotted key, leaf value)`` pairs, depth first
    (``{"a": {"b": 1}}`` → ``[("a.b", 1)]``; a bare value is ``("(value)", v)``)."""
    if isinstance(data, dict):
        items: list[tuple[str, Any]] = []
        for key, value in data.items():
            items.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return [(prefix or "(value)", data)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)
