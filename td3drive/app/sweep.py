"""``td3drive sweep``: short trainings over a grid of config values, on Ray Tune.

Every grid point is one Tune trial that runs a full
:class:`td3drive.app.driver.TrainingRun` (shards, workers, learner, evaluation)
with the point's overrides; trials run one at a time by default, since each
already uses the whole machine. The table lists each point's evaluation
figures, wall-clock and updates/s, best evaluation return first.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from td3drive.contracts.config import ConfigError, TD3DriveConfig, config_from_dict

Progress = Callable[[str], None]
REPORTED = ("return_mean", "success_rate", "route_completion_mean", "mean_speed_kmh")


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["learner.actor_lr=1e-4,3e-4", ...]`` → ``{"learner.actor_lr": [1e-4, 3e-4]}``
    (values parsed as YAML).

    Raises:
        ConfigError: an item without ``section.key=`` or without values.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or not values:
            raise ConfigError(f"--grid {item!r}: expected section.key=v1,v2,...")
        grid[key] = [parse_value(v) for v in values.split(",")]
    return grid


def parse_value(text: str) -> Any:
    """A grid value: an int or float when it reads as one (``1e-4`` too,
    which YAML 1.1 would keep as a string), else YAML (``true``, ``null``,
    ``[64, 64]``, ``shared``)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return yaml.safe_load(text)


def apply(base: TD3DriveConfig, point: dict[str, Any]) -> TD3DriveConfig:
    """``base`` with ``{"section.key": value}`` overrides, validated.

    Raises:
        ConfigError: an override that does not validate (names the field).
    """
    raw = base.model_dump(mode="json")
    for key, value in point.items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, source=f"sweep point {point}")


def run_sweep(
    base: TD3DriveConfig,
    grid: dict[str, list[Any]],
    out_dir: Path,
    progress: Progress = print,
) -> list[dict[str, Any]]:
    """Run every grid point as a Ray Tune trial; write ``sweep.json`` and
    ``sweep.md`` (the table) into ``out_dir``; return the rows.

    Raises:
        ConfigError: a grid point that does not validate (checked before any run).
    """
    import ray
    from ray import tune

    from td3drive.app.driver import TrainingRun

    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    for point in points:
        apply(base, point)  # fail before anything starts
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    def trial(params: dict[str, Any]) -> None:
        point = {key: params[key] for key in grid}
        config = apply(base, point)
        name = "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        run = TrainingRun(config, out_dir / "runs" / name, log_line=lambda _line: None)
        try:
            summary = run.run()
        finally:
            run.shutdown()
        tune.report(
            {
                **{f"eval_{k}": summary["eval"].get(k) for k in REPORTED},
                "wall_s": summary["wall_s"],
                "updates_per_s": summary["updates_per_s"],
                "env_steps": summary["env_steps"],
                "learner_updates": summary["learner_updates"],
            }
        )

    started = not ray.is_initialized()
    if started:
        run_cfg = base.run
        needed = (
            base.rollout.num_workers * run_cfg.worker_num_cpus
            + base.replay.num_shards * run_cfg.shard_num_cpus
            + run_cfg.learner_num_cpus
            + 2
        )
        ray.init(
            address="local",  # its own instance, even beside a `ray start` cluster
            num_cpus=max(os.cpu_count() or 1, int(np.ceil(needed))),
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        progress(f"sweep: {len(points)} grid points over {list(grid)}")
        tuner = tune.Tuner(
            # A trial only coordinates (its TrainingRun reserves what it uses); Tune
            # refuses an empty resource request, hence the token CPU share.
            tune.with_resources(trial, {"cpu": 0.01}),
            param_space={key: tune.grid_search(values) for key, values in grid.items()},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name="sweep", storage_path=str(out_dir / "tune"), verbose=0),
        )
        results = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    rows: list[dict[str, Any]] = []
    for result in (results[i] for i in range(len(results))):
        params = result.config or {}
        if result.error is not None:
            rows.append({"point": {k: params.get(k) for k in grid}, "error": str(result.error)})
            continue
        metrics = result.metrics or {}
        rows.append(
            {
                "point": {k: params.get(k) for k in grid},
                **{
                    key: metrics.get(key)
                    for key in (
                        *(f"eval_{k}" for k in REPORTED),
                        "wall_s",
                        "updates_per_s",
                        "env_steps",
                        "learner_updates",
                    )
                },
            }
        )
    rows.sort(key=lambda r: -(r.get("eval_return_mean") or float("-inf")))
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    (out_dir / "sweep.md").write_text(table(rows, list(grid)) + "\n")
    progress(table(rows, list(grid)))
    return rows


def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    """The rows as a Markdown table."""
    header = [*keys, "eval return", "success", "route", "km/h", "wall s", "updates/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for row in rows:
        if "error" in row:
            cells = [str(row["point"][k]) for k in keys] + [f"failed: {row['error'][:60]}"]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [str(row["point"][k]) for k in keys] + [
                fmt(row["eval_return_mean"], ".1f"),
                fmt(row["eval_success_rate"], ".0%"),
                fmt(row["eval_route_completion_mean"], ".0%"),
                fmt(row["eval_mean_speed_kmh"], ".1f"),
                fmt(row["wall_s"], ".0f"),
                fmt(row["updates_per_s"], ".2f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
