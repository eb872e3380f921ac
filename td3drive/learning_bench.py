"""``td3drive bench learning``: does it drive? Encoder modes side by side.

Each variant trains with the same config, budget and seeds on the embedded
simulator (a full :class:`td3drive.driver.TrainingRun` per variant and seed,
evaluated every ``eval_every`` env steps with the deterministic policy):

* ``frozen``: the CNN never trains (the reference system's failure);
* ``separate``: actor and critic each train their own CNN;
* ``shared``: one CNN trained by the critic loss (DrQ-v2), without augmentation;
* ``shared+shift``: the same with DrQ random-shift augmentation (pad 4);
* ``separate-relu-plain`` (not run unless asked for): ``separate`` with the
  earlier defaults, NatureCNN's unbounded ReLU output and TD3's loss without
  the pre-tanh penalty, the setting whose actor saturated.

Every variant keeps the base config's other learner settings (encoder output,
pre-tanh penalty, learning rates) unless its entry in :data:`VARIANTS` sets them.

Reported per variant and checkpoint: mean and standard deviation over seeds
of evaluation return, success rate, route completion and mean speed (km/h),
plus wall-clock and updates/s per run. Writes JSON and PNG learning curves.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from td3drive.config import TD3DriveConfig, config_from_dict

Progress = Callable[[str], None]

VARIANTS: dict[str, dict[str, Any]] = {
    "frozen": {"encoder": "frozen", "random_shift_pad": 0},
    "separate": {"encoder": "separate", "random_shift_pad": 0},
    "shared": {"encoder": "shared", "random_shift_pad": 0},
    "shared+shift": {"encoder": "shared", "random_shift_pad": 4},
    "separate-relu-plain": {
        "encoder": "separate",
        "random_shift_pad": 0,
        "encoder_output": "relu",
        "action_preactivation_penalty": 0.0,
    },
}
DEFAULT_VARIANTS = ("frozen", "separate", "shared", "shared+shift")
FIELDS = ("return_mean", "success_rate", "route_completion_mean", "mean_speed_kmh")


def variant_config(
    base: TD3DriveConfig, variant: str, seed: int, env_steps: int, eval_every: int, device: str
) -> TD3DriveConfig:
    """``base`` with the variant's encoder settings, the seed, budget and device."""
    raw = base.model_dump(mode="json")
    raw["learner"].update(VARIANTS[variant], seed=seed, device=device)
    if variant == "frozen":
        raw["learner"]["encoder_lr"] = None
    raw["rollout"]["seed"] = seed
    raw["run"].update(total_env_steps=env_steps, eval_every_env_steps=eval_every, metrics_port=None)
    return config_from_dict(raw, source=f"bench learning: {variant}, seed {seed}")


def aggregate(histories: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and std over seeds at each evaluation index (runs are aligned by
    order; ``env_steps`` is the mean of the runs' evaluation points)."""
    length = min(len(h) for h in histories) if histories else 0
    rows = []
    for index in range(length):
        points = [h[index] for h in histories]
        row: dict[str, Any] = {"env_steps": float(np.mean([p["env_steps"] for p in points]))}
        for key in FIELDS:
            values = [float(p[key]) for p in points if p.get(key) is not None]
            row[key] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values)) if values else None,
            }
        rows.append(row)
    return rows


def run_learning_benchmark(
    base: TD3DriveConfig,
    out_dir: Path,
    env_steps: int,
    seeds: int,
    eval_every: int,
    device: str = "cpu",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    progress: Progress = print,
) -> dict[str, Any]:
    """Train every variant for every seed; return (and write) the comparison.

    Raises:
        ValueError: an unknown variant.
        td3drive.driver.TrainingError: a run failed (e.g. a NaN loss).
    """
    import ray

    from td3drive.driver import EVAL_FILE, TrainingRun

    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    histories: dict[str, list[list[dict[str, Any]]]] = {v: [] for v in variants}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    try:
        # Seeds outside, variants inside: an interrupted comparison still has
        # every variant side by side for the seeds it finished.
        for seed in range(seeds):
            for variant in variants:
                config = variant_config(base, variant, seed, env_steps, eval_every, device)
                run_dir = out_dir / "runs" / f"{variant}-seed{seed}"
                progress(f"{variant}, seed {seed}: training {env_steps} env steps -> {run_dir}")
                run = TrainingRun(config, run_dir, log_line=lambda _line: None)
                summary = run.run()
                run.shutdown()
                history = [
                    json.loads(line) for line in (run_dir / EVAL_FILE).read_text().splitlines()
                ]
                histories[variant].append(history)
                runs[variant].append(
                    {
                        "seed": seed,
                        "wall_s": summary["wall_s"],
                        "updates_per_s": summary["updates_per_s"],
                        "env_steps_per_s": summary["env_steps_per_s"],
                        "learner_updates": summary["learner_updates"],
                        "encoder_weight_delta": summary["encoder_weight_delta"],
                        "actor_saturation": summary.get("actor_saturation"),
                        "final_eval": summary["eval"],
                    }
                )
                final = summary["eval"]
                progress(
                    f"  done in {summary['wall_s']:.0f} s, {summary['updates_per_s']:.2f} "
                    f"updates/s; final eval return {final['return_mean']:.1f}, route "
                    f"{final['route_completion_mean']:.0%}"
                )
                # Written after every run, so an interrupted comparison keeps
                # what it measured.
                results[variant] = {
                    "runs": runs[variant],
                    "curve": aggregate(histories[variant]),
                }
                write_report(
                    out_dir, base, results, env_steps, seeds, eval_every, device, final=False
                )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return write_report(out_dir, base, results, env_steps, seeds, eval_every, device, final=True)


def write_report(
    out_dir: Path,
    base: TD3DriveConfig,
    results: dict[str, Any],
    env_steps: int,
    seeds: int,
    eval_every: int,
    device: str,
    final: bool,
) -> dict[str, Any]:
    """Write ``learning.json``, ``learning.md`` (the final-evaluation table) and
    ``learning.png`` in ``out_dir``; ``complete`` is false while runs are still
    missing."""
    report = {
        "benchmark": "learning",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "env_id": base.rollout.env_id,
        "env_steps": env_steps,
        "seeds": seeds,
        "eval_every_env_steps": eval_every,
        "eval_episodes": base.run.eval_episodes,
        "base_config": base.model_dump(mode="json"),
        "complete": final,
        "variants": results,
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
    (out_dir / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "learning.md").write_text(markdown_table(report))
    plot_curves(report, out_dir / "learning.png")
    return report


def _spread(values: Sequence[float], digits: int, scale: float = 1.0) -> str:
    if not values:
        return "—"
    array = np.asarray(values, dtype=float) * scale
    return f"{array.mean():.{digits}f} ({array.std():.{digits}f})"


def _present(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(row[key]) for row in rows if row.get(key) is not None]


def markdown_table(report: dict[str, Any]) -> str:
    """The final evaluation of every variant: mean (std) over seeds of return,
    success, route completion and speed; the mean return of the last three
    evaluation points (steadier than the last one alone); wall-clock,
    updates/s, encoder change and final actor saturation ranges over seeds."""

    def span(values: Sequence[float | None], fmt: str) -> str:
        present = [v for v in values if v is not None]
        if not present:
            return "—"
        low, high = format(min(present), fmt), format(max(present), fmt)
        return low if low == high else f"{low}–{high}"

    lines = [
        f"{report['env_steps']} env steps per run, {report['device']}, {report['env_id']}; "
        f"mean (std) over the seeds run of the final evaluation "
        f"({report['eval_episodes']} episodes per seed).",
        "",
        "| variant | seeds | eval return | return, last 3 evals | success | route completion "
        "| speed km/h | wall s | updates/s | encoder change actor / critic | actor saturation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, result in report["variants"].items():
        runs = result["runs"]
        finals = [r["final_eval"] for r in runs]
        delta = [r["encoder_weight_delta"] for r in runs]
        tail = [row["return_mean"]["mean"] for row in result["curve"][-3:]]
        tail_mean = f"{np.mean(tail):.1f}" if tail and None not in tail else "—"
        lines.append(
            f"| {variant} | {len(runs)} "
            f"| {_spread(_present(finals, 'return_mean'), 1)} | {tail_mean} "
            f"| {_spread(_present(finals, 'success_rate'), 0, 100)}% "
            f"| {_spread(_present(finals, 'route_completion_mean'), 0, 100)}% "
            f"| {_spread(_present(finals, 'mean_speed_kmh'), 1)} "
            f"| {span([r['wall_s'] for r in runs], '.0f')} "
            f"| {span([r['updates_per_s'] for r in runs], '.1f')} "
            f"| {span([d['actor'] for d in delta], '.2f')} / "
            f"{span([d['critic'] for d in delta], '.2f')} "
            f"| {span([r.get('actor_saturation') for r in runs], '.2f')} |"
        )
    if not report.get("complete", True):
        lines += [
            "",
            f"Incomplete: {report['seeds']} seed(s) per variant were asked for; the "
            "comparison stopped before all of them ran.",
        ]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict[str, Any], path: Path) -> Path:
    """Mean ± std over seeds of each evaluation figure against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "return_mean": "evaluation return",
        "success_rate": "success rate",
        "route_completion_mean": "route completion",
        "mean_speed_kmh": "mean speed (km/h)",
    }
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for variant, result in report["variants"].items():
        curve = result["curve"]
        steps = [row["env_steps"] for row in curve]
        for axis, key in zip(axes, FIELDS, strict=True):
            mean = np.array([row[key]["mean"] or 0.0 for row in curve])
            std = np.array([row[key]["std"] or 0.0 for row in curve])
            axis.plot(steps, mean, marker="o", label=variant)
            axis.fill_between(steps, mean - std, mean + std, alpha=0.2)
    for axis, key in zip(axes, FIELDS, strict=True):
        axis.set_title(titles[key])
        axis.set_xlabel("env steps")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle(
        f"td3drive bench learning: {report['seeds']} seed(s), {report['env_steps']} env steps, "
        f"{report['device']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
