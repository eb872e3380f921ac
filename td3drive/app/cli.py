"""The ``td3drive`` command line.

Subcommands:

* ``td3drive train``: the main job (see :mod:`td3drive.app.driver`).
* ``td3drive evaluate``: the deterministic policy of a checkpoint, under its run's settings.
* ``td3drive report``: plots of a run directory.
* ``td3drive sweep``: a grid of short trainings on Ray Tune.

* ``td3drive bench learner``: TD3 updates/s against a plain-PyTorch reference.
* ``td3drive bench replay``: replay memory and speed against a naive buffer.
* ``td3drive bench pipeline``: the learner's data feed on Ray, batches/s vs shards.
* ``td3drive bench rollout``: collection speed of 1 and N workers.
* ``td3drive bench learning``: encoder modes compared on the embedded simulator.
* ``td3drive carla-check``: probe a CARLA server.

Each ``bench`` subcommand is a module of :mod:`td3drive.bench` with the same
shape (``HELP``, ``DESCRIPTION``, ``add_arguments``, ``run``, ``format_table``),
all run by one handler.

Heavy imports (torch) happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from td3drive.app.arguments import positive_int

if TYPE_CHECKING:
    from td3drive.contracts.config import LearnerConfig, TD3DriveConfig


class _Bench(Protocol):
    """What every module of :mod:`td3drive.bench` behind ``td3drive bench`` offers."""

    HELP: str
    DESCRIPTION: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(
        self, args: argparse.Namespace, progress: Callable[[str], None] = ...
    ) -> dict[str, Any]: ...

    def format_table(self, report: dict[str, Any]) -> str: ...


def _bench_modules() -> dict[str, _Bench]:
    """``td3drive bench NAME`` -> its module, in the order ``--help`` lists them.

    Their top-level imports are light (torch loads when a benchmark runs)."""
    from td3drive.bench import learner, learning, pipeline, replay, rollout

    return {
        "learner": learner,
        "replay": replay,
        "pipeline": pipeline,
        "rollout": rollout,
        "learning": learning,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="td3drive",
        description="Distributed TD3 from pixels on Ray: train, evaluate and benchmark "
        "a driving agent whose CNN encoders learn through the actor and critic losses.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="measure a component against its baseline, side by side",
        description="Benchmarks print their figures and can write them as JSON.",
    )
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, module in _bench_modules().items():
        formatter = getattr(module, "FORMATTER_CLASS", argparse.ArgumentDefaultsHelpFormatter)
        sub = benches.add_parser(
            name, help=module.HELP, description=module.DESCRIPTION, formatter_class=formatter
        )
        sub.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
        module.add_arguments(sub)
        sub.set_defaults(handler=_bench)

    sweep = commands.add_parser(
        "sweep",
        help="short trainings over a grid of config values (Ray Tune), tabulated",
        description="Runs one training per grid point as a Ray Tune trial (one at a time) "
        "and tabulates each point's evaluation return, success, route completion, speed, "
        "wall-clock and updates/s into OUT/sweep.md and OUT/sweep.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sweep.add_argument("--config", type=Path, required=True, help="base configuration")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="SECTION.KEY=V1,V2",
        help="values to try (repeatable; the grid is their product)",
    )
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a base value for every point, e.g. --set run.total_env_steps=2000",
    )
    sweep.add_argument("--out", type=Path, default=Path("bench-results/sweep"), help="output dir")
    sweep.set_defaults(handler=_sweep)

    train = commands.add_parser(
        "train",
        help="train on Ray from a YAML config until the env-step budget",
        description="Starts replay shards, rollout workers, the learner and an evaluation "
        "worker on the Ray cluster this runs in (ray job submit) or on a local Ray "
        "instance, trains until run.total_env_steps, evaluates the deterministic policy "
        "and writes the run directory: config.yaml, metrics.jsonl, summary.json, "
        "checkpoints/. The run location is, first match wins: --resume RUN; --run-dir "
        "RUN; <run.storage_path>/<UTC timestamp>; ./runs/<UTC timestamp>. A location is a "
        "local path (a relative one is made absolute here, against this directory, before "
        "any actor sees it) or a pyarrow.fs URI (s3://bucket/prefix, gs://bucket/prefix, "
        "file:///abs/path); the driver, the learner and every replay shard write there, so "
        "on a cluster it must be storage every node reaches (a shared filesystem mounted "
        "at the same path, or a bucket). Prometheus metrics are served on "
        "run.metrics_port. Before Ray starts it checks the run location, the checkpoint "
        "to resume and the metrics port; a failed check prints one line and exits 2 "
        "without writing anything. SIGTERM (ray job stop) or Ctrl-C saves the run and "
        "exits 128+signal.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="YAML run configuration (see deploy/)")
    source.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run at RUN (a path or a URI such as s3://bucket/runs/NAME) from "
        "its checkpoints (the one way to reuse a run location); its run.storage_path is "
        "not used",
    )
    train.add_argument(
        "--run-dir",
        metavar="RUN",
        help="the run location itself, a path or a URI (default: "
        "<run.storage_path>/<UTC timestamp>, run.storage_path defaulting to ./runs); a new "
        "or empty one, unless --overwrite",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a --run-dir that holds a previous run: remove that run's files "
        "(config.yaml, checkpoints/, metrics.jsonl, eval and summary files, report/) first; "
        "other files are kept, and a directory that is not a td3drive run is never touched",
    )
    train.add_argument("--total-env-steps", type=positive_int, help="override run.total_env_steps")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set learner.batch_size=64",
    )
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate",
        help="run the deterministic policy of a checkpoint under its run's settings",
        description="Runs the checkpoint's deterministic policy for --episodes episodes on "
        "the environment its run trained on, built as the training evaluator builds it: "
        "rollout.env_id with rollout.env_kwargs plus the task (and carla) sections of the "
        "run's config.yaml (RUN_DIR/config.yaml for RUN_DIR/checkpoints/learner.pt), seeds "
        "from run.eval_seed (the training evaluator's episodes). --config names another "
        "config file; --env and --set override "
        "single settings. A checkpoint outside a run directory is evaluated under the "
        "default settings, with a warning. Prints the episode metrics as JSON, with "
        "config_source, env_id, env_kwargs and seed. --video PATH also writes a clip "
        "(.mp4 or .gif) of the first --video-episodes episodes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = evaluate.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="learner checkpoint, e.g. RUN_DIR/checkpoints/learner.pt",
    )
    target.add_argument(
        "--run-dir",
        type=Path,
        metavar="RUN_DIR",
        help="a run directory: evaluates RUN_DIR/checkpoints/learner.pt under RUN_DIR/config.yaml",
    )
    evaluate.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="YAML run configuration to evaluate under, instead of the run's config.yaml",
    )
    evaluate.add_argument("--episodes", type=positive_int, default=10, help="episodes to run")
    evaluate.add_argument(
        "--env",
        metavar="ID",
        help="gymnasium id of the environment; None: the run's rollout.env_id",
    )
    evaluate.add_argument(
        "--seed", type=int, help="base seed of the episodes; None: the run's run.eval_seed"
    )
    evaluate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable), e.g. --set task.max_episode_steps=200",
    )
    evaluate.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    evaluate.add_argument(
        "--video",
        type=Path,
        metavar="PATH",
        help="also write a clip of the episodes, PATH ending in .mp4 (H.264, small, streamed) "
        "or .gif (short clips: held in memory): the env's render beside the 84x84 frame the "
        "policy saw, with speed, steer and throttle/brake; one frame per env step",
    )
    evaluate.add_argument(
        "--video-episodes",
        type=positive_int,
        default=1,
        metavar="N",
        help="record the first N episodes (the same seeds every evaluation, so clips of "
        "different checkpoints show the same start); at most --episodes",
    )
    evaluate.add_argument(
        "--video-fps",
        type=float,
        metavar="FPS",
        help="frames per second of the clip; None: the env's render_fps (the racetrack's "
        "5 = real time)",
    )
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser(
        "report",
        help="PNG plots of a run's metrics and an HTML page with them and its latest clip",
        description="Writes RUN_DIR/report/: rollout.png, learner.png and system.png from "
        "metrics.jsonl, and index.html with those curves, summary.json, the latest "
        "evaluation (eval.jsonl) and the latest evaluation clip in RUN_DIR/videos/ "
        "(*.mp4 or *.gif, embedded by relative path, with a few frames as PNGs in "
        "report/frames/). Prints the summary and the files written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory")
    report.set_defaults(handler=_report)

    check = commands.add_parser(
        "carla-check",
        help="is a CARLA server reachable, which version, does a tick round trip work",
        description="Probes one CARLA server read-only (it never changes the server's "
        "settings) and prints its version, map and a tick round trip. Exit code 0 when "
        "the server answers and ticks, 1 otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    check.add_argument("--host", default="localhost", help="server host")
    check.add_argument("--port", type=int, default=2000, help="RPC port")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=_carla_check)
    return parser


def _sweep(args: argparse.Namespace) -> int:
    from td3drive.app.sweep import parse_grid, run_sweep
    from td3drive.contracts.config import ConfigError, load_config

    try:
        base = load_config(args.config, args.overrides)
        grid = parse_grid(args.grid)
        rows = run_sweep(
            base, grid, args.out, progress=lambda line: print(line, file=sys.stderr, flush=True)
        )
    except ConfigError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2, default=str))
    return 0 if all("error" not in row for row in rows) else 1


def _train(args: argparse.Namespace) -> int:
    import logging

    from td3drive.app.driver import (
        CONFIG_FILE,
        LiveDisplay,
        TrainingError,
        TrainingRun,
        closing_lines,
        console_logger,
        load_run_config,
        resolve_run_dir,
    )
    from td3drive.app.preflight import (
        PreflightError,
        check_metrics_port,
        check_resume_checkpoint,
        check_run_dir,
    )
    from td3drive.contracts.config import (
        ConfigError,
        apply_overrides,
        config_from_dict,
        load_config,
    )
    from td3drive.contracts.storage import StorageError, join_location, resolve_location

    logging.basicConfig(level=logging.WARNING)
    overrides = list(args.overrides)
    if args.total_env_steps:
        overrides.append(f"run.total_env_steps={args.total_env_steps}")
    # Preflight: everything that can be checked before Ray starts, in one line
    # each, exit 2, nothing written (--overwrite empties the directory last).
    try:
        # The run location as every actor will open it: an absolute path or a URI.
        if args.resume:
            run_dir = resolve_location(args.resume)
            check_run_dir(run_dir, resume=True, overwrite=args.overwrite)
            config = load_run_config(run_dir)
            if overrides:
                raw = config.model_dump(mode="json")
                apply_overrides(raw, overrides)
                config = config_from_dict(
                    raw, source=f"{join_location(run_dir, CONFIG_FILE)} + --set"
                )
            check_resume_checkpoint(run_dir, config)
            check_metrics_port(config.run.metrics_port)
        else:
            config = load_config(args.config, overrides)
            run_dir = resolve_run_dir(args.run_dir, config.run.storage_path)
            check_metrics_port(config.run.metrics_port)
            check_run_dir(run_dir, resume=False, overwrite=args.overwrite)
    except (PreflightError, StorageError) as exc:
        print(f"td3drive: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ConfigError as exc:  # a config lists one invalid field a line: keep them
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    display = LiveDisplay(config.run.total_env_steps) if sys.stderr.isatty() else None
    emit = display.log if display is not None else console_logger()
    emit(f"run directory: {run_dir}")
    try:
        run = TrainingRun(
            config,
            run_dir,
            resume=bool(args.resume),
            log_line=emit,
            on_report=display.update if display is not None else None,
        )
        if display is not None:
            with display:
                summary = run.run()
        else:
            summary = run.run()
    except TrainingError as exc:  # driver.RunStopped (SIGTERM/SIGINT) carries 128 + signal
        print(f"td3drive: training stopped: {_one_line(exc)}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 1))
    except ConfigError as exc:  # prometheus.MetricsPortError: the port was taken meanwhile
        print(f"td3drive: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    for line in closing_lines(summary, run_dir):
        emit(line)
    return 0


def evaluation_settings(
    checkpoint: Path,
    learner_config: LearnerConfig,
    *,
    run_dir: Path | None = None,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    env_id: str | None = None,
) -> tuple[TD3DriveConfig, str]:
    """The run configuration a checkpoint is evaluated under, and where it came from.

    The source, first match wins: ``config_path``; ``run_dir/config.yaml``
    when ``run_dir`` is given; the run directory the checkpoint lies in
    (``RUN_DIR/config.yaml`` for ``RUN_DIR/checkpoints/<file>``); else the
    defaults (:class:`td3drive.contracts.config.TD3DriveConfig` with the checkpoint's
    ``learner`` section), reported as ``"defaults"``. ``overrides``
    (``section.key=value``, as ``td3drive train --set``) and then ``env_id``
    (``rollout.env_id``) are applied before validation.

    Args:
        checkpoint: the learner checkpoint being evaluated.
        learner_config: the checkpoint's own :class:`td3drive.contracts.config.LearnerConfig`.
        run_dir: an explicit run directory (``--run-dir``).
        config_path: an explicit configuration file (``--config``).
        overrides: ``section.key=value`` strings.
        env_id: replaces ``rollout.env_id`` when given.

    Returns:
        ``(TD3DriveConfig, source)`` where ``source`` is the path of the file
        read or ``"defaults"``.

    Raises:
        td3drive.contracts.config.ConfigError: an unreadable or invalid config file, a
            ``run_dir`` without ``config.yaml``, a malformed override, or a
            result that does not validate.
    """
    from td3drive.app.driver import CONFIG_FILE, load_run_config
    from td3drive.contracts.config import (
        ConfigError,
        ReplayConfig,
        apply_overrides,
        config_from_dict,
        load_config,
    )

    raw: dict[str, Any]
    if config_path is not None:
        source = str(config_path)
        raw = load_config(config_path).model_dump(mode="json")
    else:
        if run_dir is None:
            located = checkpoint.resolve()
            if located.parent.name == "checkpoints":
                candidate = located.parent.parent
                if (candidate / CONFIG_FILE).exists():
                    run_dir = candidate
        if run_dir is not None:
            source = str(run_dir / CONFIG_FILE)
            raw = load_run_config(run_dir).model_dump(mode="json")
        else:
            source = "defaults"
            raw = {"learner": learner_config.model_dump(mode="json")}
            # Replay settings do not matter to an evaluation; keep the default
            # replay section valid with the checkpoint's batch size.
            min_size = max(ReplayConfig().min_size_to_sample, learner_config.batch_size)
            raw["replay"] = {"min_size_to_sample": min_size}
    apply_overrides(raw, list(overrides))
    if env_id is not None:
        rollout = raw.setdefault("rollout", {})
        if not isinstance(rollout, dict):
            raise ConfigError(f"{source}: rollout is not a section")
        rollout["env_id"] = env_id
    changed = " + --set" if overrides else ""
    changed += " + --env" if env_id is not None else ""
    return config_from_dict(raw, source=source + changed), source


def _one_line(exc: Exception) -> str:
    """An exception's message on one line (config errors list one field a line)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(value, default=str))


def _evaluate(args: argparse.Namespace) -> int:
    import gymnasium as gym

    from learner.td3 import CheckpointError, load_policy_checkpoint
    from rollout_workers.evaluation import evaluate_policy, summarize
    from rollout_workers.video import EvaluationVideo, VideoError, video_format, write_video
    from rollout_workers.worker import env_kwargs_for
    from td3drive.app.driver import LEARNER_CHECKPOINT
    from td3drive.contracts.config import ConfigError
    from td3drive.contracts.networks import load_policy_weights, policy_for

    checkpoint: Path = args.checkpoint or args.run_dir / LEARNER_CHECKPOINT
    video: EvaluationVideo | None = None
    try:
        # Before any work: a clip that cannot be made fails at once.
        if args.video is not None:
            video = EvaluationVideo(
                video_format(args.video),
                fps=args.video_fps,
                episodes=min(args.video_episodes, args.episodes),
            )
    except VideoError as exc:
        print(f"td3drive: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        # Only the actor's weights, mapped to the CPU: a GPU run's checkpoint
        # evaluates on a laptop.
        saved = load_policy_checkpoint(checkpoint)
        config, source = evaluation_settings(
            checkpoint,
            saved.config,
            run_dir=args.run_dir,
            config_path=args.config,
            overrides=args.overrides,
            env_id=args.env,
        )
    except (CheckpointError, ConfigError) as exc:
        print(f"td3drive: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if source == "defaults":
        print(
            f"td3drive: warning: the run's settings were not found (no config.yaml beside "
            f"{checkpoint} or --config); evaluating under the default settings",
            file=sys.stderr,
        )
    rollout = config.rollout
    # As the training evaluator (EvaluatorActor): the worker after the last one.
    env_kwargs = env_kwargs_for(config, rollout.num_workers)
    seed = config.run.eval_seed if args.seed is None else args.seed
    # The policy's shape is the checkpoint's own: its weights must load.
    policy = policy_for(saved.config)
    load_policy_weights(policy, saved.weights)
    clip: bytes | None = None
    try:
        if video is not None:
            video.caption = f"policy v{saved.version}"
        with video if video is not None else contextlib.nullcontext():
            episodes = evaluate_policy(
                policy, rollout.env_id, env_kwargs, args.episodes, seed, video=video
            )
            clip = video.finish() if video is not None else None
    except VideoError as exc:
        print(f"td3drive: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (gym.error.Error, TypeError, ValueError) as exc:
        print(
            f"td3drive: error: cannot evaluate on {rollout.env_id}: {_one_line(exc)}",
            file=sys.stderr,
        )
        return 2
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "policy_version": saved.version,
        "config_source": source,
        "env_id": rollout.env_id,
        "env_kwargs": _jsonable(env_kwargs),
        "seed": seed,
        "summary": summarize(episodes),
        "episodes": episodes,
    }
    if video is not None and clip is not None:
        path = write_video(args.video, clip).resolve()
        result["video"] = video.describe(str(path), clip)
        print(
            f"wrote {path} ({video.frames} frames of {len(video.recorded_episodes)} "
            f"episode(s), {len(clip) / 1e6:.2f} MB)",
            file=sys.stderr,
        )
    _emit(result, args.json)
    return 0


def _report(args: argparse.Namespace) -> int:
    from td3drive.app.report import ReportError, make_report

    try:
        paths = make_report(args.run_dir)
    except ReportError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _carla_check(args: argparse.Namespace) -> int:
    from rollout_workers.carla import check as carla_check

    argv = ["--host", args.host, "--port", str(args.port), "--timeout", str(args.timeout)]
    return carla_check.main([*argv, "--json"] if args.json else argv)


def _bench(args: argparse.Namespace) -> int:
    """``td3drive bench NAME``: the module's ``run`` with progress lines (and
    its table) on stderr, then the JSON report on stdout and in ``--json``.
    A ``ValueError`` (bad options, an invalid config) is one error line, exit 2."""
    module = _bench_modules()[args.bench]
    try:
        report = module.run(args, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    _emit(report, args.json)
    return 0


def _emit(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``td3drive`` console script; returns the exit code.

    Expected failures end with one line on stderr instead of a traceback:
    ``td3drive: error: ...`` and exit 2 for bad input (configuration,
    preflight, a checkpoint that does not load, RuntimeError such as ``--device
    cuda`` without a GPU), exit 1 for an OS error (a file that cannot be read
    or written, a full disk), 130 for Ctrl-C. Programming errors keep their
    traceback.
    """
    from td3drive.app.preflight import PreflightError
    from td3drive.contracts.config import ConfigError

    args = build_parser().parse_args(argv)
    # As `python -m` and Ray's workers (a local ray.init puts the driver's
    # working directory on their path): a `module:EnvId` module beside the
    # user imports in the driver too.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ConfigError, PreflightError, RuntimeError) as exc:
        print(f"td3drive: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be read or written, a full disk
        print(f"td3drive: error: {_os_error(exc)}", file=sys.stderr)
        return 1


def _os_error(exc: OSError) -> str:
    """``path: reason`` for an OSError (``reason`` alone without a path)."""
    reason = exc.strerror or _one_line(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


if __name__ == "__main__":
    sys.exit(main())
