"""The learning core: TD3 over Dict observations with trainable CNN encoders.

Pure PyTorch; the Ray actor wrapper lives in its own thin module.
"""

from learner.td3 import CheckpointError, NonFiniteLossError, TD3Learner
from td3drive.contracts.networks import Actor, ActorHead, Critic, NatureCNN, TwinQHead, build_policy

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
