"""Synthetic driving-like episodes for tests and ``td3drive bench replay``.

Frames are views of a scrolling road texture (asphalt with grain, lane marks,
a car-sized blob, speckle noise) whose per-frame LZ4 ratio (~6×) matches what
DESIGN.md §7 measured on highway-env racetrack frames. They stand in for
simulator frames until the embedded simulator exists; outputs say so.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from td3drive.contracts import spec
from td3drive.contracts.codec import Chunk
from td3drive.contracts.spec import Transition

SPECKLE_FRACTION = 0.015
"""Share of pixels that are random bright specks: the entropy knob."""


class SyntheticEpisode:
    """A frame-stacking "environment" that yields transitions of one episode.

    Args:
        rng: randomness for the texture, vectors, actions and rewards.
        episode_id: stamped on every transition.
        length: steps in the episode.
        end: how the last step ends: ``"terminated"``, ``"truncated"`` or
            ``None`` (the episode is cut without an end flag).
        policy_version: stamped on every transition.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        episode_id: int,
        length: int,
        end: str | None = "truncated",
        policy_version: int = 0,
    ) -> None:
        self.rng = rng
        self.episode_id = episode_id
        self.length = length
        self.end = end
        self.policy_version = policy_version
        size = spec.FRAME_SIZE
        height = size + 2 * (length + spec.FRAME_STACK) + 8
        shade = np.linspace(70, 110, size).astype(np.int16)  # lighting across the road
        road = np.tile(shade, (height, 1))
        patches = rng.integers(0, height - 8, 12)
        for y in patches:  # repaired asphalt
            x = int(rng.integers(8, size - 24))
            road[y : y + 8, x : x + 16] += int(rng.integers(-15, 16))
        road[:, :6] = 40  # verges
        road[:, -6:] = 40
        for lane_x in (size // 3, 2 * size // 3):
            for y in range(0, height, 16):
                road[y : y + 8, lane_x - 1 : lane_x + 1] = 230  # dashed lane marks
        speckle = rng.random(road.shape) < SPECKLE_FRACTION
        road[speckle] = 160
        self.texture = np.clip(road, 0, 255).astype(np.uint8)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index``: the road scrolled by 2 px per step, with the car on it."""
        size = spec.FRAME_SIZE
        top = self.texture.shape[0] - size - 2 * index - 1
        frame = self.texture[top : top + size].copy()
        x = int(size / 2 + 10 * np.sin(index / 7))
        frame[60:72, x - 4 : x + 4] = 20  # the ego car
        return frame

    def stack(self, step: int) -> np.ndarray:
        """Observation image at ``step``: frames ``step .. step + 3``, oldest first."""
        return np.stack([self.frame(step + j) for j in range(spec.FRAME_STACK)])

    def transitions(self) -> list[Transition]:
        """All steps of the episode, with sliding frame stacks."""
        vectors = self.rng.standard_normal((self.length + 1, spec.VECTOR_DIM)).astype(np.float32)
        out = []
        for t in range(self.length):
            last = t == self.length - 1
            out.append(
                Transition(
                    obs={"image": self.stack(t), "vector": vectors[t]},
                    action=self.rng.uniform(-1, 1, spec.ACTION_DIM).astype(np.float32),
                    reward=float(self.rng.normal()),
                    next_obs={"image": self.stack(t + 1), "vector": vectors[t + 1]},
                    terminated=last and self.end == "terminated",
                    truncated=last and self.end == "truncated",
                    policy_version=self.policy_version,
                    episode_id=self.episode_id,
                    step=t,
                )
            )
        return out


def chunked(transitions: list[Transition], chunk_steps: int) -> Iterator[Chunk]:
    """Split one episode's transitions into chunks of at most ``chunk_steps``."""
    for start in range(0, len(transitions), chunk_steps):
        yield Chunk.from_transitions(transitions[start : start + chunk_steps])
