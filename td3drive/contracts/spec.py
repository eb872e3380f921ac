"""The data contract shared by every part of td3drive (DESIGN.md §2).

Everything that crosses a boundary (simulator → rollout worker → replay shard →
learner → rollout worker) is described here once, as code: the gymnasium
spaces, the transition record, and the training batch. This module depends on
numpy and gymnasium only, so every service can import it.

Observation (gymnasium ``Dict``):

* ``image``: ``uint8[4, 84, 84]``, the 4 most recent grayscale frames, oldest
  first. Pixels stay uint8 everywhere; the single conversion to float is
  :func:`td3drive.contracts.networks.normalize_image` (``x / 255``), the encoder's first line.
* ``vector``: ``float32[23]`` laid out as :data:`VECTOR_LAYOUT`: speed,
  lateral deviation from the lane centre, heading error to the lane, then 10
  look-ahead waypoints ``(x, y)`` in the ego frame. Units and scaling are
  applied by the driving task's observation builder.

Action: ``float32[2]`` in ``[-1, 1]``: ``[steer, throttle_brake]``;
``throttle_brake > 0`` is throttle, ``< 0`` is brake.

Episode ends: ``terminated`` (collision, off-road, route complete) stops
bootstrapping; ``truncated`` (time limit, worker restart) does not. They are
never merged into one ``done`` flag. What the learner sees is the per-sample
``discount`` of a :class:`Batch`: ``γ^k`` for an n-step return of ``k`` steps
that did not terminate, ``0`` when it did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np

FRAME_STACK = 4
"""Frames per observation image (oldest first)."""
FRAME_SIZE = 84
"""Height and width of one grayscale frame, pixels."""
IMAGE_SHAPE = (FRAME_STACK, FRAME_SIZE, FRAME_SIZE)
IMAGE_DTYPE = np.dtype(np.uint8)

NUM_WAYPOINTS = 10
"""Look-ahead waypoints in the observation vector."""
VECTOR_LAYOUT: tuple[str, ...] = (
    "speed",  # m/s, scaled by the driving task
    "lateral_deviation",  # m from the lane centre, + is left
    "heading_error",  # rad between ego heading and lane direction
    *(f"waypoint_{i}_{axis}" for i in range(NUM_WAYPOINTS) for axis in ("x", "y")),  # m, ego frame
)
VECTOR_DIM = len(VECTOR_LAYOUT)
VECTOR_SHAPE = (VECTOR_DIM,)
VECTOR_DTYPE = np.dtype(np.float32)

ACTION_DIM = 2
ACTION_SHAPE = (ACTION_DIM,)
ACTION_DTYPE = np.dtype(np.float32)
ACTION_LOW = -1.0
ACTION_HIGH = 1.0
STEER, THROTTLE_BRAKE = 0, 1
"""Indices into the action vector."""

OBS_KEYS = ("image", "vector")

assert VECTOR_DIM == 23, VECTOR_DIM


def observation_space() -> gym.spaces.Dict:
    """The observation space every simulator exposes.

    Returns:
        ``Dict(image=Box(0, 255, (4, 84, 84), uint8), vector=Box(-inf, inf, (23,), float32))``.
    """
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, IMAGE_SHAPE, dtype=np.uint8),
            "vector": gym.spaces.Box(-np.inf, np.inf, VECTOR_SHAPE, dtype=np.float32),
        }
    )


def action_space() -> gym.spaces.Box:
    """``Box(-1, 1, (2,), float32)``: ``[steer, throttle_brake]``."""
    return gym.spaces.Box(ACTION_LOW, ACTION_HIGH, ACTION_SHAPE, dtype=np.float32)


class SpecError(ValueError):
    """Data that does not match the contract of this module.

    Attributes:
        field: dotted name of the offending field, e.g. ``"batch.obs_image"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (type(self), (self.field, self.message))


@dataclass(frozen=True)
class Transition:
    """One environment step, as a rollout worker records it.

    Attributes:
        obs: ``{"image": uint8[4,84,84], "vector": float32[23]}`` before the step.
        action: ``float32[2]`` in ``[-1, 1]``.
        reward: reward of this step (units set by the driving task).
        next_obs: observation after the step, same layout as ``obs``.
        terminated: the episode ended in a terminal state (no bootstrap).
        truncated: the episode was cut (time limit, restart); bootstrap.
        policy_version: learner update count of the weights that chose ``action``.
        episode_id: unique per episode within a worker.
        step: index of this step within its episode, from 0.
    """

    obs: Mapping[str, np.ndarray]
    action: np.ndarray
    reward: float
    next_obs: Mapping[str, np.ndarray]
    terminated: bool
    truncated: bool
    policy_version: int = 0
    episode_id: int = 0
    step: int = 0


@dataclass(frozen=True)
class Batch:
    """A training batch of ``B`` (n-step) transitions, as numpy arrays.

    Attributes:
        obs_image: ``uint8[B, 4, 84, 84]``.
        obs_vector: ``float32[B, 23]``.
        action: ``float32[B, 2]`` in ``[-1, 1]``.
        reward: ``float32[B]``; the discounted n-step sum of rewards.
        discount: ``float32[B]`` in ``[0, 1]``; multiplies the bootstrapped
            value: ``γ^k`` after ``k`` non-terminal steps, ``0`` after
            ``terminated``. A ``truncated`` step keeps ``γ^k``.
        next_obs_image: ``uint8[B, 4, 84, 84]``, the observation ``k`` steps later.
        next_obs_vector: ``float32[B, 23]``.
        weight: optional ``float32[B]`` importance-sampling weights (> 0) from
            prioritized replay; ``None`` means uniform.
    """

    obs_image: np.ndarray
    obs_vector: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    next_obs_image: np.ndarray
    next_obs_vector: np.ndarray
    weight: np.ndarray | None = None

    @property
    def size(self) -> int:
        """Number of transitions ``B``."""
        return int(self.reward.shape[0]) if self.reward.ndim else 0

    def arrays(self) -> dict[str, np.ndarray]:
        """The present fields by name (``weight`` omitted when ``None``)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    def validate(self) -> Batch:
        """Check every field against the contract and return ``self``.

        Checks type (numpy array), dtype, shape (with one common ``B ≥ 1``),
        finiteness of every float field, ``action`` within ``[-1, 1]``,
        ``discount`` within ``[0, 1]`` and ``weight > 0``. Pixels are uint8 so
        they need no range check.

        Raises:
            SpecError: naming the first offending field, e.g.
                ``batch.obs_vector: contains NaN or inf at index 3``.
        """
        size = None
        for name, (shape, dtype) in _BATCH_SCHEMA.items():
            value = getattr(self, name)
            if value is None and name == "weight":
                continue
            field = f"batch.{name}"
            if not isinstance(value, np.ndarray):
                raise SpecError(field, f"expected a numpy array, got {type(value).__name__}")
            if value.dtype != dtype:
                raise SpecError(field, f"expected dtype {dtype}, got {value.dtype}")
            if value.ndim != len(shape) + 1 or value.shape[1:] != shape:
                want = "[B" + "".join(f", {d}" for d in shape) + "]"
                raise SpecError(field, f"expected shape {want}, got {list(value.shape)}")
            if size is None:
                size = value.shape[0]
                if size < 1:
                    raise SpecError(field, "batch is empty")
            elif value.shape[0] != size:
                raise SpecError(field, f"batch size {value.shape[0]} differs from {size}")
            if value.dtype.kind == "f":
                finite = np.isfinite(value)
                if not finite.all():
                    index = int(np.argwhere(~finite)[0][0])
                    raise SpecError(field, f"contains NaN or inf at index {index}")
        if np.abs(self.action).max() > ACTION_HIGH:
            raise SpecError("batch.action", "values outside [-1, 1]")
        if self.discount.min() < 0.0 or self.discount.max() > 1.0:
            raise SpecError("batch.discount", "values outside [0, 1]")
        if self.weight is not None and self.weight.min() <= 0.0:
            raise SpecError("batch.weight", "importance weights must be > 0")
        return self

    @classmethod
    def from_transitions(cls, transitions: Sequence[Transition], gamma: float) -> Batch:
        """Stack one-step transitions into a batch.

        ``discount = γ · (1 − terminated)``: a terminated step does not
        bootstrap, a truncated one does (Pardo et al. 2018, "Time Limits in
        Reinforcement Learning").

        Args:
            transitions: at least one transition.
            gamma: discount factor in ``[0, 1]``.

        Raises:
            SpecError: on an empty sequence or a gamma outside ``[0, 1]``.
        """
        if not transitions:
            raise SpecError("transitions", "need at least one transition")
        if not 0.0 <= gamma <= 1.0:
            raise SpecError("gamma", f"must be in [0, 1], got {gamma}")
        discount = [0.0 if t.terminated else gamma for t in transitions]
        return cls(
            obs_image=np.stack([t.obs["image"] for t in transitions]),
            obs_vector=np.stack([t.obs["vector"] for t in transitions]).astype(np.float32),
            action=np.stack([t.action for t in transitions]).astype(np.float32),
            reward=np.asarray([t.reward for t in transitions], dtype=np.float32),
            discount=np.asarray(discount, dtype=np.float32),
            next_obs_image=np.stack([t.next_obs["image"] for t in transitions]),
            next_obs_vector=np.stack([t.next_obs["vector"] for t in transitions]).astype(
                np.float32
            ),
        )


_BATCH_SCHEMA: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {
    "obs_image": (IMAGE_SHAPE, IMAGE_DTYPE),
    "obs_vector": (VECTOR_SHAPE, VECTOR_DTYPE),
    "action": (ACTION_SHAPE, ACTION_DTYPE),
    "reward": ((), np.dtype(np.float32)),
    "discount": ((), np.dtype(np.float32)),
    "next_obs_image": (IMAGE_SHAPE, IMAGE_DTYPE),
    "next_obs_vector": (VECTOR_SHAPE, VECTOR_DTYPE),
    "weight": ((), np.dtype(np.float32)),
}
