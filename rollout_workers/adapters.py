"""Train on any RGB pixel environment: turn it into td3drive's contract.

:class:`PixelEnvAdapter` wraps a gymnasium environment whose observation is an
RGB (or grayscale) ``uint8`` image and exposes the contract of
:mod:`td3drive.contracts.spec`:

* observation ``{"image": uint8[4,84,84], "vector": float32[23]}``: the image
  is converted to grayscale (gymnasium's ``GrayscaleObservation``, ITU-R 709
  luma weights), resized to 84×84 (Pillow, bilinear with antialiasing;
  gymnasium's ``ResizeObservation`` needs OpenCV, which td3drive does not
  depend on) and stacked 4 deep, oldest first (gymnasium's
  ``FrameStackObservation``; a reset fills the stack with its first frame,
  as td3drive's own simulators do). The vector comes from a user function
  ``vector_fn(env, obs, info) -> float32[23]`` (laid out as
  :data:`td3drive.contracts.spec.VECTOR_LAYOUT`) or is all zeros;
* action ``float32[2]`` in ``[-1, 1]``: ``[steer, throttle_brake]``, mapped to
  the environment's own action by a user function ``action_fn(action)``
  (:func:`car_racing_action` for ``CarRacing-v3``), or linearly onto the
  bounds of an environment whose action is already a 2-d ``Box``;
* ``info["episode_metrics"] = {"return", "length"}`` on the step that ends an
  episode (``terminated`` or ``truncated`` seen by the adapter), for the
  workers' and the evaluator's episode statistics. Metrics the environment
  reports itself under that key are kept.

``td3drive/CarRacingPixels-v0`` (:func:`car_racing_pixels`) is gymnasium's
``CarRacing-v3`` through this adapter; it needs ``box2d``.

Why this module lives in ``rollout_workers/`` and not ``td3drive/``:
``td3drive/`` holds the contracts that every service imports (spaces, config,
metric names) and imports no service; building and stepping environments is
the rollout service's side, like its simulators. ``td3drive`` registers the
ready-made id with a string entry point, so nothing of this module (nor
Box2D) is imported until an environment is made.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import (
    FrameStackObservation,
    GrayscaleObservation,
    TransformObservation,
)
from PIL import Image

from td3drive.contracts import spec

VectorFn = Callable[[gym.Env, Any, dict[str, Any]], Any]
"""``vector_fn(env, obs, info) -> float32[23]``: ``env`` is the wrapped
environment (``env.unwrapped`` reaches the simulator's state), ``obs`` its own
observation (the RGB frame) and ``info`` its ``info`` of the same reset or
step."""
ActionFn = Callable[[np.ndarray], Any]
"""``action_fn(action) -> env action``: ``action`` is the contract's
``float32[2]`` ``[steer, throttle_brake]`` in ``[-1, 1]``."""


def car_racing_action(action: np.ndarray) -> np.ndarray:
    """The contract's action as ``CarRacing-v3``'s ``[steer, gas, brake]``.

    ``steer`` passes through (``+1`` is right in both, ``-1`` left);
    ``throttle_brake > 0`` is gas, ``< 0`` is brake (its magnitude), as in
    the contract (:mod:`td3drive.contracts.spec`).

    Args:
        action: ``float32[2]`` ``[steer, throttle_brake]``; clipped to ``[-1, 1]``.

    Returns:
        ``float32[3]``: ``steer`` in ``[-1, 1]``, ``gas`` and ``brake`` in ``[0, 1]``.
    """
    steer, throttle_brake = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
    return np.array([steer, max(throttle_brake, 0.0), max(-throttle_brake, 0.0)], dtype=np.float32)


class _KeepObservation(gym.ObservationWrapper[Any, Any, Any]):
    """Passes observations through and keeps the last one (for ``vector_fn``)."""

    def __init__(self, env: gym.Env[Any, Any]) -> None:
        super().__init__(env)
        self.last: Any = None

    def observation(self, observation: Any) -> Any:
        self.last = observation
        return observation


class PixelEnvAdapter(gym.Wrapper[dict[str, np.ndarray], np.ndarray, Any, Any]):
    """An RGB pixel environment seen through td3drive's contract (module docstring).

    Args:
        env: a gymnasium environment whose observation space is a ``Box`` of
            ``uint8[H, W, 3]`` (RGB) or ``uint8[H, W]`` (grayscale), bounds
            ``[0, 255]``.
        vector_fn: fills ``obs["vector"]`` (:data:`VectorFn`), or an import
            path ``"module:function"`` of one (usable from YAML
            ``rollout.env_kwargs``); ``None``: zeros.
        action_fn: maps the contract's action to ``env``'s (:data:`ActionFn`),
            or an import path ``"module:function"``; ``None``: ``env`` must have
            a 2-d ``Box`` action with finite bounds, onto which ``[-1, 1]`` is
            mapped linearly per dimension.

    Observation: ``{"image": uint8[4,84,84], "vector": float32[23]}``
    (:func:`td3drive.contracts.spec.observation_space`); action ``float32[2]`` in
    ``[-1, 1]`` (:func:`td3drive.contracts.spec.action_space`).

    Raises:
        ValueError: an observation space that is not such an image, no
            ``action_fn`` for an action space that is not a 2-d bounded
            ``Box``, or an import path that does not name a callable.
        ValueError: (from ``reset``/``step``) ``vector_fn`` returned something
            that is not 23 finite numbers, or an action of the wrong shape.
    """

    def __init__(
        self,
        env: gym.Env[Any, Any],
        vector_fn: VectorFn | str | None = None,
        action_fn: ActionFn | str | None = None,
    ) -> None:
        space = env.observation_space
        if not (
            isinstance(space, gym.spaces.Box)
            and space.dtype == np.uint8
            and (len(space.shape) == 2 or (len(space.shape) == 3 and space.shape[-1] == 3))
            and np.all(space.low == 0)
            and np.all(space.high == 255)
        ):
            raise ValueError(
                f"PixelEnvAdapter needs an observation space Box(0, 255, (H, W, 3), uint8) "
                f"(RGB) or Box(0, 255, (H, W), uint8) (grayscale), got {space}"
            )
        self._raw_env = env
        self._vector_fn = _resolve(vector_fn, "vector_fn")
        self._action_fn = _resolve(action_fn, "action_fn") or _linear_action_map(env.action_space)
        self._keep = _KeepObservation(env)
        frames: gym.Env[Any, Any] = self._keep
        if len(space.shape) == 3:
            frames = GrayscaleObservation(frames, keep_dim=False)
        if frames.observation_space.shape != (spec.FRAME_SIZE, spec.FRAME_SIZE):
            frames = TransformObservation(
                frames,
                _resize_frame,
                gym.spaces.Box(0, 255, (spec.FRAME_SIZE, spec.FRAME_SIZE), dtype=np.uint8),
            )
        frames = FrameStackObservation(frames, spec.FRAME_STACK, padding_type="reset")
        super().__init__(frames)
        self.observation_space = spec.observation_space()
        self.action_space = spec.action_space()
        self._return = 0.0
        self._length = 0

    @property
    def pixel_env(self) -> gym.Env[Any, Any]:
        """The wrapped environment, as passed in."""
        return self._raw_env

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset the environment; the image is its first frame 4 times."""
        image, info = self.env.reset(seed=seed, options=options)
        self._return, self._length = 0.0, 0
        return self._observation(image, info), info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Map ``action`` (``float32[2]``) to the environment's and step it.

        Raises:
            ValueError: ``action`` is not 2 numbers.
        """
        action = np.asarray(action, dtype=np.float32)
        if action.shape != spec.ACTION_SHAPE:
            raise ValueError(
                f"action must have shape {spec.ACTION_SHAPE} [steer, throttle_brake], "
                f"got {action.shape}"
            )
        image, reward, terminated, truncated, info = self.env.step(self._action_fn(action))
        self._return += float(reward)
        self._length += 1
        if terminated or truncated:
            info = dict(info)
            metrics = dict(info.get("episode_metrics", {}))
            metrics.setdefault("return", self._return)
            metrics.setdefault("length", self._length)
            info["episode_metrics"] = metrics
        return self._observation(image, info), float(reward), terminated, truncated, info

    def _observation(self, image: np.ndarray, info: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"image": image, "vector": self._vector(info)}

    def _vector(self, info: dict[str, Any]) -> np.ndarray:
        if self._vector_fn is None:
            return np.zeros(spec.VECTOR_SHAPE, dtype=np.float32)
        vector = np.asarray(self._vector_fn(self._raw_env, self._keep.last, info), np.float32)
        if vector.shape != spec.VECTOR_SHAPE:
            raise ValueError(
                f"vector_fn returned shape {vector.shape}, expected {spec.VECTOR_SHAPE} "
                f"(td3drive.contracts.spec.VECTOR_LAYOUT)"
            )
        if not np.isfinite(vector).all():
            raise ValueError("vector_fn returned NaN or inf")
        return vector


def car_racing_pixels(
    vector_fn: VectorFn | str | None = None,
    max_steps: int | None = None,
    **car_racing_kwargs: Any,
) -> PixelEnvAdapter:
    """``td3drive/CarRacingPixels-v0``: gymnasium's ``CarRacing-v3`` through
    :class:`PixelEnvAdapter` with :func:`car_racing_action`.

    CarRacing's 96×96 RGB frame (the car at the bottom centre, the track around
    it, a dashboard strip at the bottom) becomes the 84×84 grayscale stack. One
    step is one CarRacing frame (50 fps); its reward is ``-0.1`` per frame plus
    ``1000 / N`` per track tile visited; leaving the playfield terminates with
    ``-100``.

    Args:
        vector_fn: as :class:`PixelEnvAdapter`'s; ``None``: zeros.
        max_steps: steps before an episode is truncated (CarRacing-v3's own
            limit, 1000, when ``None``). Set here, inside the adapter, so
            the adapter sees the truncation and reports the episode's metrics
            (``gymnasium.make``'s own ``max_episode_steps`` wraps outside it).
        car_racing_kwargs: passed to ``gymnasium.make("CarRacing-v3", ...)``
            (``lap_complete_percent``, ``domain_randomize``, ``render_mode``...).

    Raises:
        gymnasium.error.DependencyNotInstalled: ``box2d`` (or pygame) is not installed.
    """
    env = gym.make("CarRacing-v3", max_episode_steps=max_steps, **car_racing_kwargs)
    return PixelEnvAdapter(env, vector_fn=vector_fn, action_fn=car_racing_action)


def _resize_frame(frame: np.ndarray) -> np.ndarray:
    """``uint8[H, W]`` → ``uint8[84, 84]`` (Pillow, bilinear, antialiased when shrinking)."""
    size = (spec.FRAME_SIZE, spec.FRAME_SIZE)
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))


def _linear_action_map(space: gym.Space[Any]) -> ActionFn:
    """``[-1, 1]²`` onto a bounded 2-d ``Box``, per dimension (gymnasium's ``RescaleAction``).

    Raises:
        ValueError: any other action space.
    """
    if not (
        isinstance(space, gym.spaces.Box)
        and space.shape == spec.ACTION_SHAPE
        and np.all(np.isfinite(space.low))
        and np.all(np.isfinite(space.high))
    ):
        raise ValueError(
            f"the environment's action space {space} is not a bounded 2-d Box; pass "
            "action_fn to map the contract's [steer, throttle_brake] in [-1, 1] to it "
            "(e.g. rollout_workers.adapters.car_racing_action for CarRacing)"
        )
    low = space.low.astype(np.float32)
    half_range = (space.high.astype(np.float32) - low) / 2.0
    dtype = space.dtype

    def linear(action: np.ndarray) -> np.ndarray:
        return (low + (np.clip(action, -1.0, 1.0) + 1.0) * half_range).astype(dtype)

    return linear


def _resolve(fn: Callable[..., Any] | str | None, name: str) -> Callable[..., Any] | None:
    """A callable, or the callable an import path ``"module:attribute"`` names.

    Raises:
        ValueError: a path without ``:``, or one that names no callable.
        ImportError: the module cannot be imported.
    """
    if fn is None or callable(fn):
        return fn
    module, sep, attribute = str(fn).partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"{name} must be a callable or 'module:function', got {fn!r}")
    target = getattr(importlib.import_module(module), attribute, None)
    if not callable(target):
        raise ValueError(f"{name}={fn!r}: module {module!r} has no callable {attribute!r}")
    return target
