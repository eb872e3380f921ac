"""The learning core: TD3 over Dict observations with trainable CNN encoders.

Pure PyTorch; the Ray actor wrapper lives in its own thin module.
"""

from learner.networks import Actor, ActorHead, Critic, NatureCNN, TwinQHead, build_policy
from learner.td3 import CheckpointError, NonFiniteLossError, TD3Learner

__all__ = [
    "Actor",
    "ActorHead",
    "CheckpointError",
    "Critic",
    "NatureCNN",
    "NonFiniteLossError",
    "TD3Learner",
    "TwinQHead",
    "build_policy",
]
