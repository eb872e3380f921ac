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

Heavy imports (torch) happen inside the subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from td3drive.contracts.config import LearnerConfig, TD3DriveConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from td3drive.bench.learning import DEFAULT_VARIANTS, VARIANTS

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
        help="TD3 updates/s (separate and shared encoders) vs a plain-PyTorch reference loop, "
        "with each speed option on and off",
        description="Measures TD3Learner throughput for the 'separate' and 'shared' encoder "
        "modes at each batch size, and in the same run a minimal TD3 loop in plain PyTorch "
        "with the same networks (the bare fp32 reference). overhead_ratio = ours / reference "
        "('separate', largest batch); 1.0 means the learner's validation, clipping and "
        "metrics cost nothing. 'variants' adds one row per speed option (learner.channels_last, "
        "fused_adam, amp_bf16, compile), one with all of them, and one of the per-update "
        "metrics path, each as updates/s, x reference and x ours; a JSON report goes to stdout "
        "and the table to stderr.",
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
        "--updates", type=_positive_int, default=32, help="timed updates per row and variant"
    )
    learner.add_argument("--warmup", type=int, default=3, help="untimed updates before timing")
    learner.add_argument(
        "--encoder",
        nargs="+",
        choices=("separate", "shared", "frozen"),
        default=["separate", "shared"],
        help="encoder modes to measure",
    )
    learner.add_argument(
        "--options",
        nargs="+",
        metavar="OPTION",
        default=["default"],
        help="speed options with a row each: channels_last fused_adam amp_bf16 compile "
        "compile_reduce_overhead; 'default' = channels_last fused_adam amp_bf16 (no "
        "compilation), 'all' = every one, 'none' = no option rows. CUDA-only ones are listed "
        "as skipped on a CPU",
    )
    learner.add_argument(
        "--config",
        type=Path,
        metavar="YAML",
        help="a run config: torch threads and updates per metrics fetch are taken from its "
        "run.learner_torch_threads / learner_num_cpus and run.learner_updates_per_call "
        "(default: those of the default config)",
    )
    learner.add_argument(
        "--threads",
        type=_positive_int,
        help="torch intra-op threads (overrides --config; default: as the learner actor "
        "would set them: run.learner_torch_threads, else learner_num_cpus rounded down)",
    )
    learner.add_argument(
        "--fetch-every",
        type=_positive_int,
        help="updates between metric fetches of ours (overrides --config; default: "
        "run.learner_updates_per_call)",
    )
    learner.set_defaults(handler=_bench_learner)

    replay = benches.add_parser(
        "replay",
        help="replay shard memory, insert and sample speed vs a naive uint8 buffer and "
        "the legacy sample path",
        description="Fills one replay shard (compressed chunks, frames stored once) and a "
        "naive buffer that stores obs and next_obs as uint8 arrays (SB3's "
        "DictReplayBuffer layout) with the same transitions, and reports "
        "bytes_per_transition, naive_bytes_per_transition, memory_ratio, "
        "insert_transitions_per_s and sample_batches_per_s for both. On the same filled "
        "shard it then compares the sample paths side by side: sample_paths lists "
        "batches/s of the legacy path (per-row loop, decoding under the shard's lock) and "
        "the gather path (each frame decoded once, outside the lock) for each number of "
        "threads sampling at once and each decode pool size, with speedup_vs_legacy; "
        "insert_while_sampling gives the insert rate of the full shard alone and while "
        "one thread samples it flat out with each path (insert_rate_vs_alone); "
        "compressed_shipping measures sending the frames compressed and decoding them at "
        "the receiver (bytes_ratio, shard_batches_per_s, receiver_decode). "
        "sample_batches_per_s is the gather path with 1 thread, "
        "legacy_sample_batches_per_s the legacy one, sample_speedup their ratio.",
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
        "--sample-batches",
        type=_positive_int,
        default=40,
        help="batches timed per sampling thread and row",
    )
    replay.add_argument(
        "--sampler-threads",
        type=_positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated counts of threads calling sample at once",
    )
    replay.add_argument(
        "--decode-threads",
        type=_positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated decode pool sizes of the gather path (1 = no pool)",
    )
    replay.add_argument(
        "--insert-passes",
        type=_positive_int,
        default=2,
        help="times every chunk is re-inserted into the full shard per insert-rate row",
    )
    replay.set_defaults(handler=_bench_replay)

    pipeline = benches.add_parser(
        "pipeline",
        help="the learner's replay feed on Ray: batches/s vs shard count, learner wait share",
        description="Fills S replay shards (Ray actors) with the same chunks, then a consumer "
        "takes batches from the real ReplaySampler and only turns them into torch tensors "
        "on --device. Per shard count, three samplers: size-then-sample (the baseline: "
        "ask every shard its size, then sample, one batch in flight), pipelined (the "
        "real ReplaySampler, decoded samples) and compressed (the real ReplaySampler "
        "with replay.sample_transport compressed: frames travel LZ4-compressed and are "
        "decoded by the sampler on --decode-threads threads). Each row: batches_per_s, "
        "mb_per_s (bytes through Ray's object store), speedup_vs_baseline, "
        "upload_ms_mean, and learner_wait_share: the share of its "
        "time a learner at --learner-updates-per-s would wait for batches (measured by "
        "a consumer that sleeps each update's time; learner_wait_share_estimate is "
        "1 - batches_per_s / rate).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pipeline.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    pipeline.add_argument(
        "--shards",
        type=_positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated shard counts",
    )
    pipeline.add_argument(
        "--source",
        choices=("synthetic", "racetrack"),
        default="synthetic",
        help="frames: synthetic driving-like frames, or the embedded simulator's "
        "(as bench replay --source racetrack)",
    )
    pipeline.add_argument(
        "--transitions",
        type=_positive_int,
        default=8192,
        help="transitions per shard (every shard holds the same chunks)",
    )
    pipeline.add_argument("--chunk-steps", type=_positive_int, default=64, help="steps per chunk")
    pipeline.add_argument("--batch-size", type=_positive_int, default=256, help="batch size")
    pipeline.add_argument(
        "--batches",
        type=_positive_int,
        default=100,
        help="timed batches per shard count, sampler and mode (unpaced, paced)",
    )
    pipeline.add_argument(
        "--warmup", type=int, default=5, help="untimed batches before each timing"
    )
    pipeline.add_argument(
        "--prefetch", type=_positive_int, default=2, help="sampler prefetch depth"
    )
    pipeline.add_argument(
        "--device", default="cpu", help="the learner's torch device (cpu, cuda, cuda:1, ...)"
    )
    pipeline.add_argument(
        "--decode-threads",
        type=_positive_int,
        default=2,
        help="the compressed sampler's decode threads (replay.sample_decode_threads)",
    )
    pipeline.add_argument(
        "--learner-updates-per-s",
        type=float,
        default=500.0,
        help="update rate of the learner whose waiting is measured, updates/s",
    )
    pipeline.set_defaults(handler=_bench_pipeline)

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

    class _LearningHelp(
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
    ):
        pass

    learning = benches.add_parser(
        "learning",
        help="config variants (encoder modes) trained side by side over seeds, with the "
        "median and spread of their evaluations",
        description="""Trains each variant for seeds 0..K-1 (a full training run each) on
the embedded simulator with the same base config and env-step budget, and
evaluates the deterministic policy every --eval-every env steps and at the end,
each time on --eval-episodes episodes with fixed seeds: episode i resets with
run.eval_seed + 10000000 + i whatever the training seed, so every variant,
seed and evaluation point drives the same episodes (runs[].eval_seeds in
learning.json).

Writes into --out: learning.md, a table of the median over seeds with the
interquartile range [q25, q75] and the min-max, of each run's final evaluation
(return, success %, route completion %, collision %, speed km/h) and of its
mean return over the last 3 evaluations; the env steps and wall-clock seconds
to the first evaluation with route completion >= 50% and >= 80% (median over
the seeds that reached it, and e.g. "2/3 reached"); wall-clock s, updates/s,
encoder change and actor saturation (min-max). Its header names the commit
(git rev-parse HEAD, and whether the checkout was dirty), the config file and
the sha256 of the resolved base config, the machine (platform, CPUs, torch
version and threads) and whether the comparison meets the evidence standard
(>= 3 seeds, >= 10 episodes per evaluation). learning.json holds all of it,
per run and aggregated; learning.png plots the median curves with the min-max
band (the IQR band from 5 seeds on).

Results are written after every run ("complete": false until all ran). An
--out that already holds a comparison is refused unless --resume (reuse every
run that completed, after checking that the base config, budget, evaluation
settings, device and each run's resolved config match; an unfinished run is
deleted and trained again from scratch) or --fresh (discard it first).

Variants are overrides of base-config sections (then the bench sets the
seeds, device, budget and evaluation settings):
"""
        + "\n".join(f"  {name}: {json.dumps(overrides)}" for name, overrides in VARIANTS.items()),
        formatter_class=_LearningHelp,
    )
    learning.add_argument(
        "--config",
        type=Path,
        default=Path("deploy/local.yaml"),
        help="base configuration (the default run)",
    )
    learning.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON here")
    learning.add_argument(
        "--env-steps",
        type=_positive_int,
        default=12000,
        help="env-step budget per run (deploy/local.yaml's)",
    )
    learning.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        help="seeds per variant (0..K-1); fewer than 3 is flagged below the evidence standard",
    )
    learning.add_argument(
        "--eval-every", type=_positive_int, default=4000, help="env steps between evaluations"
    )
    learning.add_argument(
        "--eval-episodes",
        type=_positive_int,
        default=10,
        help="episodes per evaluation (run.eval_episodes of every run); fewer than 10 is "
        "flagged below the evidence standard",
    )
    learning.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="learner.device of every run",
    )
    learning.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated variants from " + ",".join(VARIANTS) + " ('default' is the base "
        "config unchanged; separate-relu-plain: the earlier NatureCNN ReLU output without "
        "the pre-tanh penalty)",
    )
    learning.add_argument(
        "--out", type=Path, default=Path("bench-results/learning"), help="output directory"
    )
    again = learning.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison in --out: reuse its completed runs, retrain the rest "
        "(refused when its settings differ)",
    )
    again.add_argument(
        "--fresh", action="store_true", help="discard the comparison in --out and start over"
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
    evaluate.add_argument("--episodes", type=_positive_int, default=10, help="episodes to run")
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
        type=_positive_int,
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


def _bench_learning(args: argparse.Namespace) -> int:
    from td3drive.bench.learning import run_learning_benchmark
    from td3drive.contracts.config import ConfigError, load_config

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
            eval_episodes=args.eval_episodes,
            config_path=args.config,
            resume=args.resume,
            fresh=args.fresh,
        )
    except (ConfigError, ValueError) as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    _emit(report, args.json)
    print(
        f"wrote {args.out / 'learning.md'}, {args.out / 'learning.json'} and "
        f"{args.out / 'learning.png'}",
        file=sys.stderr,
    )
    return 0


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
    from td3drive.contracts.storage import StorageError, resolve_location

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
                config = config_from_dict(raw, source=f"{run_dir}/config.yaml + --set")
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
    from rollout_workers import carla_check

    argv = ["--host", args.host, "--port", str(args.port), "--timeout", str(args.timeout)]
    return carla_check.main([*argv, "--json"] if args.json else argv)


def _bench_rollout(args: argparse.Namespace) -> int:
    from td3drive.bench.rollout import run_rollout_benchmark

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
    from td3drive.contracts.spec import Transition

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
    from td3drive.bench.replay import run_replay_benchmark

    try:
        report = run_replay_benchmark(
            transitions=args.transitions,
            chunk_steps=args.chunk_steps,
            batch_size=args.batch_size,
            sample_batches=args.sample_batches,
            source=args.source,
            episodes_source=_racetrack_transitions if args.source == "racetrack" else None,
            sampler_threads=args.sampler_threads,
            decode_threads=args.decode_threads,
            insert_passes=args.insert_passes,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        print(f"td3drive: error: {exc}", file=sys.stderr)
        return 2
    _emit(report, args.json)
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    from td3drive.bench.pipeline import run_pipeline_benchmark

    try:
        report = run_pipeline_benchmark(
            shard_counts=args.shards,
            transitions_per_shard=args.transitions,
            chunk_steps=args.chunk_steps,
            batch_size=args.batch_size,
            batches=args.batches,
            warmup=args.warmup,
            prefetch=args.prefetch,
            device=args.device,
            learner_updates_per_s=args.learner_updates_per_s,
            decode_threads=args.decode_threads,
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
    from td3drive.bench.learner import (
        DEFAULT_OPTIONS,
        OPTIONS,
        learner_torch_threads,
        run_learner_benchmark,
    )
    from td3drive.contracts.config import RunConfig, load_config

    options: list[str] = []
    for name in args.options:
        if name == "default":
            options += DEFAULT_OPTIONS
        elif name == "all":
            options += OPTIONS
        elif name != "none":
            if name not in OPTIONS:
                print(
                    f"td3drive: error: unknown option {name!r}; choose from "
                    f"{', '.join(OPTIONS)}, default, all, none",
                    file=sys.stderr,
                )
                return 2
            options.append(name)
    options = list(dict.fromkeys(options))  # once each, in order
    run = load_config(args.config).run if args.config else RunConfig()
    threads = args.threads or learner_torch_threads(run)
    fetch_every = args.fetch_every or run.learner_updates_per_call
    rounds = min(16, args.updates)
    print(
        f"bench learner: device={args.device} batch sizes={args.batch_size} "
        f"encoders={args.encoder} options={options or 'none'} torch threads={threads} "
        f"fetch every {fetch_every} updates; updates={args.updates} per row and variant "
        f"(interleaved in {rounds} rounds)",
        file=sys.stderr,
        flush=True,
    )
    report = run_learner_benchmark(
        device=args.device,
        batch_sizes=args.batch_size,
        updates=args.updates,
        warmup=args.warmup,
        rounds=rounds,
        encoders=args.encoder,
        options=options,
        fetch_every=fetch_every,
        threads=threads,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    _emit(report, args.json)
    return 0


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
