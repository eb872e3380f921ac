"""Encoders, actor and critic networks over Dict observations.

Shapes: ``B`` is the batch size; ``F`` the encoder width (``features_dim``).

* :class:`NatureCNN`: ``uint8[B, 4, 84, 84] → float32[B, F]``.
* :class:`ActorHead`: ``(float32[B, F], float32[B, 23]) → float32[B, 2]`` in ``[-1, 1]``.
* :class:`TwinQHead`: ``(features, vector, action) → (Q1, Q2)``, each ``float32[B]``.
* :class:`Actor` = encoder + actor head; :class:`Critic` = encoder + twin Q heads.

The encoder is a submodule of the network that uses it, so a target network
made by copying an :class:`Actor` or :class:`Critic` includes its encoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from td3drive.contracts import spec
from td3drive.contracts.config import LearnerConfig


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """The one place pixels become floats: ``uint8 [0, 255] → float32 [0, 1]``.

    Args:
        image: ``uint8[B, C, H, W]``.

    Returns:
        ``float32[B, C, H, W]`` equal to ``image / 255``.

    Raises:
        TypeError: if ``image`` is not uint8 (a float input means someone
            normalised already, or stored floats: both are bugs).
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    return image.float().div_(255.0)


class NatureCNN(nn.Module):
    """The DQN encoder of Mnih et al. 2015 ("Human-level control through deep
    reinforcement learning", Nature), as in SB3's ``NatureCNN``.

    conv 32×8×8 stride 4 → conv 64×4×4 stride 2 → conv 64×3×3 stride 1, ReLU
    after each, flatten (64×7×7 = 3136 for 84×84 input) → linear → ReLU.

    With ``output="layernorm_tanh"`` the final ReLU is replaced by LayerNorm
    then tanh (the trunk of SAC-AE, Yarats et al. 2019, and DrQ-v2, Yarats et
    al. 2021), which keeps features in ``[−1, 1]`` however the convs train; with
    the unbounded ReLU a trained encoder's features grow until the actor's
    tanh saturates (``docs/benchmarks.md``, "Actor saturation").

    With ``pooled=True`` a 2×2 max-pool of stride 1 follows each conv's ReLU
    (the reference notes' variant); the flattened size is then 64×4×4 = 1024.
    The flattened size is computed from the input shape, never hard-coded.

    Args:
        in_channels: stacked frames, 4 by contract.
        features_dim: output width ``F``.
        pooled: add the max-pools.
        frame_size: input height and width, pixels.
        output: ``"relu"`` (output ``≥ 0``) or ``"layernorm_tanh"`` (output in ``[−1, 1]``).

    Input ``uint8[B, in_channels, frame_size, frame_size]``; output ``float32[B, F]``.

    Raises:
        ValueError: unknown ``output``.
    """

    def __init__(
        self,
        in_channels: int = spec.FRAME_STACK,
        features_dim: int = 512,
        pooled: bool = False,
        frame_size: int = spec.FRAME_SIZE,
        output: str = "relu",
    ) -> None:
        super().__init__()
        if output not in ("relu", "layernorm_tanh"):
            raise ValueError(
                f"unknown encoder output {output!r}; expected 'relu' or 'layernorm_tanh'"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels, kernel, stride in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
            layers += [nn.Conv2d(channels, out_channels, kernel, stride), nn.ReLU()]
            if pooled:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=1))
            channels = out_channels
        layers.append(nn.Flatten())
        self.conv = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, in_channels, frame_size, frame_size)).shape[1]
        self.flat_dim = int(flat)
        bound: list[nn.Module] = (
            [nn.ReLU()] if output == "relu" else [nn.LayerNorm(features_dim), nn.Tanh()]
        )
        self.linear = nn.Sequential(nn.Linear(self.flat_dim, features_dim), *bound)
        self.features_dim = features_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.linear(self.conv(normalize_image(image)))


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """``Linear → ReLU`` for each hidden width, then a final ``Linear``."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ActorHead(nn.Module):
    """Deterministic policy head: ``tanh(MLP([features ‖ vector]))``.

    Input ``features: float32[B, F]``, ``vector: float32[B, 23]``; output
    ``float32[B, 2]`` in ``[-1, 1]`` (``[steer, throttle_brake]``).
    """

    def __init__(self, features_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.net = mlp(features_dim + spec.VECTOR_DIM, hidden, spec.ACTION_DIM)

    def preactivation(self, features: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """The action before its tanh, ``float32[B, 2]``, unbounded."""
        return self.net(torch.cat([features, vector], dim=1))

    def forward(self, features: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.preactivation(features, vector))


class TwinQHead(nn.Module):
    """Two independent Q heads over ``[features ‖ vector ‖ action]`` (TD3's
    clipped double-Q, Fujimoto et al. 2018 §4.2).

    Returns ``(q1, q2)``, each ``float32[B]``.
    """

    def __init__(self, features_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        in_dim = features_dim + spec.VECTOR_DIM + spec.ACTION_DIM
        self.q1 = mlp(in_dim, hidden, 1)
        self.q2 = mlp(in_dim, hidden, 1)

    def forward(
        self, features: torch.Tensor, vector: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([features, vector, action], dim=1)
        return self.q1(x).squeeze(1), self.q2(x).squeeze(1)

    def q1_only(
        self, features: torch.Tensor, vector: torch.Tensor, action: torch.Tensor
    ) -> torch.Tensor:
        """``Q1`` alone (the actor loss needs only it), ``float32[B]``."""
        return self.q1(torch.cat([features, vector, action], dim=1)).squeeze(1)


class Actor(nn.Module):
    """Encoder + actor head: everything acting needs, and all a rollout worker gets.

    ``forward(image uint8[B,4,84,84], vector float32[B,23]) → action float32[B,2]``.
    """

    def __init__(self, encoder: NatureCNN, head: ActorHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(image), vector)


class Critic(nn.Module):
    """Encoder + twin Q heads.

    ``forward(image, vector, action) → (q1, q2)``, each ``float32[B]``.
    """

    def __init__(self, encoder: NatureCNN, heads: TwinQHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = heads

    def forward(
        self, image: torch.Tensor, vector: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.encoder(image), vector, action)


def build_encoder(features_dim: int = 512, cnn: str = "nature", output: str = "relu") -> NatureCNN:
    """An encoder from the config's ``features_dim``, ``cnn`` variant and
    ``encoder_output``.

    Raises:
        ValueError: unknown ``cnn`` variant or ``output``.
    """
    if cnn not in ("nature", "pooled"):
        raise ValueError(f"unknown cnn variant {cnn!r}; expected 'nature' or 'pooled'")
    return NatureCNN(features_dim=features_dim, pooled=cnn == "pooled", output=output)


def build_policy(
    features_dim: int,
    actor_hidden: Sequence[int],
    cnn: str = "nature",
    encoder_output: str = "relu",
) -> Actor:
    """A freshly initialised :class:`Actor`, the shape a rollout worker loads
    :meth:`learner.td3.TD3Learner.policy_weights` into.

    ``forward(uint8[B, 4, 84, 84], float32[B, 23]) → float32[B, 2]`` in ``[−1, 1]``.

    Raises:
        ValueError: unknown ``cnn`` variant or ``encoder_output``.
    """
    return Actor(
        build_encoder(features_dim, cnn, encoder_output), ActorHead(features_dim, actor_hidden)
    )


def encoder_for(config: LearnerConfig) -> NatureCNN:
    """:func:`build_encoder` with the architecture fields of a learner config
    (``features_dim``, ``cnn``, ``encoder_output``); output ``float32[B, F]``."""
    return build_encoder(config.features_dim, config.cnn, config.encoder_output)


def policy_for(config: LearnerConfig) -> Actor:
    """:func:`build_policy` with the architecture fields of a learner config:
    the policy a worker must build to load that learner's published weights."""
    return build_policy(config.features_dim, config.actor_hidden, config.cnn, config.encoder_output)


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without the warning for read-only arrays.

    Arrays that come out of Ray's object store are read-only views (zero-copy);
    the tensor shares their memory and must never be written in place, which
    none of td3drive's code does (``normalize_image`` and ``random_shift``
    return new tensors).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def load_policy_weights(policy: Actor, weights: Mapping[str, np.ndarray]) -> None:
    """Copy published policy weights (``TD3Learner.policy_weights()[1]``) into
    ``policy``.

    Raises:
        RuntimeError: missing or unexpected keys, or a shape mismatch (from
            ``load_state_dict``): the weights belong to another architecture.
    """
    policy.load_state_dict({name: read_only_tensor(value) for name, value in weights.items()})
