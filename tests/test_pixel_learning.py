"""Pixels-only learning: the correct action is visible only in the image.

The task. Each observation is four identical 84×84 grayscale frames: a dark
background of mild uniform noise (0–32) with one bright (255) vertical bar,
``BAR_WIDTH`` pixels wide and full height, at a random column. The correct steer
is the bar's column mapped linearly onto ``[-1, 1]`` (left edge → -1, right
edge → +1). ``obs_vector`` is all zeros, so only the pixels tell the policy
where to steer.

The data. Offline, one-step episodes: each replayed transition is terminated,
so ``discount = 0`` and the TD target is the reward itself (``next_obs`` is a
copy of ``obs``; with a zero discount it never counts). Actions are uniform in
``[-1, 1]^2``; the reward is ``1 - (steer - target)^2``, a smooth bowl whose
maximum is at the target, so ``dQ/da`` points the actor towards it. Throttle
does not enter the reward. Fresh images are drawn for every batch.

The check. After a fixed number of updates (``UPDATES``, no wall-clock loop;
everything seeded), the deterministic actor's steer on ``EVAL_SIZE`` held-out
images must be within ``MAE_THRESHOLD`` mean absolute error of the target.
The best constant policy (steer 0) scores about 0.5 on uniform targets, so the
threshold is far below anything a policy blind to the image can reach.

Measured with this file's code on the 2-core development CPU (torch 2.13.0,
2 threads), ``UPDATES = 400`` of batch 32, held-out MAE by ``SEED`` (the test
runs seed 0). Wall time is the training loop of one mode on a quiet machine; it
doubles or worse while other processes compete for the two cores:

==========  =====  =====  =====  =====  =====  =====  =========
mode        0      1      2      3      4      5      wall time
==========  =====  =====  =====  =====  =====  =====  =========
separate    0.033  0.028  0.029  0.037  0.026  0.043  14–16 s
shared      0.054  0.046  0.051  0.055  0.049  0.051  10 s
frozen      0.484  0.446  0.531  0.510  0.479  0.481  5 s
constant    0.501  0.494  0.543  0.511  0.513  0.499  —
==========  =====  =====  =====  =====  =====  =====  =========

``separate`` and ``shared`` pass ``MAE_THRESHOLD = 0.15`` with a margin of at
least 2.7×. The ``frozen`` ablation (a random CNN that never trains, the
reference system's failure) stays near the constant baseline within the same
budget on every seed tried, so the test asserts that it does not reach the
threshold. That is a statement about this budget: a frozen random CNN keeps
some positional information and might get further with many more updates.

Why these hyperparameters (all set explicitly, so the defaults in
:class:`~td3drive.contracts.config.LearnerConfig` can move without silently changing
this test): a critic lr of 1e-3 with 256-wide heads fits the reward within
about 100 updates; an actor lr of 1e-4 with ``policy_delay = 2`` keeps the
actor from following the untrained critic's gradient into tanh saturation
(with actor lr 3e-4, or with 64-wide heads, the ``separate`` actor pinned
every steer to ±1 within 50–150 updates and recovered late or never); a
``features_dim`` of 256 instead of 512 is cheaper and learned as fast;
no random-shift augmentation, since shifting the image moves the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from learner.td3 import TD3Learner
from td3drive.contracts import spec
from td3drive.contracts.config import EncoderMode, LearnerConfig
from td3drive.contracts.spec import Batch

SEED = 0
"""Seeds the learner (init, target noise) and the training and held-out data."""
UPDATES = 400
"""Learner updates per mode: well under 60 s per mode on 2 CPU cores."""
BATCH_SIZE = 32
EVAL_SIZE = 256
"""Held-out images for the evaluation."""
MAE_THRESHOLD = 0.15
"""Mean absolute steer error the learned policy must beat (constant policy ≈ 0.5)."""

BAR_WIDTH = 6
"""Width of the bright bar, pixels."""
EDGE = 2
"""Pixels kept free between the bar and the image border."""
BACKGROUND_MAX = 32
"""Background pixels are uniform in ``[0, BACKGROUND_MAX]``."""
BAR_VALUE = 255

_FIRST_COLUMN = EDGE
_LAST_COLUMN = spec.FRAME_SIZE - EDGE - BAR_WIDTH


@dataclass(frozen=True)
class Evaluation:
    """Held-out result of one training run."""

    mae: float
    """Mean absolute error of the actor's steer."""
    constant_mae: float
    """The best constant policy's error on the same targets (steer = median)."""
    seconds: float
    """Wall time of the training loop, batch generation included."""

    def describe(self, mode: str) -> str:
        return (
            f"{mode}: held-out steer MAE {self.mae:.3f} after {UPDATES} updates "
            f"(threshold {MAE_THRESHOLD}, constant policy {self.constant_mae:.3f}, "
            f"training {self.seconds:.1f} s)"
        )


def bar_images(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size`` observations with a bright vertical bar at a random column.

    Returns:
        ``(images uint8[size, 4, 84, 84], target_steer float32[size])``; the
        target is the bar's column mapped linearly onto ``[-1, 1]``.
    """
    columns = rng.integers(_FIRST_COLUMN, _LAST_COLUMN + 1, size)
    frames = rng.integers(
        0, BACKGROUND_MAX + 1, (size, spec.FRAME_SIZE, spec.FRAME_SIZE), dtype=np.uint8
    )
    x = np.arange(spec.FRAME_SIZE)
    in_bar = (x >= columns[:, None]) & (x < columns[:, None] + BAR_WIDTH)  # [size, W]
    frames = np.where(in_bar[:, None, :], np.uint8(BAR_VALUE), frames)
    images = np.repeat(frames[:, None], spec.FRAME_STACK, axis=1)
    target = (columns - _FIRST_COLUMN) / (_LAST_COLUMN - _FIRST_COLUMN) * 2.0 - 1.0
    return images, target.astype(np.float32)


def offline_batch(rng: np.random.Generator, size: int) -> Batch:
    """One-step, terminated transitions with uniform random actions and
    reward ``1 - (steer - target)^2``; the vector observation is all zeros."""
    images, target = bar_images(rng, size)
    action = rng.uniform(spec.ACTION_LOW, spec.ACTION_HIGH, (size, spec.ACTION_DIM))
    action = action.astype(np.float32)
    reward = (1.0 - (action[:, 0] - target) ** 2).astype(np.float32)
    vector = np.zeros((size, spec.VECTOR_DIM), dtype=np.float32)
    return Batch(
        obs_image=images,
        obs_vector=vector,
        action=action,
        reward=reward,
        discount=np.zeros(size, dtype=np.float32),
        next_obs_image=images,
        next_obs_vector=vector.copy(),
    )


def pixel_task_config(mode: EncoderMode) -> LearnerConfig:
    """The learner settings this test was measured with (see the module docstring)."""
    return LearnerConfig(
        device="cpu",
        encoder=mode,
        cnn="nature",
        # NatureCNN's ReLU output, as the table above was measured. With the
        # LayerNorm+tanh trunk a frozen random CNN reaches MAE 0.13 here too
        # (normalised random features are a usable linear basis for a bar's
        # column), so only the ReLU encoder makes "frozen fails" a contrast
        # that shows gradients reaching the CNN.
        encoder_output="relu",
        action_preactivation_penalty=0.0,
        features_dim=256,
        actor_hidden=(256, 256),
        critic_hidden=(256, 256),
        actor_lr=1e-4,
        critic_lr=1e-3,
        batch_size=BATCH_SIZE,
        tau=0.005,
        policy_noise=0.2,
        noise_clip=0.5,
        policy_delay=2,
        actor_max_grad_norm=10.0,
        critic_max_grad_norm=10.0,
        random_shift_pad=0,
        seed=SEED,
    )


def train_and_evaluate(mode: EncoderMode) -> Evaluation:
    """Train a fresh learner for ``UPDATES`` updates, then score its actor on
    held-out images."""
    learner = TD3Learner(pixel_task_config(mode))
    train_rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    for _ in range(UPDATES):
        learner.update(offline_batch(train_rng, BATCH_SIZE))
    seconds = time.perf_counter() - start

    images, target = bar_images(np.random.default_rng([SEED, 1]), EVAL_SIZE)
    vector = torch.zeros(EVAL_SIZE, spec.VECTOR_DIM)
    with torch.no_grad():
        action = learner.actor(torch.from_numpy(images), vector).numpy()
    steer = action[:, 0]
    return Evaluation(
        mae=float(np.abs(steer - target).mean()),
        constant_mae=float(np.abs(target - np.median(target)).mean()),
        seconds=seconds,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_learns_to_steer_from_pixels_alone(
    mode: EncoderMode, record_property: Callable[[str, object], None]
) -> None:
    result = train_and_evaluate(mode)
    record_property("steer_mae", result.mae)
    record_property("train_seconds", result.seconds)
    assert result.mae < MAE_THRESHOLD, result.describe(mode)


@pytest.mark.slow
def test_frozen_encoder_does_not_learn_it_within_the_same_budget(
    record_property: Callable[[str, object], None],
) -> None:
    result = train_and_evaluate("frozen")
    record_property("steer_mae", result.mae)
    record_property("train_seconds", result.seconds)
    assert result.mae > MAE_THRESHOLD, result.describe("frozen")
