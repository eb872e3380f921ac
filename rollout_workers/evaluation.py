"""Deterministic evaluation: the policy without exploration noise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import rollout_workers  # noqa: F401  (registers the td3drive environments)
from rollout_workers.video import DEFAULT_FPS, EvaluationVideo
from td3drive.contracts.networks import Actor

EVAL_SEED_OFFSET = 10_000_000
"""Evaluation episodes use seeds far from the training workers'."""


@torch.no_grad()
def evaluate_policy(
    policy: Actor,
    env_id: str,
    env_kwargs: Mapping[str, Any] | None = None,
    episodes: int = 5,
    seed: int = 0,
    video: EvaluationVideo | None = None,
) -> list[dict[str, Any]]:
    """Run ``episodes`` episodes with the deterministic policy.

    Args:
        policy: acts on ``uint8[1,4,84,84]`` images and ``float32[1,23]`` vectors.
        env_id: gymnasium id (any env with the td3drive spaces).
        env_kwargs: passed to ``gymnasium.make``.
        episodes: how many.
        seed: episode ``i`` resets with ``seed + EVAL_SEED_OFFSET + i``.
        video: records the episodes it :meth:`~EvaluationVideo.wants`, one
            frame after the reset and one per step (the env's ``render()``
            beside ``obs["image"][-1]``, with ``info["speed_mps"]`` and the
            action). The env is then made with ``render_mode="rgb_array"``
            (unless ``env_kwargs`` names one) and ``video.fps`` defaults to its
            ``metadata["render_fps"]``. ``None``: no render mode, no
            ``render()`` call, no per-step cost. The caller finishes the clip.

    Returns:
        One ``info["episode_metrics"]`` dict per episode (``return`` and
        ``length`` at least, for environments that do not report metrics).

    Raises:
        rollout_workers.video.VideoError: a frame the clip cannot take.
    """
    kwargs = dict(env_kwargs or {})
    if video is not None:
        kwargs.setdefault("render_mode", "rgb_array")
    env = gym.make(env_id, **kwargs)
    if video is not None and video.fps is None:
        video.fps = float(env.metadata.get("render_fps") or DEFAULT_FPS)
    policy.eval()
    results = []
    try:
        for episode in range(episodes):
            obs, info = env.reset(seed=seed + EVAL_SEED_OFFSET + episode)
            total, length = 0.0, 0
            recorder = video if video is not None and video.wants(episode) else None
            if recorder is not None:
                recorder.add(
                    _view(env),
                    obs["image"][-1],
                    episode=episode,
                    step=0,
                    speed_mps=info.get("speed_mps"),
                )
            while True:
                image = torch.from_numpy(np.ascontiguousarray(obs["image"]))[None]
                vector = torch.from_numpy(np.ascontiguousarray(obs["vector"]))[None]
                action = policy(image, vector)[0].numpy()
                obs, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                length += 1
                if recorder is not None:
                    recorder.add(
                        _view(env),
                        obs["image"][-1],
                        episode=episode,
                        step=length,
                        action=action,
                        speed_mps=info.get("speed_mps"),
                        episode_return=total,
                        end_reason=info.get("end_reason") if terminated or truncated else None,
                    )
                if terminated or truncated:
                    metrics = dict(info.get("episode_metrics", {}))
                    metrics.setdefault("return", total)
                    metrics.setdefault("length", length)
                    results.append(metrics)
                    break
    finally:
        env.close()
    return results


def _view(env: gym.Env[Any, Any]) -> np.ndarray | None:
    """``env.render()`` when it is one image (``render_mode="rgb_array"``), else ``None``."""
    frame: Any = env.render()
    return frame if isinstance(frame, np.ndarray) else None


def summarize(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"episodes", "return_mean", "success_rate", "route_completion_mean",
    "route_completion_max", "mean_speed_kmh", "collision_rate", "off_road_rate",
    "end_reasons"}`` over episode metrics: means over episodes (``None`` where
    the environment did not report a field; route completion and rates in
    ``[0, 1]``, speed in km/h), and how many episodes ended for each reason
    (``collision``, ``off_road``, ``stuck``, ``route_complete``, ``time_limit``)."""

    def mean(key: str) -> float | None:
        values = [float(e[key]) for e in episodes if e.get(key) is not None]
        return float(np.mean(values)) if values else None

    completions = [float(e["route_completion"]) for e in episodes if "route_completion" in e]
    reasons: dict[str, int] = {}
    for episode in episodes:
        reason = str(episode.get("end_reason"))
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "episodes": len(episodes),
        "return_mean": mean("return"),
        "success_rate": mean("success"),
        "route_completion_mean": mean("route_completion"),
        "route_completion_max": max(completions) if completions else None,
        "mean_speed_kmh": mean("mean_speed_kmh"),
        "collision_rate": mean("collision"),
        "off_road_rate": mean("off_road"),
        "end_reasons": dict(sorted(reasons.items())),
    }
