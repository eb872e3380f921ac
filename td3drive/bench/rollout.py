"""``td3drive bench rollout``: collection speed on the embedded simulator.

Runs 1 and N rollout workers as Ray actors, each acting with the policy
(after one published weights version, so inference is part of every step)
and pushing chunks to one replay shard per worker with no rate limit, and
reports env steps/s per configuration, the scaling efficiency
``aggregate / (N × single)``, and the policy's inference latency at batch 1
measured in-process on one thread. The baseline for collection is the bare
environment stepped with random actions in this process, with no policy,
chunking or Ray.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from td3drive.app.arguments import positive_int, positive_int_list

Progress = Callable[[str], None]

HELP = "env steps/s of 1 and N rollout workers on the embedded simulator"
DESCRIPTION = (
    "Runs rollout workers as Ray actors (policy acting, chunks pushed to "
    "replay shards) and reports env steps/s for each worker count, the scaling "
    "efficiency aggregate / (N x single), the bare environment's steps/s as the "
    "baseline, and the policy's inference latency at batch 1 on one thread."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``td3drive bench rollout``."""
    parser.add_argument(
        "--workers",
        type=positive_int_list,
        default=[1, 2],
        metavar="N,M",
        help="comma-separated worker counts",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=400, help="timed env steps per worker"
    )


def run(args: argparse.Namespace, progress: Progress = print) -> dict[str, Any]:
    """:func:`run_rollout_benchmark` with the options of :func:`add_arguments`.

    Raises:
        ValueError: as :func:`run_rollout_benchmark`.
    """
    return run_rollout_benchmark(
        workers=args.workers, steps_per_worker=args.steps, progress=progress
    )


def _bare_env_steps_per_s(env_id: str, steps: int) -> float:
    import gymnasium as gym

    import rollout_workers  # noqa: F401  (registers the environments)

    env = gym.make(env_id)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        action = np.array([rng.uniform(-1, 1), rng.uniform(0, 1)], np.float32)
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    elapsed = time.perf_counter() - start
    env.close()
    return steps / elapsed


def _inference_latency_ms(repeats: int = 200) -> dict[str, float]:
    import torch

    from td3drive.contracts.config import LearnerConfig
    from td3drive.contracts.networks import policy_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = LearnerConfig()
        policy = policy_for(config).eval()
        image = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8)
        vector = torch.zeros(1, 23)
        times = []
        with torch.no_grad():
            for _ in range(20):
                policy(image, vector)
            for _ in range(repeats):
                start = time.perf_counter()
                policy(image, vector)
                times.append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {
        "mean": float(np.mean(times)),
        "p50": float(np.median(times)),
        "p95": float(np.percentile(times, 95)),
    }


def run_rollout_benchmark(
    workers: Sequence[int] = (1, 2),
    steps_per_worker: int = 400,
    env_id: str = "td3drive/Racetrack-v0",
    progress: Progress = print,
) -> dict[str, Any]:
    """Measure collection throughput for each worker count in ``workers``.

    Raises:
        ValueError: an empty or non-positive worker count.
    """
    import ray

    from buffer_service.ray_actor import remote_shard_class
    from rollout_workers.ray_actor import remote_weights_board_class, remote_worker_class
    from td3drive.contracts.config import config_from_dict
    from td3drive.contracts.networks import policy_for

    if not workers or min(workers) < 1:
        raise ValueError("--workers needs positive counts, e.g. 1,2")
    baseline = _bare_env_steps_per_s(env_id, steps_per_worker)
    progress(f"bare environment, random actions, no Ray: {baseline:.0f} steps/s")
    latency = _inference_latency_ms()
    progress(f"policy inference, batch 1, 1 thread: {latency['mean']:.2f} ms mean")

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(
            address="local",  # its own instance, even beside a `ray start` cluster
            num_cpus=max(max(workers), os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
        )
    results: list[dict[str, Any]] = []
    try:
        for count in workers:
            config = config_from_dict(
                {
                    "learner": {"device": "cpu", "batch_size": 64},
                    "replay": {
                        "num_shards": count,
                        "min_size_to_sample": 64,
                        "replay_ratio": None,
                        "chunk_steps": 64,
                    },
                    "rollout": {"num_workers": count, "env_id": env_id, "warmup_steps": 0},
                }
            )
            shard_class = remote_shard_class(num_cpus=0)
            shards = [shard_class.remote(config.replay, 64, i) for i in range(count)]
            board = remote_weights_board_class().remote()
            policy = policy_for(config.learner)
            weights = {k: v.numpy() for k, v in policy.state_dict().items()}
            ray.get(board.publish.remote(0, [ray.put(weights)]))
            actors = [
                remote_worker_class(num_cpus=1).remote(config, shards, board, i)
                for i in range(count)
            ]
            ray.get([a.run.remote(32) for a in actors])  # warm up: env, policy, first weights
            start = time.perf_counter()
            stats = ray.get([a.run.remote(steps_per_worker) for a in actors])
            ray.get([a.flush.remote() for a in actors])
            elapsed = time.perf_counter() - start
            aggregate = count * steps_per_worker / elapsed
            results.append(
                {
                    "workers": count,
                    "aggregate_steps_per_s": aggregate,
                    "per_worker_steps_per_s": [s["steps_per_s"] for s in stats],
                }
            )
            progress(f"{count} worker(s): {aggregate:.0f} env steps/s aggregate")
            for actor in actors:
                ray.kill(actor)
            for shard in shards:
                ray.kill(shard)
            ray.kill(board)
    finally:
        if started_ray:
            ray.shutdown()
    single = next((r["aggregate_steps_per_s"] for r in results if r["workers"] == 1), None)
    for row in results:
        row["scaling_efficiency"] = (
            row["aggregate_steps_per_s"] / (row["workers"] * single) if single else None
        )
    report = {
        "benchmark": "rollout",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "env_id": env_id,
        "steps_per_worker": steps_per_worker,
        "results": results,
        "bare_env_steps_per_s": baseline,
        "inference_latency_ms": latency,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    progress(format_table(report))
    return report


def format_table(report: dict[str, Any]) -> str:
    """The rows of a ``bench rollout`` report as a text table: per worker
    count, aggregate and mean per-worker env steps/s, the scaling efficiency
    and the aggregate against the bare environment (the baseline)."""
    bare = report["bare_env_steps_per_s"]
    latency = report["inference_latency_ms"]
    lines = [
        f"rollout on {report['env_id']}, {report['steps_per_worker']} env steps per worker; "
        f"bare env {bare:.0f} steps/s, policy inference {latency['mean']:.2f} ms at batch 1",
        f"{'workers':>7} {'steps/s':>9} {'per worker':>10} {'scaling':>8} {'vs bare env':>11}",
    ]
    for row in report["results"]:
        per_worker = row["per_worker_steps_per_s"]
        mean = sum(per_worker) / len(per_worker) if per_worker else float("nan")
        scaling = row["scaling_efficiency"]
        lines.append(
            f"{row['workers']:>7} {row['aggregate_steps_per_s']:>9.0f} {mean:>10.0f} "
            + (f"{scaling:>7.2f}x" if scaling is not None else f"{'-':>8}")
            + f" {row['aggregate_steps_per_s'] / bare:>10.2f}x"
        )
    return "\n".join(lines)
