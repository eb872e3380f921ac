"""What a run's replay holds: crashes, stops and driving, from its snapshots.

A run that does not learn often has a replay that cannot teach: the uniform
random warm-up on the racetrack leaves the road within seconds, so early
replay is mostly short episodes that end in a crash. This module reads the
replay shards' latest snapshots (``RUN_DIR/checkpoints/replay/shard-*``) and
counts each stored transition in one class, from what a chunk keeps (the
vector's speed, the reward, the ``terminated`` flag):

* ``crash``: the step terminated the episode with a penalty (reward below
  ``-task.collision_penalty / 2`` and a speed above ``stuck_speed_mps``):
  a collision or leaving the road;
* ``stuck_end``: the step terminated the episode below ``stuck_speed_mps``
  (the stuck rule);
* ``route_complete``: the step terminated the episode without a penalty;
* ``stopped``: any other step below ``stuck_speed_mps``;
* ``overspeed``: any other step above ``task.target_speed_mps``;
* ``driving``: the rest.

Speeds come from ``vector[0] × target_speed_mps`` (both observation-vector
modes carry it). Also reported: transitions held, episodes touched, mean
speed (km/h) and the share of transitions taken by the warm-up or the first
policy (``policy_version == 0``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from buffer_service.snapshot import read_latest
from td3drive.contracts.codec import CompressedChunk
from td3drive.contracts.config import DrivingTaskConfig

CLASSES = ("crash", "stuck_end", "route_complete", "stopped", "overspeed", "driving")


def census(chunks: Iterable[CompressedChunk], task: DrivingTaskConfig) -> dict[str, Any]:
    """Classify every transition of ``chunks`` (see the module docstring).

    Returns:
        ``{"transitions", "episodes", "fractions": {class: share in [0, 1]},
        "counts": {class: n}, "mean_speed_kmh", "policy_version_0_fraction"}``;
        fractions are ``None`` when there is no transition.
    """
    counts = dict.fromkeys(CLASSES, 0)
    speeds: list[np.ndarray] = []
    episodes: set[int] = set()
    version_0 = 0
    for compressed in chunks:
        chunk = compressed.decompress()
        steps = chunk.num_steps
        speed = chunk.vectors[:steps, 0].astype(np.float64) * task.target_speed_mps
        next_speed = chunk.vectors[1 : steps + 1, 0].astype(np.float64) * task.target_speed_mps
        terminal = chunk.terminated.astype(bool)
        slow_end = next_speed < task.stuck_speed_mps
        penalised = chunk.rewards < -task.collision_penalty / 2
        crash = terminal & penalised & ~slow_end
        stuck_end = terminal & slow_end
        complete = terminal & ~crash & ~stuck_end
        rest = ~terminal
        counts["crash"] += int(crash.sum())
        counts["stuck_end"] += int(stuck_end.sum())
        counts["route_complete"] += int(complete.sum())
        counts["stopped"] += int((rest & (speed < task.stuck_speed_mps)).sum())
        counts["overspeed"] += int((rest & (speed > task.target_speed_mps)).sum())
        counts["driving"] += int(
            (rest & (speed >= task.stuck_speed_mps) & (speed <= task.target_speed_mps)).sum()
        )
        speeds.append(speed)
        episodes.add(int(chunk.episode_id))
        version_0 += int((chunk.versions == 0).sum())
    total = sum(counts.values())
    all_speeds = np.concatenate(speeds) if speeds else np.zeros(0)
    return {
        "transitions": total,
        "episodes": len(episodes),
        "counts": counts,
        "fractions": {k: (v / total if total else None) for k, v in counts.items()},
        "mean_speed_kmh": float(all_speeds.mean() * 3.6) if total else None,
        "policy_version_0_fraction": version_0 / total if total else None,
    }


def census_of_run(run_dir: str | Path, task: DrivingTaskConfig) -> dict[str, Any] | None:
    """:func:`census` of the latest snapshot of every replay shard of a run,
    or ``None`` when the run has no replay snapshot.

    Raises:
        buffer_service.snapshot.SnapshotError: a damaged snapshot.
    """
    root = Path(run_dir) / "checkpoints" / "replay"
    chunks: list[CompressedChunk] = []
    found = False
    for shard_dir in sorted(root.glob("shard-*")):
        latest = read_latest(shard_dir)
        if latest is None:
            continue
        found = True
        chunks.extend(chunk for _, chunk in latest[1].chunks)
    return census(chunks, task) if found else None


def census_lines(result: dict[str, Any]) -> list[str]:
    """A two-line account of :func:`census`."""
    shares = ", ".join(
        f"{name} {share:.0%}" for name, share in result["fractions"].items() if share is not None
    )
    speed = result["mean_speed_kmh"]
    return [
        f"replay holds {result['transitions']} transitions of {result['episodes']} episodes, "
        f"mean speed {speed:.0f} km/h"
        if speed is not None
        else "replay is empty",
        f"  {shares}",
    ]
