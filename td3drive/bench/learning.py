"""``td3drive bench learning``: does it drive? Config variants side by side.

Each variant trains with the same base config, budget and seeds on the
embedded simulator (a full :class:`td3drive.app.driver.TrainingRun` per variant
and seed, evaluated every ``eval_every`` env steps with the deterministic
policy). The built-in variants (:data:`VARIANTS`) compare encoder modes:

* ``default``: the base config unchanged (no overrides);
* ``frozen``: the CNN never trains (the reference system's failure);
* ``separate``: actor and critic each train their own CNN;
* ``shared``: one CNN trained by the critic loss (DrQ-v2), without augmentation;
* ``shared+shift``: the same with DrQ random-shift augmentation (pad 4);
* ``separate-relu-plain`` (not run unless asked for): ``separate`` with the
  earlier defaults, NatureCNN's unbounded ReLU output and TD3's loss without
  the pre-tanh penalty, the setting whose actor saturated.

A variant is a mapping ``{section: {key: value}}`` over any sections of
:class:`td3drive.contracts.config.TD3DriveConfig` (``learner``, ``task``, ``rollout``,
...), merged into the base config (nested mappings such as
``rollout.env_kwargs`` are merged key by key). Every variant keeps the base
config's other settings. The bench then sets, for every run whatever the
variant says: ``learner.seed`` and ``rollout.seed`` to the run's seed,
``learner.device``, ``run.total_env_steps``, ``run.eval_every_env_steps``,
``run.eval_episodes`` and ``run.metrics_port = None``.

The evidence standard (what the report is built to support):

* every figure comes from several seeds (default 3; ``seeds`` are 0..K-1)
  and is reported as the median with its spread over seeds (interquartile
  range ``[q25, q75]``, numpy's linear interpolation, and the min–max), never
  a mean (std);
* every evaluation point is ``eval_episodes`` episodes (default 10) on fixed
  evaluation seeds: episode ``i`` of a run resets with ``run.eval_seed +
  10_000_000 + i`` (see ``rollout_workers/evaluation.py``), independent of
  the training seed, so every variant, seed and evaluation point drives the
  same episodes. Each run's evaluation seeds are listed in the JSON
  (``runs[].eval_seeds``);
* every table names the commit (``git rev-parse HEAD`` plus a dirty flag),
  the config file and the sha256 of the resolved base config, and the
  machine (platform, CPUs, torch version and threads) that produced it;
* time to threshold: per run, the env steps and wall-clock seconds to the
  first evaluation whose mean route completion reaches 0.5 and 0.8.

Resume (runs are long): results are written after every run
(``complete: false`` until all ran). Re-running into the same ``out_dir``
needs ``resume=True`` (``--resume``), which reuses every (variant, seed) run
directory that completed (``summary.json`` with status ``completed`` and an
``eval.jsonl``) after checking that its resolved config is exactly the one
the bench would train now, and only if ``learning.json``'s base config
hash, budget, evaluation settings and device match. A partially finished
run directory is deleted and trained again from scratch, not resumed from
its checkpoint: ``TrainingRun(resume=True)`` would repeat the steps after the
last checkpoint, duplicate their evaluation lines in ``eval.jsonl`` and lose
their wall-clock time, which would corrupt time-to-threshold. ``fresh=True``
(``--fresh``) discards an earlier comparison in ``out_dir``; without either
flag an existing comparison there is an error, so a new comparison never
silently mixes with an old one.

Files in ``out_dir``: ``learning.json`` (everything, per run and
aggregated), ``learning.md`` (the table with its provenance header),
``learning.png`` (curves), ``runs/<variant>-seed<k>/`` (each run directory,
plus ``bench_provenance.json``: the commit and machine that trained it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from td3drive.app.arguments import positive_int
from td3drive.app.report import flatten
from td3drive.contracts.config import TD3DriveConfig, config_from_dict, load_config

Progress = Callable[[str], None]

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "frozen": {
        "learner": {"encoder": "frozen", "random_shift_pad": 0, "encoder_lr": None},
    },
    "separate": {"learner": {"encoder": "separate", "random_shift_pad": 0}},
    "shared": {"learner": {"encoder": "shared", "random_shift_pad": 0}},
    "shared+shift": {"learner": {"encoder": "shared", "random_shift_pad": 4}},
    "separate-relu-plain": {
        "learner": {
            "encoder": "separate",
            "random_shift_pad": 0,
            "encoder_output": "relu",
            "action_preactivation_penalty": 0.0,
        },
    },
    # Pixels must matter: the vector carries only the speed, so steering can
    # come only from the image; the trained encoder must drive, the frozen not.
    "speed-only": {"task": {"observation_vector": "speed_only"}},
    "speed-only-frozen": {
        "learner": {"encoder": "frozen", "random_shift_pad": 0, "encoder_lr": None},
        "task": {"observation_vector": "speed_only"},
    },
    # deploy/local.yaml before the learning comparison of 2026-12-01, for reference: batch 64 at
    # replay ratio 16 (one update per 4 env steps), 1-step returns, gamma
    # 0.99, tau 0.005, uniform random warm-up of 250 steps per worker,
    # highway-env's +-45 deg steering.
    "previous-default": {
        "learner": {"batch_size": 64, "tau": 0.005},
        "replay": {"replay_ratio": 16.0, "n_step": 1, "gamma": 0.99},
        "rollout": {
            "warmup_policy": "uniform",
            "warmup_steps": 250,
            "env_kwargs": {"max_steering_rad": 0.7853981633974483},  # pi/4, highway-env's
        },
    },
}
"""Variant name -> ``{config section: {key: value}}`` overrides of the base config."""

DEFAULT_VARIANTS = ("default", "speed-only", "speed-only-frozen")
FIELDS = (
    "return_mean",
    "success_rate",
    "route_completion_mean",
    "mean_speed_kmh",
    "collision_rate",
)
"""Evaluation figures aggregated over seeds (one evaluation's means over its
episodes): return (reward units), success rate, route completion and collision
rate (fractions 0..1), mean speed (km/h)."""
PLOTTED = FIELDS[:4]
THRESHOLDS = (0.5, 0.8)
"""Route-completion levels for time to threshold (fraction of the route)."""
THRESHOLD_FIELD = "route_completion_mean"
MIN_SEEDS = 3
MIN_EVAL_EPISODES = 10
IQR_MIN_SEEDS = 5
"""Curves shade the IQR from this many seeds on, the min–max below it (the
quartiles of 3 or 4 values are interpolations between them)."""
RUNS_DIR = "runs"
PROVENANCE_FILE = "bench_provenance.json"
REPORT_FILES = ("learning.json", "learning.md", "learning.png")
FINGERPRINT_KEYS = (
    "base_config_sha256",
    "env_steps",
    "eval_every_env_steps",
    "eval_episodes",
    "device",
)
"""What a resumed comparison must share with the one in ``learning.json``."""


class ComparisonMismatchError(ValueError):
    """``out_dir`` holds a comparison the requested one must not mix with."""


# ------------------------------------------------------------ the command
HELP = (
    "config variants (encoder modes) trained side by side over seeds, with the "
    "median and spread of their evaluations"
)
DESCRIPTION = """Trains each variant for seeds 0..K-1 (a full training run each) on
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
""" + "\n".join(f"  {name}: {json.dumps(overrides)}" for name, overrides in VARIANTS.items())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """:data:`DESCRIPTION` as written (paragraphs, one variant a line), defaults shown."""


FORMATTER_CLASS: type[argparse.HelpFormatter] = _HelpFormatter
"""The subcommand's help formatter (the other benches use argparse's
``ArgumentDefaultsHelpFormatter``, which rewraps their one-paragraph descriptions)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``td3drive bench learning``."""
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("deploy/local.yaml"),
        help="base configuration (the default run)",
    )
    parser.add_argument(
        "--env-steps",
        type=positive_int,
        default=12000,
        help="env-step budget per run (deploy/local.yaml's)",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=3,
        help="seeds per variant (0..K-1); fewer than 3 is flagged below the evidence standard",
    )
    parser.add_argument(
        "--eval-every", type=positive_int, default=4000, help="env steps between evaluations"
    )
    parser.add_argument(
        "--eval-episodes",
        type=positive_int,
        default=10,
        help="episodes per evaluation (run.eval_episodes of every run); fewer than 10 is "
        "flagged below the evidence standard",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="learner.device of every run",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated variants from " + ",".join(VARIANTS) + " ('default' is the base "
        "config unchanged; separate-relu-plain: the earlier NatureCNN ReLU output without "
        "the pre-tanh penalty)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results/learning"), help="output directory"
    )
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the comparison in --out: reuse its completed runs, retrain the rest "
        "(refused when its settings differ)",
    )
    again.add_argument(
        "--fresh", action="store_true", help="discard the comparison in --out and start over"
    )


def run(args: argparse.Namespace, progress: Progress = print) -> dict[str, Any]:
    """:func:`run_learning_benchmark` on the ``--config`` file with the options
    of :func:`add_arguments`; a last progress line names the files written.

    Raises:
        ValueError: as :func:`run_learning_benchmark`;
            :class:`td3drive.contracts.config.ConfigError` (a ``ValueError``)
            for an invalid ``--config``.
        OSError: a ``--config`` that cannot be read.
    """
    base = load_config(args.config)
    report = run_learning_benchmark(
        base,
        args.out,
        env_steps=args.env_steps,
        seeds=args.seeds,
        eval_every=args.eval_every,
        device=args.device,
        variants=[v.strip() for v in args.variants.split(",") if v.strip()],
        progress=progress,
        eval_episodes=args.eval_episodes,
        config_path=args.config,
        resume=args.resume,
        fresh=args.fresh,
    )
    progress(
        f"wrote {args.out / 'learning.md'}, {args.out / 'learning.json'} and "
        f"{args.out / 'learning.png'}"
    )
    return report


# ----------------------------------------------------------------- configs
def _merge(target: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def variant_config(
    base: TD3DriveConfig,
    variant: str,
    seed: int,
    env_steps: int,
    eval_every: int,
    device: str,
    eval_episodes: int | None = None,
) -> TD3DriveConfig:
    """``base`` with the variant's overrides, then the run's seed (in
    ``learner.seed`` and ``rollout.seed``), device, env-step budget,
    evaluation interval (env steps) and, unless None, evaluation episodes.

    Raises:
        ValueError: an unknown variant, or one that names an unknown section.
        td3drive.contracts.config.ConfigError: the result does not validate.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    overrides = VARIANTS[variant]
    unknown = set(overrides) - set(TD3DriveConfig.model_fields)
    if unknown:
        raise ValueError(
            f"variant {variant!r} overrides unknown config sections {sorted(unknown)}; "
            f"sections are {list(TD3DriveConfig.model_fields)}"
        )
    raw = base.model_dump(mode="json")
    _merge(raw, overrides)
    raw["learner"].update(seed=seed, device=device)
    raw["rollout"]["seed"] = seed
    raw["run"].update(total_env_steps=env_steps, eval_every_env_steps=eval_every, metrics_port=None)
    if eval_episodes is not None:
        raw["run"]["eval_episodes"] = eval_episodes
    return config_from_dict(raw, source=f"bench learning: {variant}, seed {seed}")


def config_sha256(config: TD3DriveConfig) -> str:
    """sha256 (hex) of the resolved config as canonical JSON (sorted keys)."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def eval_seeds(config: TD3DriveConfig) -> list[int]:
    """The environment seeds of a run's evaluation episodes, in order."""
    from rollout_workers.evaluation import EVAL_SEED_OFFSET

    start = config.run.eval_seed + EVAL_SEED_OFFSET
    return list(range(start, start + config.run.eval_episodes))


# -------------------------------------------------------------- provenance
def git_state(repo: Path | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "changed_paths", "error"}`` of the checkout
    holding td3drive (or ``repo``): the HEAD commit, whether ``git status
    --porcelain`` lists anything (modified or untracked paths) and how many;
    all None with ``error`` set when git is missing or it is not a checkout."""
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip() or f"git {args[0]} failed")
        return done.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {"commit": None, "dirty": None, "changed_paths": None, "error": reason}
    return {"commit": commit, "dirty": bool(changed), "changed_paths": len(changed), "error": None}


def machine_state() -> dict[str, Any]:
    """Where the numbers were measured: platform, CPUs (``cpu_count``: the
    machine's; ``cpus_usable``: this process's affinity), torch version and
    its intra-op threads in the bench process (Ray actors size their own pools
    from their ``num_cpus``), ``OMP_NUM_THREADS`` and the host name."""
    import torch

    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        usable = None
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------ runs
def train_run(config: TD3DriveConfig, run_dir: Path) -> None:
    """Train one run to its budget in ``run_dir`` (a fresh directory).

    Raises:
        td3drive.app.driver.TrainingError: the run failed (e.g. a NaN loss).
    """
    from td3drive.app.driver import TrainingRun

    run = TrainingRun(config, run_dir, log_line=lambda _line: None)
    try:
        run.run()
    finally:
        run.shutdown()


def run_completed(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run: ``summary.json`` with status
    ``completed`` and a non-empty ``eval.jsonl``."""
    from td3drive.app.driver import EVAL_FILE, SUMMARY_FILE

    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        evals = (run_dir / EVAL_FILE).read_text().strip()
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("status") == "completed" and bool(evals)


def time_to_threshold(
    history: Sequence[Mapping[str, Any]], threshold: float, key: str = THRESHOLD_FIELD
) -> dict[str, Any]:
    """Env steps (when that evaluation started) and wall-clock seconds (run
    time when its result was recorded, evaluation included) of the first
    evaluation in ``history`` whose ``key`` is >= ``threshold``; both None when
    no evaluation reached it."""
    for point in history:
        value = point.get(key)
        if value is not None and float(value) >= threshold:
            return {"env_steps": int(point["env_steps"]), "wall_s": float(point["wall_s"])}
    return {"env_steps": None, "wall_s": None}


def read_run(run_dir: Path, seed: int) -> dict[str, Any]:
    """The record of a completed run, read back from its directory: its
    summary's speed figures, the final evaluation, every evaluation
    (``history``: the ``eval.jsonl`` lines), the evaluation seeds, time to
    each threshold (keys ``"0.5"``, ``"0.8"``) and the provenance the bench
    wrote beside it (None for a run it did not train)."""
    from td3drive.app.driver import EVAL_FILE, SUMMARY_FILE, load_run_config

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    history = [json.loads(line) for line in (run_dir / EVAL_FILE).read_text().splitlines() if line]
    provenance_path = run_dir / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text()) if provenance_path.exists() else None
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "wall_s": summary["wall_s"],
        "updates_per_s": summary["updates_per_s"],
        "env_steps_per_s": summary["env_steps_per_s"],
        "learner_updates": summary["learner_updates"],
        "encoder_weight_delta": summary["encoder_weight_delta"],
        "actor_saturation": summary.get("actor_saturation"),
        "final_eval": summary["eval"],
        "eval_seeds": eval_seeds(load_run_config(run_dir)),
        "time_to_threshold": {str(t): time_to_threshold(history, t) for t in THRESHOLDS},
        "history": history,
        "provenance": provenance,
    }


# ----------------------------------------------------------- aggregation
def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"n", "median", "q25", "q75", "min", "max"}`` over the values that
    are not None (quartiles by numpy's linear interpolation); the statistics
    are None when there is none."""
    present = np.asarray([float(v) for v in values if v is not None], dtype=float)
    if not present.size:
        return {"n": 0, "median": None, "q25": None, "q75": None, "min": None, "max": None}
    q25, median, q75 = np.percentile(present, [25, 50, 75])
    return {
        "n": int(present.size),
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(present.min()),
        "max": float(present.max()),
    }


def aggregate(histories: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per evaluation index, over seeds: :func:`spread` of every field in
    :data:`FIELDS`, ``env_steps`` (the median of the runs' evaluation points,
    which differ by a chunk or so) and ``n`` (the runs aligned). Runs are
    aligned by order and cut to the shortest history."""
    length = min(len(h) for h in histories) if histories else 0
    rows = []
    for index in range(length):
        points = [h[index] for h in histories]
        row: dict[str, Any] = {
            "env_steps": float(np.median([p["env_steps"] for p in points])),
            "n": len(points),
        }
        for key in FIELDS:
            row[key] = spread([p.get(key) for p in points])
        rows.append(row)
    return rows


def summarize_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One variant over its seeds: ``runs`` (as given), ``curve``
    (:func:`aggregate`), ``final`` (:func:`spread` over seeds of each final
    evaluation figure), ``return_last3`` (spread over seeds of each run's mean
    return over its last three evaluations, steadier than the last alone) and
    ``time_to_threshold`` per threshold: ``reached`` and ``seeds`` (how many
    runs got there, of how many) and the spread of ``env_steps`` and
    ``wall_s`` over the runs that reached it."""
    finals = [run["final_eval"] for run in runs]
    last3 = []
    for run in runs:
        tail = [p.get("return_mean") for p in run["history"][-3:]]
        last3.append(float(np.mean(tail)) if tail and None not in tail else None)
    thresholds = {}
    for threshold in THRESHOLDS:
        times = [run["time_to_threshold"][str(threshold)] for run in runs]
        reached = [t for t in times if t["env_steps"] is not None]
        thresholds[str(threshold)] = {
            "reached": len(reached),
            "seeds": len(runs),
            "env_steps": spread([t["env_steps"] for t in reached]),
            "wall_s": spread([t["wall_s"] for t in reached]),
        }
    return {
        "runs": list(runs),
        "curve": aggregate([run["history"] for run in runs]),
        "final": {key: spread([f.get(key) for f in finals]) for key in FIELDS},
        "return_last3": spread(last3),
        "time_to_threshold": thresholds,
    }


# ---------------------------------------------------------------- resume
def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for the first ``limit`` differing dotted keys."""
    flat_old, flat_new = dict(flatten(dict(old))), dict(flatten(dict(new)))
    keys = sorted(
        k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k)
    )
    shown = [
        f"{k}: {flat_old.get(k, '<absent>')!r} -> {flat_new.get(k, '<absent>')!r}" for k in keys
    ]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(shown[:limit]) + more


def fingerprint(
    base: TD3DriveConfig, env_steps: int, eval_every: int, eval_episodes: int, device: str
) -> dict[str, Any]:
    """The settings a resumed comparison must share (:data:`FINGERPRINT_KEYS`)."""
    return {
        "base_config_sha256": config_sha256(base),
        "env_steps": env_steps,
        "eval_every_env_steps": eval_every,
        "eval_episodes": eval_episodes,
        "device": device,
    }


def check_resumable(old_report: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise :class:`ComparisonMismatchError` unless ``old_report`` (an
    existing ``learning.json``) was made with the ``expected`` fingerprint;
    the base config hash is recomputed from its ``base_config``."""
    old = {key: old_report.get(key) for key in FINGERPRINT_KEYS}
    try:
        old_base = config_from_dict(dict(old_report["base_config"]), source="learning.json")
        old["base_config_sha256"] = config_sha256(old_base)
    except (KeyError, TypeError, ValueError):
        old["base_config_sha256"] = None
    differing = [key for key in FINGERPRINT_KEYS if old[key] != expected[key]]
    if differing:
        details = "; ".join(f"{k}: {old[k]!r} there, {expected[k]!r} now" for k in differing)
        raise ComparisonMismatchError(
            f"cannot resume: the comparison in learning.json was made with other settings "
            f"({details}). Use --fresh to discard it, or another --out."
        )


def _prepare_out_dir(
    out_dir: Path, expected: Mapping[str, Any], resume: bool, fresh: bool, progress: Progress
) -> None:
    report_path = out_dir / "learning.json"
    runs_dir = out_dir / RUNS_DIR
    existing = report_path.exists() or (runs_dir.exists() and any(runs_dir.iterdir()))
    if fresh:
        if existing:
            progress(f"--fresh: discarding the earlier comparison in {out_dir}")
        shutil.rmtree(runs_dir, ignore_errors=True)
        for name in REPORT_FILES:
            (out_dir / name).unlink(missing_ok=True)
    elif existing and not resume:
        raise ComparisonMismatchError(
            f"{out_dir} already holds a comparison (learning.json or {RUNS_DIR}/); pass "
            "--resume to continue it (same base config, budget, evaluation settings and "
            "device), --fresh to discard it, or choose another --out"
        )
    elif resume and report_path.exists():
        try:
            old_report = json.loads(report_path.read_text())
        except ValueError as exc:
            raise ComparisonMismatchError(
                f"cannot resume: {report_path} is not JSON: {exc}"
            ) from exc
        check_resumable(old_report, expected)
    out_dir.mkdir(parents=True, exist_ok=True)


def _reuse(run_dir: Path, config: TD3DriveConfig, seed: int) -> dict[str, Any]:
    from td3drive.app.driver import load_run_config
    from td3drive.contracts.config import ConfigError

    try:
        trained = load_run_config(run_dir).model_dump(mode="json")
    except ConfigError as exc:
        raise ComparisonMismatchError(
            f"cannot resume: {run_dir} completed but its config does not load ({exc}); use "
            "--fresh or another --out"
        ) from exc
    wanted = config.model_dump(mode="json")
    if trained != wanted:
        raise ComparisonMismatchError(
            f"cannot resume: {run_dir} was trained with another config than this comparison "
            f"would use ({config_differences(trained, wanted)}); use --fresh or another --out"
        )
    record = read_run(run_dir, seed)
    record["reused"] = True
    return record


# ------------------------------------------------------------ the bench
def run_learning_benchmark(
    base: TD3DriveConfig,
    out_dir: Path,
    env_steps: int,
    seeds: int,
    eval_every: int,
    device: str = "cpu",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    progress: Progress = print,
    *,
    eval_episodes: int = MIN_EVAL_EPISODES,
    config_path: str | Path | None = None,
    resume: bool = False,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train every variant for seeds ``0..seeds-1``; return (and write) the
    comparison.

    Args:
        base: the base config (each run: :func:`variant_config` of it).
        out_dir: where the report files and ``runs/`` go.
        env_steps: env-step budget per run.
        seeds: how many seeds per variant.
        eval_every: env steps between evaluations.
        device: ``learner.device`` of every run.
        variants: names from :data:`VARIANTS`.
        progress: where progress lines go.
        eval_episodes: episodes per evaluation (``run.eval_episodes``).
        config_path: the file ``base`` came from, recorded in the report.
        resume: reuse the completed runs of a matching comparison in ``out_dir``.
        fresh: discard whatever comparison ``out_dir`` holds first.

    Raises:
        ValueError: an unknown variant, ``seeds`` or ``eval_episodes`` < 1,
            or both ``resume`` and ``fresh``.
        ComparisonMismatchError: ``out_dir`` holds a comparison and neither
            ``resume`` nor ``fresh`` was given, or ``resume`` with other
            settings than that comparison's (or a run trained with another
            config).
        td3drive.app.driver.TrainingError: a run failed (e.g. a NaN loss).
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if seeds < 1 or eval_episodes < 1:
        raise ValueError(f"seeds ({seeds}) and eval_episodes ({eval_episodes}) must be >= 1")
    if resume and fresh:
        raise ValueError("choose one of resume and fresh")
    variants = list(dict.fromkeys(variants))
    expected = fingerprint(base, env_steps, eval_every, eval_episodes, device)
    # Build every config first: a variant that does not validate fails now,
    # not hours into the comparison.
    configs = {
        (variant, seed): variant_config(
            base, variant, seed, env_steps, eval_every, device, eval_episodes
        )
        for seed in range(seeds)
        for variant in variants
    }
    _prepare_out_dir(out_dir, expected, resume, fresh, progress)
    provenance = {
        "git": git_state(),
        "machine": machine_state(),
        "config_path": str(config_path) if config_path is not None else None,
    }
    records: dict[str, dict[int, dict[str, Any]]] = {v: {} for v in variants}
    # Check every completed run before training anything: a mismatch is
    # refused now, not after hours of new runs.
    for (variant, seed), config in configs.items():
        run_dir = out_dir / RUNS_DIR / f"{variant}-seed{seed}"
        if run_completed(run_dir):
            records[variant][seed] = _reuse(run_dir, config, seed)
            progress(f"{variant}, seed {seed}: completed earlier, reusing {run_dir}")

    def write() -> dict[str, Any]:
        report = build_report(base, records, expected, seeds, variants, provenance)
        write_report(out_dir, report)
        return report

    write()
    try:
        # Seeds outside, variants inside: an interrupted comparison still has
        # every variant side by side for the seeds it finished.
        for seed in range(seeds):
            for variant in variants:
                if seed in records[variant]:
                    continue
                run_dir = out_dir / RUNS_DIR / f"{variant}-seed{seed}"
                if run_dir.exists():
                    progress(f"{variant}, seed {seed}: discarding unfinished {run_dir}")
                    shutil.rmtree(run_dir)
                progress(f"{variant}, seed {seed}: training {env_steps} env steps -> {run_dir}")
                train_run(configs[variant, seed], run_dir)
                trained_by = {
                    "date": _now(),
                    "git": provenance["git"],
                    "machine": provenance["machine"],
                }
                (run_dir / PROVENANCE_FILE).write_text(json.dumps(trained_by, indent=2) + "\n")
                record = read_run(run_dir, seed)
                record["reused"] = False
                final = record["final_eval"]
                progress(
                    f"  done in {record['wall_s']:.0f} s, {record['updates_per_s']:.2f} "
                    f"updates/s; final eval return {final.get('return_mean') or 0:.1f}, "
                    f"route {final.get('route_completion_mean') or 0:.0%}"
                )
                records[variant][seed] = record
                # Written after every run, so an interrupted comparison keeps
                # what it measured.
                write()
    finally:
        if "ray" in sys.modules:  # the runs started Ray in this process
            import ray

            if ray.is_initialized():
                ray.shutdown()
    return write()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_report(
    base: TD3DriveConfig,
    records: Mapping[str, Mapping[int, Mapping[str, Any]]],
    settings: Mapping[str, Any],
    seeds: int,
    variants: Sequence[str],
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``learning.json`` content: the comparison's settings (``settings``
    is :func:`fingerprint`), provenance (``git``, ``machine``,
    ``config_path``, ``base_config_sha256``), the evidence check, the full
    base config and per variant :func:`summarize_variant` of the runs done so
    far (seed order). ``complete`` is true only when every (variant, seed)
    ran."""
    runs_done = sum(len(records.get(v, {})) for v in variants)
    trained_by = [
        run.get("provenance") or {} for v in variants for run in records.get(v, {}).values()
    ]
    commits = sorted({str((p.get("git") or {}).get("commit")) for p in trained_by})
    hosts = sorted({str((p.get("machine") or {}).get("hostname")) for p in trained_by})
    shortfalls = []
    if seeds < MIN_SEEDS:
        shortfalls.append(f"{seeds} seed(s) per variant (< {MIN_SEEDS})")
    if settings["eval_episodes"] < MIN_EVAL_EPISODES:
        shortfalls.append(
            f"{settings['eval_episodes']} episode(s) per evaluation (< {MIN_EVAL_EPISODES})"
        )
    return {
        "benchmark": "learning",
        "date": _now(),
        "complete": runs_done == seeds * len(variants),
        "runs_done": runs_done,
        "runs_planned": seeds * len(variants),
        "env_id": base.rollout.env_id,
        **dict(settings),
        "seeds": seeds,
        "variants_requested": list(variants),
        "variant_overrides": {v: VARIANTS[v] for v in variants},
        "statistic": "median over seeds with the interquartile range [q25, q75] (numpy "
        "linear interpolation) and min-max; rates are fractions 0..1",
        "eval_seed_rule": "episode i of a run resets with run.eval_seed + 10000000 + i, "
        "the same for every variant and training seed (runs[].eval_seeds lists them)",
        "thresholds": {"field": THRESHOLD_FIELD, "levels": list(THRESHOLDS)},
        "evidence": {
            "min_seeds": MIN_SEEDS,
            "min_eval_episodes": MIN_EVAL_EPISODES,
            "meets_standard": not shortfalls,
            "shortfalls": shortfalls,
        },
        "config_path": provenance.get("config_path"),
        "git": provenance.get("git"),
        "machine": provenance.get("machine"),
        "run_commits": commits,
        "run_hosts": hosts,
        "base_config": base.model_dump(mode="json"),
        "variants": {
            v: summarize_variant([records[v][s] for s in sorted(records[v])])
            for v in variants
            if records.get(v)
        },
    }


def write_report(out_dir: Path, report: Mapping[str, Any]) -> None:
    """Write ``learning.json``, ``learning.md`` (:func:`markdown_table`) and
    ``learning.png`` (:func:`plot_curves`) in ``out_dir``."""
    (out_dir / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "learning.md").write_text(markdown_table(report))
    plot_curves(report, out_dir / "learning.png")


# ------------------------------------------------------------ rendering
def _cell(stats: Mapping[str, Any], digits: int, scale: float = 1.0) -> str:
    """``median [q25, q75] (min–max)``; the value alone for one seed."""
    if not stats.get("n"):
        return "—"

    def f(key: str) -> str:
        return f"{stats[key] * scale:.{digits}f}"

    if stats["n"] == 1:
        return f("median")
    return f"{f('median')} [{f('q25')}, {f('q75')}] ({f('min')}–{f('max')})"


def _threshold_cell(entry: Mapping[str, Any]) -> str:
    reached = f"{entry['reached']}/{entry['seeds']} reached"
    if not entry["reached"]:
        return f"never ({reached})"
    steps, wall = entry["env_steps"]["median"], entry["wall_s"]["median"]
    return f"{steps:.0f} steps, {wall:.0f} s ({reached})"


def _span(values: Sequence[float | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    low, high = format(min(present), fmt), format(max(present), fmt)
    return low if low == high else f"{low}–{high}"


def header_lines(report: Mapping[str, Any]) -> list[str]:
    """The provenance and method lines above the table."""
    git = report.get("git") or {}
    if git.get("commit"):
        dirty = (
            f"dirty: {git['changed_paths']} uncommitted or untracked path(s)"
            if git.get("dirty")
            else "clean"
        )
        commit = f"{git['commit']} ({dirty})"
    else:
        commit = f"unknown ({git.get('error') or 'not recorded'})"
    machine = report.get("machine") or {}
    usable = machine.get("cpus_usable")
    cpus = f"{machine.get('cpu_count')} CPUs" + (f" ({usable} usable)" if usable else "")
    gpu = f", GPU {machine['cuda']}" if machine.get("cuda") else ""
    pct = [f"{t:.0%}" for t in THRESHOLDS]
    status = (
        "complete"
        if report["complete"]
        else f"INCOMPLETE: {report['runs_done']} of {report['runs_planned']} runs "
        "(variant × seed) done so far"
    )
    evidence = report["evidence"]
    lines = [
        "# td3drive bench learning",
        "",
        f"- status: {status}; {report['date']}",
        f"- commit: {commit}",
        f"- config: {report.get('config_path') or 'not from a file'}; resolved base config "
        f"sha256 {report['base_config_sha256'][:16]} (full config in learning.json)",
        f"- machine: {machine.get('platform')}, {machine.get('processor')}, {cpus}{gpu}, "
        f"torch {machine.get('torch')} with {machine.get('torch_threads')} thread(s); "
        f"learner device {report['device']}",
        f"- budget: {report['env_steps']} env steps per run on {report['env_id']}; the "
        f"deterministic policy evaluated every {report['eval_every_env_steps']} env steps and "
        f"at the end, {report['eval_episodes']} episode(s) each on fixed seeds (episode i "
        "resets with run.eval_seed + 10000000 + i: the same episodes for every variant, "
        "seed and evaluation point)",
        f"- seeds: 0..{report['seeds'] - 1} per variant; cells are the median over seeds "
        "[q25, q75] (min–max) of each run's final evaluation (one value when one seed ran); "
        "rates in %, return in reward units, speed in km/h",
        f"- route ≥ {pct[0]} / ≥ {pct[1]}: env steps and wall-clock seconds to the first "
        "evaluation whose mean route completion reached it, median over the seeds that "
        "reached it, and how many did",
        "- evidence: "
        + (
            f"meets the standard (≥ {evidence['min_seeds']} seeds, "
            f"≥ {evidence['min_eval_episodes']} episodes per evaluation)"
            if evidence["meets_standard"]
            else "BELOW THE STANDARD, not a learning claim: " + "; ".join(evidence["shortfalls"])
        ),
    ]
    # Resumed comparisons reuse runs that an earlier invocation trained.
    machine_host = str(machine.get("hostname"))
    commits, hosts = report.get("run_commits") or [], report.get("run_hosts") or []
    if commits and commits != [str(git.get("commit"))]:
        lines.append(
            f"- WARNING: runs trained at other or several commits ('None': unknown): {commits}"
        )
    if hosts and hosts != [machine_host]:
        lines.append(
            f"- WARNING: runs trained on other or several machines ('None': unknown): {hosts}; "
            "wall-clock figures are not comparable"
        )
    return lines


def markdown_table(report: Mapping[str, Any]) -> str:
    """The provenance header (:func:`header_lines`) and one row per variant:
    seeds run; median [IQR] (min–max) over seeds of the final evaluation's
    return, success, route completion, collision rate and mean speed; the
    same for each run's mean return over its last three evaluations; time to
    each route-completion threshold; and min–max over seeds of wall-clock
    seconds per run, learner updates/s, encoder weight change (relative,
    actor / critic) and final actor saturation (fraction of pre-tanh actions
    beyond the saturation level)."""
    pct = [f"{t:.0%}" for t in THRESHOLDS]
    lines = [
        *header_lines(report),
        "",
        "| variant | seeds | eval return | return, last 3 evals | success % | route completion % "
        f"| collision % | speed km/h | route ≥ {pct[0]} | route ≥ {pct[1]} | wall s | updates/s "
        "| encoder change actor / critic | actor saturation |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, result in report["variants"].items():
        runs, final = result["runs"], result["final"]
        delta = [r["encoder_weight_delta"] for r in runs]
        thresholds = result["time_to_threshold"]
        lines.append(
            f"| {variant} | {len(runs)} "
            f"| {_cell(final['return_mean'], 1)} | {_cell(result['return_last3'], 1)} "
            f"| {_cell(final['success_rate'], 0, 100)} "
            f"| {_cell(final['route_completion_mean'], 0, 100)} "
            f"| {_cell(final['collision_rate'], 0, 100)} "
            f"| {_cell(final['mean_speed_kmh'], 1)} "
            + "".join(f"| {_threshold_cell(thresholds[str(t)])} " for t in THRESHOLDS)
            + f"| {_span([r['wall_s'] for r in runs], '.0f')} "
            f"| {_span([r['updates_per_s'] for r in runs], '.1f')} "
            f"| {_span([d['actor'] for d in delta], '.2f')} / "
            f"{_span([d['critic'] for d in delta], '.2f')} "
            f"| {_span([r.get('actor_saturation') for r in runs], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


format_table = markdown_table
"""The bench modules' common name for the printer (here ``learning.md``'s text)."""


def plot_curves(report: Mapping[str, Any], path: Path) -> Path:
    """Median over seeds of each evaluation figure against env steps, shaded
    with the IQR from :data:`IQR_MIN_SEEDS` seeds on and with the min–max
    below (the title says which); dashed lines mark the route-completion
    thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "return_mean": "evaluation return",
        "success_rate": "success rate",
        "route_completion_mean": "route completion",
        "mean_speed_kmh": "mean speed (km/h)",
    }
    seeds_run = max((len(r["runs"]) for r in report["variants"].values()), default=0)
    iqr = seeds_run >= IQR_MIN_SEEDS
    low_key, high_key = ("q25", "q75") if iqr else ("min", "max")
    band = "interquartile range" if iqr else "min–max"

    def series(curve: Sequence[Mapping[str, Any]], key: str, stat: str) -> np.ndarray:
        values = [row[key][stat] for row in curve]
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    figure, axes = plt.subplots(1, len(PLOTTED), figsize=(18, 4.4))
    for variant, result in report["variants"].items():
        curve = result["curve"]
        steps = [row["env_steps"] for row in curve]
        for axis, key in zip(axes, PLOTTED, strict=True):
            (line,) = axis.plot(
                steps, series(curve, key, "median"), marker="o", label=f"{variant} (median)"
            )
            axis.fill_between(
                steps,
                series(curve, key, low_key),
                series(curve, key, high_key),
                alpha=0.2,
                color=line.get_color(),
                label=f"{variant} ({band})",
            )
    for axis, key in zip(axes, PLOTTED, strict=True):
        axis.set_title(titles[key])
        axis.set_xlabel("env steps")
        axis.grid(alpha=0.3)
        if key == THRESHOLD_FIELD:
            for threshold in THRESHOLDS:
                axis.axhline(threshold, color="grey", linestyle="--", linewidth=0.8)
    if report["variants"]:
        axes[0].legend(fontsize="small")
    commit = (report.get("git") or {}).get("commit") or "unknown commit"
    figure.suptitle(
        f"td3drive bench learning: median over {seeds_run} seed(s), shaded {band}; "
        f"{report['env_steps']} env steps, {report['eval_episodes']} eval episodes, "
        f"{report['device']}, {commit[:10]}" + ("" if report["complete"] else " (INCOMPLETE)")
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
