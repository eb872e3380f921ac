"""TD3 over Dict observations with the encoders inside the networks.

Fujimoto, van Hoof, Meger 2018, "Addressing Function Approximation Error in
Actor-Critic Methods" (ICML), Algorithm 1:

* clipped double-Q target ``y = r + γ · min(Q1'(s', ã), Q2'(s', ã))`` (eq. 10),
  with ``γ`` replaced by the batch's per-sample ``discount`` (``γ^k``, or 0
  after ``terminated``), so n-step returns and time-limit truncation are the
  replay's business;
* target policy smoothing ``ã = clip(μ'(s') + clip(ε, −c, c), −1, 1)``,
  ``ε ~ N(0, σ)`` (eq. 15);
* delayed policy updates: actor and targets step every ``policy_delay``-th
  critic update (§5.2);
* Polyak targets ``θ' ← τ θ + (1 − τ) θ'``.

Every update re-encodes the sampled images, so the critic loss trains the
critic's CNN and (in ``separate`` mode) the actor loss trains the actor's CNN.
Where this departs from the paper, and why, is listed in ``learner/README.md``.

This module imports torch and the shared contracts only: no Ray.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from learner.augmentation import random_shift
from learner.networks import (
    Actor,
    ActorHead,
    Critic,
    TwinQHead,
    encoder_for,
    policy_for,
    read_only_tensor,
)
from td3drive import metric_names as M
from td3drive.config import LearnerConfig
from td3drive.spec import Batch
from td3drive.storage import RunStorage, StorageError, StorageNotFoundError, is_uri

CHECKPOINT_FORMAT = "td3drive.learner/1"

_LOSS_AND_NORM_KEYS = {
    "critic": (M.CRITIC_LOSS, M.CRITIC_GRAD_NORM_PRECLIP),
    "actor": (M.ACTOR_LOSS, M.ACTOR_GRAD_NORM_PRECLIP),
}

# How a resume treats each field of LearnerConfig (td3drive/config.py), one
# class per field; tests/test_learner_resume.py fails when a field is added to
# LearnerConfig without being classified here.
#
# ARCHITECTURE_FIELDS fix the networks' modules and tensor shapes: a
# checkpoint only loads into a learner whose config agrees on every one of
# them, and a resume that changes one is refused with a CheckpointError naming
# it (a new architecture is a new run). The frame stack, frame size, vector
# and action widths are contract constants (td3drive/spec.py), not config.
ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "encoder",  # which CNNs exist and which optimizer owns them
    "cnn",  # conv stack (max-pools change the flattened width)
    "encoder_output",  # relu vs LayerNorm+tanh: the LayerNorm has parameters
    "features_dim",  # encoder output width = heads' input width
    "actor_hidden",  # actor MLP widths
    "critic_hidden",  # Q head MLP widths
)
# RESUME_APPLIED_FIELDS may change between a checkpoint and the run that
# resumes it: the resumed learner runs with the run's current value (and
# reports the change, old -> new, in TD3Learner.resume_changes). The value is
# how each one takes effect.
RESUME_APPLIED_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "device": "the resumed learner is built on it; the checkpoint's tensors are mapped there",
        "actor_lr": "set in the actor optimizer's 'head' param group after its state is loaded",
        "critic_lr": "set in the critic optimizer's 'head' param group after its state is loaded",
        "encoder_lr": "set in the 'encoder' param groups after the optimizer states are loaded "
        "(null: the owning network's lr)",
        "batch_size": "read by the replay sampler the learner actor builds",
        "tau": "read at every Polyak update",
        "policy_noise": "read at every TD target",
        "noise_clip": "read at every TD target",
        "policy_delay": "read at every update (the actor steps when updates % policy_delay == 0)",
        "action_preactivation_penalty": "read at every actor step",
        "actor_max_grad_norm": "read at every actor step",
        "critic_max_grad_norm": "read at every critic step",
        "random_shift_pad": "read at every update",
        "seed": "re-seeds the noise and augmentation generator (else the checkpoint's "
        "generator state continues); network weights are the checkpoint's",
    }
)
# Bytes of a generator's get_state(): CPU (mt19937) and CUDA (Philox seed + offset).
_CPU_GENERATOR_STATE_BYTES = torch.Generator().get_state().numel()
_CUDA_GENERATOR_STATE_BYTES = 16
# Keys every td3drive.learner/1 checkpoint holds.
_REQUIRED_KEYS = (
    "config",
    "updates",
    "actor",
    "critic",
    "target_actor_head",
    "target_critic_heads",
    "actor_optimizer",
    "critic_optimizer",
    "encoder_init",
    "generator",
)


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient norm became NaN/inf; the offending step was not applied.

    Attributes:
        network: ``"actor"`` or ``"critic"``.
        diagnostics: the update's values at the time, by metric name.
    """

    def __init__(self, network: str, update: int, diagnostics: Mapping[str, float]) -> None:
        detail = ", ".join(f"{k}={v:.4g}" for k, v in diagnostics.items())
        super().__init__(
            f"non-finite {network} loss or gradient at update {update}; the {network} step "
            f"was not applied ({detail}). Usual causes: unbounded rewards, a learning rate "
            f"too high for the reward scale, NaN in the replayed data."
        )
        self.network = network
        self.update = update
        self.diagnostics = dict(diagnostics)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray's process boundary
        return (type(self), (self.network, self.update, self.diagnostics))


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this learner: missing, empty,
    truncated, not a td3drive learner checkpoint, or of another architecture.
    The message is one line and names the file or the fields."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error.

    Raises:
        RuntimeError: ``"cuda"`` requested and ``torch.cuda.is_available()`` is false.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


class TD3Learner:
    """Holds the online and target networks and their optimizers; one
    :meth:`update` per sampled batch.

    Networks by encoder mode (``config.encoder``):

    * ``separate``: ``actor = Actor(cnn_a, head)``, ``critic = Critic(cnn_c, twin_q)``;
      each target is a full copy, encoder included. The actor optimizer covers
      ``cnn_a`` and the head, the critic optimizer ``cnn_c`` and both Q heads.
    * ``shared``: one CNN, owned and trained by the critic; the actor head sees
      its features detached. Targets are copies of the heads only; the TD
      target encodes ``s'`` with the online CNN under ``no_grad`` (DrQ-v2).
    * ``frozen``: like ``shared`` but the CNN is in no optimizer and never
      changes: the reference system's failure, kept as an ablation baseline.

    Prioritized replay calls :meth:`update_with_td_errors` instead of
    :meth:`update` to get each sample's absolute TD error for its new priority.

    Args:
        config: learner hyperparameters.
        device: overrides ``config.device`` when given.

    Attributes:
        updates: number of completed :meth:`update` calls; also the policy
            version that :meth:`policy_weights` publishes.
        resume_changes: after :meth:`load_state_dict`, the learner fields whose
            value in :attr:`config` differs from the checkpoint's,
            ``{field: (checkpoint value, value in use)}``; empty otherwise.
    """

    def __init__(self, config: LearnerConfig, device: str | torch.device | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self.mode = config.encoder
        self.updates = 0
        # Fields whose value differs from the loaded checkpoint's, {name: (old, new)}.
        self.resume_changes: dict[str, tuple[Any, Any]] = {}
        # max(|Q1 − y|, |Q2 − y|) of the last update, on the device (see update_with_td_errors).
        self._abs_td_error: torch.Tensor | None = None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            critic_encoder = encoder_for(config)
            actor_encoder = encoder_for(config) if self.mode == "separate" else critic_encoder
            self.actor = Actor(actor_encoder, ActorHead(config.features_dim, config.actor_hidden))
            self.critic = Critic(
                critic_encoder, TwinQHead(config.features_dim, config.critic_hidden)
            )
        self.actor.to(self.device)
        self.critic.to(self.device)
        if self.mode == "frozen":
            self.critic.encoder.requires_grad_(False)

        # Targets. In `separate` mode they include the encoders; otherwise the
        # online encoder serves the target computation under no_grad.
        self.target_actor_head = frozen_copy(self.actor.head)
        self.target_critic_heads = frozen_copy(self.critic.heads)
        self.target_actor_encoder: nn.Module | None = None
        self.target_critic_encoder: nn.Module | None = None
        if self.mode == "separate":
            self.target_actor_encoder = frozen_copy(self.actor.encoder)
            self.target_critic_encoder = frozen_copy(self.critic.encoder)
        self._target_params, self._online_params = self._polyak_pairs()

        encoder_lr = config.encoder_lr
        actor_groups: list[dict[str, Any]] = [
            {"params": list(self.actor.head.parameters()), "lr": config.actor_lr, "name": "head"}
        ]
        critic_groups: list[dict[str, Any]] = [
            {"params": list(self.critic.heads.parameters()), "lr": config.critic_lr, "name": "head"}
        ]
        if self.mode == "separate":
            actor_groups.append(
                {
                    "params": list(self.actor.encoder.parameters()),
                    "lr": config.actor_lr if encoder_lr is None else encoder_lr,
                    "name": "encoder",
                }
            )
        if self.mode in ("separate", "shared"):
            critic_groups.append(
                {
                    "params": list(self.critic.encoder.parameters()),
                    "lr": config.critic_lr if encoder_lr is None else encoder_lr,
                    "name": "encoder",
                }
            )
        self.actor_optimizer = torch.optim.Adam(actor_groups)
        self.critic_optimizer = torch.optim.Adam(critic_groups)
        self._actor_params = [p for g in actor_groups for p in g["params"]]
        self._critic_params = [p for g in critic_groups for p in g["params"]]

        # Initial encoder weights, for the "is the CNN learning?" metric.
        actor_init = [p.detach().clone() for p in self.actor.encoder.parameters()]
        self._encoder_init = {
            "actor": actor_init,
            "critic": (
                [p.detach().clone() for p in self.critic.encoder.parameters()]
                if self.mode == "separate"
                else actor_init
            ),
        }
        self._encoder_init_norm = self._init_norms()
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(config.seed)

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch) -> dict[str, float]:
        """One TD3 step: a critic update, and on every ``policy_delay``-th call
        an actor update followed by a Polyak update of all targets.

        Args:
            batch: validated against :class:`td3drive.spec.Batch` first.

        Returns:
            Metrics by the names in :mod:`td3drive.metric_names`: critic loss,
            mean Q1/Q2 and TD target, critic grad norms before and after
            clipping, encoder weight change, learning rates, and on actor steps
            the actor loss, actor saturation and actor grad norms.

        Raises:
            td3drive.spec.SpecError: the batch breaks the contract (field named);
                nothing was changed.
            NonFiniteLossError: a loss or gradient norm is NaN/inf; the step
                of that network was not applied.
        """
        self._abs_td_error = None
        batch.validate()
        obs_image, obs_vector, action, reward, discount, next_image, next_vector, weight = (
            self._to_tensors(batch)
        )
        cfg = self.config
        if cfg.random_shift_pad:
            obs_image = random_shift(obs_image, cfg.random_shift_pad, self._generator)
            next_image = random_shift(next_image, cfg.random_shift_pad, self._generator)
        update_index = self.updates + 1
        actor_step = update_index % cfg.policy_delay == 0

        # Critic: both Q heads regress on the clipped double-Q target.
        target_q = self._td_target(next_image, next_vector, reward, discount, smoothing=True)
        if self.mode == "frozen":
            with torch.no_grad():
                critic_features = self.critic.encoder(obs_image)
        else:
            critic_features = self.critic.encoder(obs_image)
        q1, q2 = self.critic.heads(critic_features, obs_vector, action)
        squared_errors = (q1 - target_q).square() + (q2 - target_q).square()
        critic_loss = (squared_errors if weight is None else weight * squared_errors).mean()
        with torch.no_grad():  # per-sample |TD error| for PER priorities; stays on the device
            self._abs_td_error = torch.maximum((q1 - target_q).abs(), (q2 - target_q).abs())
        self.critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        values: dict[str, torch.Tensor] = {
            M.CRITIC_LOSS: critic_loss.detach(),
            M.Q1_MEAN: q1.detach().mean(),
            M.Q2_MEAN: q2.detach().mean(),
            M.TARGET_Q_MEAN: target_q.mean(),
        }
        values[M.CRITIC_GRAD_NORM_PRECLIP], values[M.CRITIC_GRAD_NORM_POSTCLIP] = (
            self._checked_clip("critic", values, self._critic_params, cfg.critic_max_grad_norm)
        )
        self.critic_optimizer.step()

        if actor_step:
            # Actor: maximise Q1 of the critic on the critic's own features.
            # Features are reused from the critic step, detached (DrQ-v2); the
            # backward reaches only actor parameters (inputs=...), so it leaves
            # no gradient on the critic.
            critic_features = critic_features.detach()
            if self.mode == "separate":
                actor_features = self.actor.encoder(obs_image)
            else:
                actor_features = critic_features
            preactivation = self.actor.head.preactivation(actor_features, obs_vector)
            policy_action = torch.tanh(preactivation)
            actor_loss = -self.critic.heads.q1_only(
                critic_features, obs_vector, policy_action
            ).mean()
            if cfg.action_preactivation_penalty:
                actor_loss = actor_loss + cfg.action_preactivation_penalty * (
                    preactivation.square().mean()
                )
            self.actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward(inputs=self._actor_params)
            values[M.ACTOR_LOSS] = actor_loss.detach()
            values[M.ACTOR_SATURATION] = (
                (policy_action.detach().abs() > M.ACTOR_SATURATION_THRESHOLD).float().mean()
            )
            values[M.ACTOR_GRAD_NORM_PRECLIP], values[M.ACTOR_GRAD_NORM_POSTCLIP] = (
                self._checked_clip("actor", values, self._actor_params, cfg.actor_max_grad_norm)
            )
            self.actor_optimizer.step()
            self._polyak_update()

        self.updates = update_index
        values[M.ACTOR_ENCODER_WEIGHT_DELTA] = self._encoder_weight_delta("actor")
        values[M.CRITIC_ENCODER_WEIGHT_DELTA] = (
            values[M.ACTOR_ENCODER_WEIGHT_DELTA]
            if self.mode != "separate"
            else self._encoder_weight_delta("critic")
        )
        names = list(values)
        numbers = torch.stack([values[n].float() for n in names]).tolist()
        metrics = dict(zip(names, numbers, strict=True))
        metrics.update(self._learning_rates())
        metrics[M.LEARNER_UPDATES] = float(self.updates)
        metrics[M.ACTOR_UPDATED] = float(actor_step)
        return metrics

    def update_with_td_errors(self, batch: Batch) -> tuple[dict[str, float], np.ndarray]:
        """:meth:`update`, and each sample's absolute TD error for prioritized replay.

        The TD error is ``δ_i = max(|Q1(s_i, a_i) − y_i|, |Q2(s_i, a_i) − y_i|)``,
        taken from the update's own critic forward pass (before the critic step,
        on the same augmented images and smoothed target ``y`` the loss used), so
        it costs no extra forward pass; it is detached and crosses to the host
        once, here, never in :meth:`update`. The larger of the two critics'
        errors is the priority of the TD3 PER baseline of Fujimoto, Meger,
        Precup 2020 ("An Equivalence between Loss Functions and Non-Uniform
        Sampling in Experience Replay", NeurIPS; ``PER_TD3.py`` in their code).
        The replay shard turns it into ``p_i = (δ_i + ε)^α`` (Schaul et al. 2016,
        "Prioritized Experience Replay", §3.3).

        Args:
            batch: as for :meth:`update`.

        Returns:
            ``(metrics, td_errors)``: ``metrics`` as :meth:`update` returns them;
            ``td_errors`` is ``float32[B]``, non-negative and finite, in the
            batch's row order.

        Raises:
            td3drive.spec.SpecError: as :meth:`update`.
            NonFiniteLossError: as :meth:`update`; a finite critic loss implies
                finite TD errors, so NaN/inf never comes back from here.
        """
        metrics = self.update(batch)
        assert self._abs_td_error is not None  # set by every update that returns
        return metrics, self._abs_td_error.float().cpu().numpy()

    def td_target(self, batch: Batch, smoothing: bool = False) -> np.ndarray:
        """The TD target ``r + discount · min(Q1', Q2')(s', μ'(s') + ε)`` of a
        batch, without augmentation and without changing any state.

        Args:
            batch: validated first.
            smoothing: add target policy smoothing noise (drawn from a
                throw-away generator seeded with ``config.seed``).

        Returns:
            ``float32[B]``.

        Raises:
            td3drive.spec.SpecError: the batch breaks the contract.
        """
        batch.validate()
        _, _, _, reward, discount, next_image, next_vector, _ = self._to_tensors(batch)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        target = self._td_target(
            next_image, next_vector, reward, discount, smoothing=smoothing, generator=generator
        )
        return target.cpu().numpy()

    @torch.no_grad()
    def _td_target(
        self,
        next_image: torch.Tensor,
        next_vector: torch.Tensor,
        reward: torch.Tensor,
        discount: torch.Tensor,
        smoothing: bool,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
            actor_features = self.target_actor_encoder(next_image)
            critic_features = self.target_critic_encoder(next_image)
        else:
            actor_features = critic_features = self.critic.encoder(next_image)
        next_action = self.target_actor_head(actor_features, next_vector)
        if smoothing and self.config.policy_noise > 0:
            noise = torch.randn(
                next_action.shape,
                device=self.device,
                generator=self._generator if generator is None else generator,
            )
            noise = (noise * self.config.policy_noise).clamp_(
                -self.config.noise_clip, self.config.noise_clip
            )
            next_action = (next_action + noise).clamp_(-1.0, 1.0)
        target_q1, target_q2 = self.target_critic_heads(critic_features, next_vector, next_action)
        return reward + discount * torch.minimum(target_q1, target_q2)

    # ----------------------------------------------------------------- helpers
    def _to_tensors(self, batch: Batch) -> tuple[Any, ...]:
        def put(array: np.ndarray | None) -> torch.Tensor | None:
            if array is None:
                return None
            return read_only_tensor(array).to(self.device, non_blocking=True)

        return (
            put(batch.obs_image),
            put(batch.obs_vector),
            put(batch.action),
            put(batch.reward),
            put(batch.discount),
            put(batch.next_obs_image),
            put(batch.next_obs_vector),
            put(batch.weight),
        )

    def _polyak_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs: list[tuple[nn.Module, nn.Module]] = [
            (self.target_actor_head, self.actor.head),
            (self.target_critic_heads, self.critic.heads),
        ]
        if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
            pairs += [
                (self.target_actor_encoder, self.actor.encoder),
                (self.target_critic_encoder, self.critic.encoder),
            ]
        targets: list[torch.Tensor] = []
        online: list[torch.Tensor] = []
        for target_module, online_module in pairs:
            targets += list(target_module.parameters())
            online += list(online_module.parameters())
        return targets, online

    @torch.no_grad()
    def _polyak_update(self) -> None:
        # θ' ← θ' + τ (θ − θ') = τ θ + (1 − τ) θ'
        torch._foreach_lerp_(self._target_params, self._online_params, self.config.tau)

    @torch.no_grad()
    def _encoder_weight_delta(self, which: str) -> torch.Tensor:
        encoder = self.actor.encoder if which == "actor" else self.critic.encoder
        init = self._encoder_init[which]
        diffs = torch._foreach_sub(list(encoder.parameters()), init)
        change = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs)))
        return change / self._encoder_init_norm[which]

    @torch.no_grad()
    def _init_norms(self) -> dict[str, torch.Tensor]:
        return {
            which: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(init)))
            for which, init in self._encoder_init.items()
        }

    def _learning_rates(self) -> dict[str, float]:
        rates = {}
        for optimizer, head_key in (
            (self.actor_optimizer, M.ACTOR_LR),
            (self.critic_optimizer, M.CRITIC_LR),
        ):
            for group in optimizer.param_groups:
                key = head_key if group["name"] == "head" else M.ENCODER_LR
                rates[key] = float(group["lr"])
        return rates

    def _checked_clip(
        self,
        network: str,
        values: Mapping[str, torch.Tensor],
        params: list[torch.Tensor],
        max_norm: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the loss and gradients of ``network`` and clip its gradient norm.

        Returns ``(norm before clipping, norm after clipping)``, both global L2
        over ``params``. The first is what ``clip_grad_norm_`` would return;
        the second is measured on the clipped gradients, not derived, so the
        metric would show a clipping bug. Gradients are rescaled only when the
        norm exceeds ``max_norm`` (``clip_grad_norm_`` multiplies them by 1.0
        otherwise); ``max_norm=None`` never clips. One host sync per call.

        Raises:
            NonFiniteLossError: the network's loss (taken from ``values``) or the
                gradient norm is NaN/inf; nothing has been stepped.
        """
        grads = [p.grad for p in params if p.grad is not None]
        pre = torch.nn.utils.get_total_norm(grads)
        loss_key, norm_key = _LOSS_AND_NORM_KEYS[network]
        loss_value, pre_value = torch.stack([values[loss_key], pre]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(pre_value)):
            diagnostics = {k: float(v) for k, v in values.items()}
            diagnostics[norm_key] = pre_value
            raise NonFiniteLossError(network, self.updates + 1, diagnostics)
        if max_norm is None or pre_value <= max_norm:
            return pre, pre
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, pre)
        return pre, torch.nn.utils.get_total_norm(grads)

    # ------------------------------------------------------------- publishing
    def policy_weights(self) -> tuple[int, dict[str, np.ndarray]]:
        """What a rollout worker needs to act: the actor head and its encoder.

        Returns:
            ``(version, state_dict)``: ``version`` is :attr:`updates`; the state
            dict maps :class:`learner.networks.Actor` parameter names
            (``encoder.*``, ``head.*``) to float32 numpy copies on the host,
            which Ray ships zero-copy. Load with
            ``actor.load_state_dict({k: torch.from_numpy(v) ...})``.
        """
        weights = {k: v.detach().cpu().numpy().copy() for k, v in self.actor.state_dict().items()}
        return self.updates, weights

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: networks, targets,
        optimizers, the update counter, the RNG state of noise and
        augmentation (with the device type it belongs to), and the initial
        encoder weights. Plain containers of tensors, numbers and strings,
        loadable with ``weights_only=True``."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.model_dump(mode="json"),
            "updates": self.updates,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target_actor_head": self.target_actor_head.state_dict(),
            "target_critic_heads": self.target_critic_heads.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "encoder_init": {k: list(v) for k, v in self._encoder_init.items()},
            "generator": self._generator.get_state(),
            # A CPU generator's state (5,056 bytes) does not load into a CUDA
            # generator (16 bytes) or back: the loader needs to know which.
            "generator_device": self._generator.device.type,
        }
        if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
            state["target_actor_encoder"] = self.target_actor_encoder.state_dict()
            state["target_critic_encoder"] = self.target_critic_encoder.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, under this learner's config.

        Restored: networks, targets, optimizer moments, the update count and
        the initial encoder weights. Every field of
        :data:`RESUME_APPLIED_FIELDS` keeps this learner's value: the learning
        rates are written into the optimizers' param groups after their state
        is loaded (which would otherwise bring back the checkpoint's). The
        fields that differ from the checkpoint's config are recorded in
        :attr:`resume_changes`.

        The noise/augmentation generator's state is restored when it was saved
        on this device type and ``seed`` is unchanged. A generator saved on
        another device type (a CUDA checkpoint on a CPU learner: 16 bytes of
        Philox state, where a CPU generator takes 5,056) is re-seeded from
        ``seed`` and the update count instead, with a :class:`RuntimeWarning`;
        so is one whose ``seed`` changed. Checkpoints without
        ``generator_device`` (older ones) are recognised by their state's size.

        Raises:
            CheckpointError: another format, missing entries, a checkpoint of
                networks with another architecture (every differing field of
                :data:`ARCHITECTURE_FIELDS` named), or tensors that do not fit
                its own config. The learner may be partly loaded then: discard it.
        """
        _check_format(state, "checkpoint")
        saved = _saved_config(state, "checkpoint")
        check_architecture(saved, self.config, "checkpoint")
        try:
            self.actor.load_state_dict(state["actor"])
            self.critic.load_state_dict(state["critic"])
            self.target_actor_head.load_state_dict(state["target_actor_head"])
            self.target_critic_heads.load_state_dict(state["target_critic_heads"])
            if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
                self.target_actor_encoder.load_state_dict(state["target_actor_encoder"])
                self.target_critic_encoder.load_state_dict(state["target_critic_encoder"])
            self.actor_optimizer.load_state_dict(state["actor_optimizer"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            for key, tensors in state["encoder_init"].items():
                self._encoder_init[key] = [t.to(self.device) for t in tensors]
            updates = int(state["updates"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"checkpoint tensors do not fit its own learner config: {_short_reason(exc)}"
            ) from exc
        self._apply_learning_rates()
        self._encoder_init_norm = self._init_norms()
        self.updates = updates
        self.resume_changes = config_changes(saved, self.config)
        self._restore_generator(state)

    def _apply_learning_rates(self) -> None:
        """Write ``config``'s learning rates into the optimizers' param groups."""
        cfg = self.config
        for optimizer, lr in (
            (self.actor_optimizer, cfg.actor_lr),
            (self.critic_optimizer, cfg.critic_lr),
        ):
            for group in optimizer.param_groups:
                if group.get("name") == "encoder" and cfg.encoder_lr is not None:
                    group["lr"] = cfg.encoder_lr
                else:
                    group["lr"] = lr

    def _restore_generator(self, state: Mapping[str, Any]) -> None:
        saved_state = state["generator"]
        if not isinstance(saved_state, torch.Tensor) or saved_state.dtype != torch.uint8:
            raise CheckpointError("checkpoint generator state is not a uint8 tensor")
        recorded = state.get("generator_device")
        saved_type = (
            str(recorded).split(":")[0] if recorded else _generator_device_type(saved_state)
        )
        mine = self._generator.device.type
        if "seed" in self.resume_changes:
            self._reseed()
            return
        if saved_type == mine:
            try:
                self._generator.set_state(saved_state.cpu())
            except RuntimeError as exc:
                raise CheckpointError(
                    f"checkpoint generator state does not load: {_short_reason(exc)}"
                ) from exc
            return
        warnings.warn(
            f"the checkpoint's noise/augmentation generator was saved on "
            f"{saved_type or 'an unknown device type'} and this learner runs on {mine}: "
            f"re-seeded from learner.seed and the update count ({self.updates}), so the "
            f"random stream differs from an uninterrupted run",
            RuntimeWarning,
            stacklevel=3,
        )
        self._reseed()

    def _reseed(self) -> None:
        # Seed and update count together, so a resumed run does not replay the
        # random stream of the run's start.
        self._generator.manual_seed((self.config.seed + (self.updates << 32)) % 2**64)

    def save_checkpoint(self, path: str | Path) -> Path | str:
        """Write :meth:`state_dict` to ``path`` atomically: a crash leaves the
        old file or the new one, never half of one (:func:`atomic_torch_save`).

        Args:
            path: a local path or a URI (``s3://``, ``gs://``, ``file://``).

        Returns:
            ``path`` as a ``Path`` for a local path, the URI for a URI.

        Raises:
            OSError: (:class:`td3drive.storage.StorageError`) the directory is
                not writable, the disk is full, the storage is unreachable; any
                previous checkpoint at ``path`` is untouched.
        """
        return atomic_torch_save(self.state_dict(), path)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: LearnerConfig | None = None,
        device: str | torch.device | None = None,
    ) -> TD3Learner:
        """A learner rebuilt from a checkpoint.

        Args:
            path: a file written by :meth:`save_checkpoint`.
            config: the run's current learner config. ``None`` resumes under
                the checkpoint's own config. Given, the learner runs under it:
                its :data:`ARCHITECTURE_FIELDS` must equal the checkpoint's,
                and the fields of :data:`RESUME_APPLIED_FIELDS` that changed
                are applied and listed in the result's :attr:`resume_changes`
                as ``{field: (checkpoint value, config value)}``.
            device: overrides the config's ``device`` when given.

        Raises:
            CheckpointError: missing, empty, truncated or foreign file, or an
                architecture field of ``config`` that differs from the
                checkpoint's (every such field named). One-line message.
            RuntimeError: the config asks for ``cuda`` and there is none.
        """
        state = load_checkpoint(path, map_location="cpu")
        saved = _saved_config(state, str(path))
        if config is not None:
            check_architecture(saved, config, str(path))
        learner = cls(saved if config is None else config, device=device)
        try:
            learner.load_state_dict(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        return learner


class CheckpointInfo(NamedTuple):
    """What :func:`validate_checkpoint` found.

    Attributes:
        config: the checkpoint's own learner config.
        updates: its update count (the policy version of its weights).
        changes: ``{field: (checkpoint value, config value)}`` of the fields
            that a resume under the given config changes (all of them in
            :data:`RESUME_APPLIED_FIELDS`); empty when no config was given.
    """

    config: LearnerConfig
    updates: int
    changes: dict[str, tuple[Any, Any]]


class PolicyCheckpoint(NamedTuple):
    """The policy of a checkpoint (:func:`load_policy_checkpoint`).

    Attributes:
        config: the checkpoint's learner config; ``policy_for(config)`` is the
            network the weights load into.
        version: the checkpoint's update count, the policy version.
        weights: :class:`learner.networks.Actor` parameter names (``encoder.*``,
            ``head.*``) to float32 numpy arrays on the host, as
            :meth:`TD3Learner.policy_weights` publishes them; load with
            :func:`learner.networks.load_policy_weights`.
    """

    config: LearnerConfig
    version: int
    weights: dict[str, np.ndarray]


def check_architecture(saved: LearnerConfig, config: LearnerConfig, source: str) -> None:
    """Refuse a config whose networks differ from a checkpoint's.

    Args:
        saved: the checkpoint's learner config.
        config: the config it would be loaded under.
        source: names the checkpoint in the message (its path).

    Raises:
        CheckpointError: one line naming every field of
            :data:`ARCHITECTURE_FIELDS` that differs, with both values.
    """
    differing = [
        f"learner.{field} {getattr(saved, field)!r} -> {getattr(config, field)!r}"
        for field in ARCHITECTURE_FIELDS
        if getattr(saved, field) != getattr(config, field)
    ]
    if differing:
        raise CheckpointError(
            f"{source}: the config changes the network architecture of the checkpoint "
            f"({'; '.join(differing)}; checkpoint -> config); architecture fields cannot "
            f"change on resume: restore them or start a new run"
        )


def config_changes(saved: LearnerConfig, config: LearnerConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, config value)}`` of every learner field that differs."""
    return {
        field: (getattr(saved, field), getattr(config, field))
        for field in type(config).model_fields
        if getattr(saved, field) != getattr(config, field)
    }


def atomic_torch_save(obj: Any, path: str | Path) -> Path | str:
    """``torch.save`` to ``path`` atomically, through the run's storage
    (:meth:`td3drive.storage.RunStorage.write_with`): on a local filesystem
    streamed to a temp file that is fsynced and renamed; on an object store
    saved to memory (``io.BytesIO``) and uploaded in one piece.

    Args:
        obj: what ``torch.save`` takes.
        path: a local path (relative to this process's working directory) or
            a URI (``s3://``, ``gs://``, ``file://``).

    Returns:
        ``path`` as a ``Path`` for a local path, the URI for a URI.

    Raises:
        OSError: (:class:`td3drive.storage.StorageError`) on any write failure;
            an existing file at ``path`` is left as it was.
    """
    storage, name = RunStorage.for_file(path)
    location = storage.write_with(name, lambda handle: torch.save(obj, handle))
    return location if is_uri(os.fspath(path)) else Path(path)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs on load).

    Args:
        path: the checkpoint file: a local path or a URI (``s3://``, ``gs://``,
            ``file://``; a remote file is read into memory and loaded from
            ``io.BytesIO``).
        map_location: where its tensors go (``"cpu"`` loads a CUDA checkpoint
            on a machine without a GPU).
        mmap: map a local file instead of reading it (tensors are read when
            used); ignored for a remote file.

    Returns:
        The state dict of :meth:`TD3Learner.state_dict`, format and entries checked.

    Raises:
        CheckpointError: one line, never torch's own advice: ``no such
            checkpoint``; ``cannot read the checkpoint (<reason>)`` (permission
            denied, storage unreachable); ``empty file (0 bytes)``; ``truncated
            or corrupt`` (a torch zip archive that does not read back whole);
            ``not a td3drive checkpoint (unreadable: <reason>)`` (anything else
            torch cannot read with ``weights_only=True``); ``not a td3drive
            checkpoint (<what it is>)``; ``incomplete td3drive checkpoint
            (missing: …)``.
    """
    name, source = _checkpoint_source(path)
    state = _load_state(name, source, map_location, mmap)
    _check_format(state, name)
    return state


def _checkpoint_source(path: str | Path) -> tuple[str, Path | bytes]:
    """``(name for messages, local file or the remote file's bytes)``.

    Raises:
        CheckpointError: a remote file that is missing or cannot be read.
    """
    if not is_uri(os.fspath(path)):
        return str(Path(path)), Path(path)
    text = os.fspath(path)
    try:
        storage, name = RunStorage.for_file(text)
        if storage.local_path is not None:
            return text, storage.local_path / name
        if storage.is_dir(name):
            raise CheckpointError(f"{text}: is a directory, not a checkpoint file")
        return text, storage.read_bytes(name)
    except StorageNotFoundError as exc:
        raise CheckpointError(f"{text}: no such checkpoint") from exc
    except StorageError as exc:
        reason = exc.strerror or str(exc)
        raise CheckpointError(f"{text}: cannot read the checkpoint ({reason})") from exc


def _load_state(
    name: str, source: Path | bytes, map_location: str | torch.device, mmap: bool
) -> Any:
    """``torch.load(..., weights_only=True)`` of a local file or of bytes, with
    one-line errors (see :func:`load_checkpoint`)."""
    if isinstance(source, bytes):
        if not source:
            raise CheckpointError(f"{name}: not a td3drive checkpoint: empty file (0 bytes)")
        try:
            return torch.load(io.BytesIO(source), map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise _unreadable(name, source, exc) from exc
    try:
        size = source.stat().st_size
    except FileNotFoundError as exc:
        raise CheckpointError(f"{name}: no such checkpoint") from exc
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read the checkpoint ({exc.strerror})") from exc
    if source.is_dir():
        raise CheckpointError(f"{name}: is a directory, not a checkpoint file")
    if size == 0:
        raise CheckpointError(f"{name}: not a td3drive checkpoint: empty file (0 bytes)")
    try:
        return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except OSError as exc:
        raise CheckpointError(f"{name}: cannot read the checkpoint ({exc.strerror})") from exc
    except Exception as exc:  # torch raises several types for corrupt files
        raise _unreadable(name, source, exc) from exc


def validate_checkpoint(path: str | Path, config: LearnerConfig | None = None) -> CheckpointInfo:
    """Check, before anything starts, that a checkpoint will load.

    ``path`` is a local path or a URI. Loads the file on the CPU with
    ``weights_only=True``, checks the zip
    CRC of every entry, its format and entries, that its learner config
    validates and that its actor weights fit that config; with ``config``,
    also that the architecture matches (:func:`check_architecture`). Nothing
    is built on a device and no optimizer is restored, so it is cheap (a
    fraction of a second for the default networks).

    Returns:
        :class:`CheckpointInfo`, whose ``changes`` a caller can log before resuming.

    Raises:
        CheckpointError: as :func:`load_checkpoint` and :func:`check_architecture`;
            one line naming the file.
    """
    name, source = _checkpoint_source(path)  # a remote file is read once
    state = _load_state(name, source, "cpu", mmap=False)
    _check_format(state, name)
    _check_crc(name, source)
    saved = _saved_config(state, name)
    _actor_weights(state, saved, name)
    if config is not None:
        check_architecture(saved, config, name)
    changes = config_changes(saved, config) if config is not None else {}
    return CheckpointInfo(saved, _updates(state, name), changes)


def load_policy_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> PolicyCheckpoint:
    """The policy (actor + its encoder) of a checkpoint, and nothing else.

    For evaluation: no learner is built, no optimizer or generator state is
    touched, so a checkpoint saved on a GPU loads on a CPU-only machine. A
    local file is memory-mapped (only the actor's tensors are read); a remote
    one is read whole.

    Args:
        path: a learner checkpoint: a local path or a URI.
        map_location: where the tensors are mapped on load (``"cpu"``).

    Returns:
        :class:`PolicyCheckpoint` ``(config, version, weights)``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or actor weights that do
            not fit the checkpoint's own config.
    """
    state = load_checkpoint(path, map_location=map_location, mmap=True)
    saved = _saved_config(state, str(path))
    weights = _actor_weights(state, saved, str(path))
    return PolicyCheckpoint(saved, _updates(state, str(path)), weights)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` (a target network)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone


# ------------------------------------------------------------ checkpoint checks
def _check_format(state: Any, source: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{source}: not a td3drive checkpoint (a {type(state).__name__}, "
            f"not a {CHECKPOINT_FORMAT} state dict)"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{source}: not a td3drive checkpoint (format {state.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(
            f"{source}: incomplete td3drive checkpoint (missing: {', '.join(missing)})"
        )


def _saved_config(state: Mapping[str, Any], source: str) -> LearnerConfig:
    raw = state.get("config")
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: the checkpoint's learner config is not a mapping")
    try:
        return LearnerConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CheckpointError(
            f"{source}: the checkpoint's learner config does not validate "
            f"(learner.{where}: {first['msg']})"
        ) from exc


def _updates(state: Mapping[str, Any], source: str) -> int:
    updates = state["updates"]
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise CheckpointError(f"{source}: the checkpoint's update count is {updates!r}")
    return updates


def _actor_weights(
    state: Mapping[str, Any], config: LearnerConfig, source: str
) -> dict[str, np.ndarray]:
    """The actor's weights as float32 host copies, checked against the
    network ``config`` builds (names and shapes; built on the meta device, so
    nothing is allocated)."""
    actor = state["actor"]
    if not isinstance(actor, Mapping):
        raise CheckpointError(f"{source}: the checkpoint's actor weights are not a state dict")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in policy_for(config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in actor.items() if isinstance(v, torch.Tensor)}
    if found.keys() != expected.keys() or any(tuple(expected[k]) != found[k] for k in expected):
        wrong = sorted(expected.keys() ^ found.keys()) or [
            k for k in expected if tuple(expected[k]) != found[k]
        ]
        raise CheckpointError(
            f"{source}: the checkpoint's actor weights do not fit its own learner config "
            f"(first mismatch: {wrong[0]})"
        )
    return {k: v.detach().to("cpu", torch.float32).numpy().copy() for k, v in actor.items()}


def _generator_device_type(generator_state: torch.Tensor) -> str | None:
    """The device type a generator state belongs to, from its size (checkpoints
    written before ``generator_device`` was recorded); ``None`` when unknown."""
    size = generator_state.numel()
    if size == _CPU_GENERATOR_STATE_BYTES:
        return "cpu"
    if size == _CUDA_GENERATOR_STATE_BYTES:
        return "cuda"
    return None


_ZIP_MAGIC = b"PK\x03\x04"


def _unreadable(name: str, source: Path | bytes, exc: Exception) -> CheckpointError:
    """The one-line error for a file ``torch.load`` could not read.

    ``torch.save`` writes a zip archive. A file that starts like one but whose
    archive does not read back whole (no central directory, bad CRC) is
    truncated or corrupt; anything else is not a td3drive checkpoint. torch's
    own message is cut to its reason: its advice to retry with
    ``weights_only=False`` would run code from an untrusted file.
    """
    if isinstance(source, bytes):
        head, size = source[:16], len(source)
    else:
        size = source.stat().st_size
        with source.open("rb") as handle:
            head = handle.read(16)
    if not head.startswith(_ZIP_MAGIC):
        return CheckpointError(
            f"{name}: not a td3drive checkpoint (unreadable: not a torch.save archive, "
            f"{size} bytes starting {head!r})"
        )
    try:
        with zipfile.ZipFile(_zip_input(source)) as archive:
            intact = archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        intact = False
    if not intact:
        return CheckpointError(
            f"{name}: truncated or corrupt checkpoint ({size} bytes; {_short_reason(exc)})"
        )
    return CheckpointError(f"{name}: not a td3drive checkpoint (unreadable: {_short_reason(exc)})")


def _zip_input(source: Path | bytes) -> Path | io.BytesIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _check_crc(name: str, source: Path | bytes) -> None:
    """Check the zip CRC of every entry (``torch.load`` does not): a file
    damaged in place, not only cut short, is refused too."""
    try:
        with zipfile.ZipFile(_zip_input(source)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{name}: truncated or corrupt checkpoint ({exc})") from exc
    if bad is not None:
        raise CheckpointError(f"{name}: truncated or corrupt checkpoint (bad CRC in {bad})")


def _short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message, one line, without any
    text that mentions ``weights_only`` (torch's advice to load unsafely)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "weights_only" not in line and "file an issue" not in line
    ]
    reason = lines[0].split(". ")[0].rstrip(".") if lines else ""
    reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"
