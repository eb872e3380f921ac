"""The ``td3drive`` command line.

Subcommands:

* ``td3drive train``: the main job (see :mod:`td3drive.driver`).
* ``td3drive evaluate``: the deterministic policy of a checkpoint.
* ``td3drive report``: plots of a run directory.
* ``td3drive sweep``: a grid of short trainings on Ray Tune.

* ``td3drive bench learner``: TD3 updates/s against a plain-PyTorch reference.
* ``td3drive bench replay``: replay memory and speed against a naive buffer.
* ``td3drive bench rollout``: collection speed of 1 and N workers.
* ``td3drive bench learning``: encoder modes compared on the embedded simulator.
* ``td3drive carla-check``: probe a CARLA server.

Heavy imports (torch) happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from td3drive.learning_bench import DEFAULT_VARIANTS, VARIANTS

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
    learner = benches.add_parser(
        "learner",
        help="TD3 updates/s (separate and shared encoders) vs a plain-PyTorch reference loop",
        description="Measures TD3Learner.update() throughput for the 'separate' and "
        "'shared' encoder modes at each batch size, and in the same run a minimal TD3 "
        "loop in plain PyTorch with the same networks. overhead_ratio = ours / reference "
        "('separate', largest batch); 1.0 means the learner's validation, clipping and "
        "metrics cost nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    learner.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    learner.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="torch device"
    )
    learner.add_argument(
        "--batch-size",
        type=_positive_int,
        nargs="+",
        default=[100, 256],
        metavar="N",
        help="batch sizes to measure",
    )
    learner.add_argument(
        "--updates", type=_positive_int, default=32, help="timed updates per row and side"
    )
    learner.add_argument("--warmup", type=int, default=3, help="untimed updates before timing")
    learner.set_defaults(handler=_bench_learner)

    replay = benches.add_parser(
        "replay",
        help="replay shard memory, insert and sample speed vs a naive uint8 buffer",
        description="Fills one replay shard (compressed chunks, frames stored once) and a "
        "naive buffer that stores obs and next_obs as uint8 arrays (SB3's "
        "DictReplayBuffer layout) with the same transitions, and reports "
        "bytes_per_transition, naive_bytes_per_transition, memory_ratio, "
        "insert_transitions_per_s and sample_batches_per_s for both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    replay.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    replay.add_argument(
        "--source",
        choices=("synthetic", "racetrack"),
        default="synthetic",
        help="frames: synthetic driving-like frames, or the embedded simulator's "
        "(driven by the scripted lane follower with steering noise)",
    )
    replay.add_argument(
        "--transitions", type=_positive_int, default=8192, help="transitions in each buffer"
    )
    replay.add_argument("--chunk-steps", type=_positive_int, default=64, help="steps per chunk")
    replay.add_argument("--batch-size", type=_positive_int, default=256, help="sample size")
    replay.add_argument(
        "--sample-batches", type=_positive_int, default=40, help="batches timed per side"
    )
    replay.set_defaults(handler=_bench_replay)

    rollout = benches.add_parser(
        "rollout",
        help="env steps/s of 1 and N rollout workers on the embedded simulator",
        description="Runs rollout workers as Ray actors (policy acting, chunks pushed to "
        "replay shards) and reports env steps/s for each worker count, the scaling "
        "efficiency aggregate / (N x single), the bare environment's steps/s as the "
        "baseline, and the policy's inference latency at batch 1 on one thread.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    rollout.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    rollout.add_argument(
        "--workers",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 2],
        metavar="N,M",
        help="comma-separated worker counts",
    )
    rollout.add_argument(
        "--steps", type=_positive_int, default=400, help="timed env steps per worker"
    )
    rollout.set_defaults(handler=_bench_rollout)

    learning = benches.add_parser(
        "learning",
        help="encoder modes side by side: frozen, separate, shared, shared+shift",
        description="Trains each variant (frozen / separate / shared / shared with random "
        "shift) on the embedded simulator with the same config, budget and seeds, "
        "evaluating the deterministic policy every --eval-every env steps, and writes "
        "learning.json (mean and std over seeds per checkpoint, wall-clock, updates/s) and "
        "learning.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    learning.add_argument(
        "--config",
        type=Path,
        default=Path("deploy/bench-learning-cpu.yaml"),
        help="base configuration",
    )
    learning.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    learning.add_argument("--env-steps", type=_positive_int, default=4000, help="budget per run")
    learning.add_argument("--seeds", type=_positive_int, default=2, help="seeds per variant")
    learning.add_argument(
        "--eval-every", type=_positive_int, default=1000, help="env steps between evaluations"
    )
    learning.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    learning.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated variants from " + ",".join(VARIANTS) + " (separate-relu-plain: "
        "the earlier NatureCNN ReLU output without the pre-tanh penalty)",
    )
    learning.add_argument(
        "--out", type=Path, default=Path("bench-results/learning"), help="output directory"
    )
    learning.set_defaults(handler=_bench_learning)

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
        "checkpoints/. Prometheus metrics are served on run.metrics_port.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="YAML run configuration (see deploy/)")
    source.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run"
    )
    train.add_argument("--run-dir", type=Path, help="run directory (default runs/<timestamp>)")
    train.add_argument("--total-env-steps", type=_positive_int, help="override run.total_env_steps")
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
        help="run the deterministic policy of a checkpoint and report episode metrics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="learner checkpoint")
    evaluate.add_argument("--episodes", type=_positive_int, default=5, help="episodes to run")
    evaluate.add_argument(
        "--env", default="td3drive/Racetrack-v0", help="gymnasium id of the environment"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="base seed of the episodes")
    evaluate.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser(
        "report",
        help="PNG plots of a run's metrics (rollout and learner curves)",
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


def _bench_learning(args: argparse.Namespace) -> int:
    from td3drive.config import ConfigError, load_config
    from td3drive.learning_bench import run_learning_benchmark

    try:
        base = load_config(args.config)
        report = run_learning_benchmark(
            base,
            args.out,
            env_steps=args.env_steps,
            seeds=args.seeds,
            eval_every=args.eval_every,
            device=args.device,
            variants=[v.strip() for v in args.variants.split(",") if v.strip()],
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (ConfigError, ValueError) as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    _emit(report, args.json)
    print(f"wrote {args.out / 'learning.json'} and {args.out / 'learning.png'}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from td3drive.config import ConfigError, load_config
    from td3drive.sweep import parse_grid, run_sweep

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

    from td3drive.config import ConfigError, apply_overrides, config_from_dict, load_config
    from td3drive.driver import (
        LiveDisplay,
        TrainingError,
        TrainingRun,
        console_logger,
        load_run_config,
        resolve_run_dir,
    )

    logging.basicConfig(level=logging.WARNING)
    overrides = list(args.overrides)
    if args.total_env_steps:
        overrides.append(f"run.total_env_steps={args.total_env_steps}")
    try:
        if args.resume:
            run_dir = args.resume
            config = load_run_config(run_dir)
            if overrides:
                raw = config.model_dump(mode="json")
                apply_overrides(raw, overrides)
                config = config_from_dict(raw, source=f"{run_dir}/config.yaml + --set")
        else:
            config = load_config(args.config, overrides)
            run_dir = resolve_run_dir(args.run_dir)
    except ConfigError as exc:
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
    except TrainingError as exc:
        print(f"td3drive: training stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    evaluation = summary["eval"]
    emit(
        f"done: {summary['env_steps']} env steps, {summary['learner_updates']} updates in "
        f"{summary['wall_s']:.0f} s; eval return {evaluation.get('return_mean')}, "
        f"success {evaluation.get('success_rate')}"
    )
    emit(f"summary: {run_dir / 'summary.json'}")
    emit(f"plots: td3drive report {run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from learner.networks import load_policy_weights, policy_for
    from learner.td3 import CheckpointError, TD3Learner
    from rollout_workers.evaluation import evaluate_policy, summarize

    try:
        learner = TD3Learner.from_checkpoint(args.checkpoint, device="cpu")
    except CheckpointError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    config = learner.config
    policy = policy_for(config)
    load_policy_weights(policy, learner.policy_weights()[1])
    episodes = evaluate_policy(policy, args.env, None, args.episodes, args.seed)
    result = {
        "checkpoint": str(args.checkpoint),
        "policy_version": learner.updates,
        "env": args.env,
        "summary": summarize(episodes),
        "episodes": episodes,
    }
    _emit(result, args.json)
    return 0


def _report(args: argparse.Namespace) -> int:
    from td3drive.report import ReportError, make_report

    try:
        paths = make_report(args.run_dir)
    except ReportError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _carla_check(args: argparse.Namespace) -> int:
    from rollout_workers import carla_check

    argv = ["--host", args.host, "--port", str(args.port), "--timeout", str(args.timeout)]
    return carla_check.main([*argv, "--json"] if args.json else argv)


def _bench_rollout(args: argparse.Namespace) -> int:
    from td3drive.rollout_bench import run_rollout_benchmark

    try:
        report = run_rollout_benchmark(
            workers=args.workers,
            steps_per_worker=args.steps,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    _emit(report, args.json)
    return 0


def _racetrack_transitions(count: int) -> list[Any]:
    """``count`` transitions of the embedded simulator driven by the scripted
    lane follower with N(0, 0.3) steering noise (long, varied episodes)."""

    import gymnasium as gym
    import numpy as np

    import rollout_workers
    from rollout_workers.scripted import lane_follower
    from td3drive.spec import Transition

    env = gym.make(rollout_workers.RACETRACK_ID)
    rng = np.random.default_rng(0)
    steps: list[Transition] = []
    episode = 0
    while len(steps) < count:
        obs, _ = env.reset(seed=episode)
        step = 0
        while len(steps) < count:
            action = lane_follower(obs["vector"])
            action[0] = np.clip(action[0] + rng.normal(0, 0.3), -1, 1)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            last = len(steps) == count - 1
            steps.append(
                Transition(
                    obs,
                    action,
                    float(reward),
                    next_obs,
                    bool(terminated),
                    bool(truncated or last),
                    0,
                    episode,
                    step,
                )
            )
            obs, step = next_obs, step + 1
            if terminated or truncated:
                break
        episode += 1
    env.close()
    return steps


def _bench_replay(args: argparse.Namespace) -> int:
    from buffer_service.benchmark import run_replay_benchmark

    try:
        report = run_replay_benchmark(
            transitions=args.transitions,
            chunk_steps=args.chunk_steps,
            batch_size=args.batch_size,
            sample_batches=args.sample_batches,
            source=args.source,
            episodes_source=_racetrack_transitions if args.source == "racetrack" else None,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
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


def _bench_learner(args: argparse.Namespace) -> int:
    from learner.benchmark import run_learner_benchmark

    rounds = min(16, args.updates)
    print(
        f"bench learner: device={args.device} batch sizes={args.batch_size} "
        f"updates={args.updates} per row and side (interleaved in {rounds} rounds)",
        file=sys.stderr,
        flush=True,
    )
    report = run_learner_benchmark(
        device=args.device,
        batch_sizes=args.batch_size,
        updates=args.updates,
        warmup=args.warmup,
        rounds=rounds,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    _emit(report, args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``td3drive`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # e.g. --device cuda without a GPU
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
