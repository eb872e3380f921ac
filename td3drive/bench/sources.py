"""Where ``bench replay`` and ``bench pipeline`` get their transitions, and the
chunks they insert.

Two sources (``--source``): ``synthetic`` driving-like frames
(:mod:`td3drive.bench.synthetic`, no simulator needed) and ``racetrack``, the
embedded simulator driven by the scripted lane follower with steering noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from td3drive.bench.synthetic import SyntheticEpisode, chunked
from td3drive.contracts.codec import encode
from td3drive.contracts.spec import Transition

Progress = Callable[[str], None]
EpisodesSource = Callable[[int], list[Transition]]
"""Returns that many consecutive transitions (whole episodes, steps numbered from 0)."""

SOURCES = ("synthetic", "racetrack")
"""The choices of ``--source``."""


def racetrack_transitions(count: int) -> list[Transition]:
    """``count`` transitions of the embedded simulator driven by the scripted
    lane follower with N(0, 0.3) steering noise (long, varied episodes); the
    last one is marked truncated."""
    import gymnasium as gym

    import rollout_workers
    from rollout_workers.scripted import lane_follower

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


def episodes_source_for(source: str) -> EpisodesSource | None:
    """The ``episodes_source`` of :func:`make_transitions` for a ``--source``
    name: ``None`` for ``"synthetic"``, :func:`racetrack_transitions` for
    ``"racetrack"``.

    Raises:
        ValueError: another name.
    """
    if source == "synthetic":
        return None
    if source == "racetrack":
        return racetrack_transitions
    raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")


def make_transitions(
    transitions: int,
    episode_length: int = 512,
    source: str = "synthetic",
    episodes_source: EpisodesSource | None = None,
    progress: Progress = print,
) -> tuple[list[Transition], str]:
    """The transitions a benchmark fills its buffers with, and a note on their origin.

    Args:
        transitions: how many.
        episode_length: steps per synthetic episode (each ends truncated).
        source: a name for the frames' origin.
        episodes_source: returns that many consecutive transitions (whole
            episodes, steps numbered from 0); ``None`` = synthetic frames.

    Returns:
        ``(transitions, source_note)``; episodes follow each other, each
        starting at step 0.

    Raises:
        ValueError: a source other than ``"synthetic"`` without ``episodes_source``.
    """
    if episodes_source is None:
        if source != "synthetic":
            raise ValueError(f"source {source!r} needs episodes_source")
        progress(f"generating {transitions} synthetic transitions (driving-like frames)")
        rng = np.random.default_rng(0)
        steps: list[Transition] = []
        episode = 0
        while len(steps) < transitions:
            length = min(episode_length, transitions - len(steps))
            steps += SyntheticEpisode(rng, episode, length, "truncated").transitions()
            episode += 1
        note = "synthetic driving-like frames (scrolling road texture, ~1.2 KB per LZ4 frame)"
        return steps, note
    progress(f"collecting {transitions} transitions from {source}")
    return episodes_source(transitions), f"frames from the simulator ({source})"


def split_episodes(steps: list[Transition]) -> list[list[Transition]]:
    """Consecutive transitions cut where a step numbered 0 starts an episode."""
    episodes: list[list[Transition]] = []
    for step in steps:
        if step.step == 0 or not episodes:
            episodes.append([])
        episodes[-1].append(step)
    return episodes


def encode_chunks(steps: list[Transition], chunk_steps: int) -> list[bytes]:
    """The payloads of ``steps`` cut into episodes, then chunks of ``chunk_steps``."""
    return [encode(c) for ep in split_episodes(steps) for c in chunked(ep, chunk_steps)]
