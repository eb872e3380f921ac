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
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from learner.augmentation import random_shift
from learner.networks import (
    Actor,
    ActorHead,
    Critic,
    TwinQHead,
    encoder_for,
    read_only_tensor,
)
from td3drive import metric_names as M
from td3drive.atomic_file import atomic_write
from td3drive.config import LearnerConfig
from td3drive.spec import Batch

CHECKPOINT_FORMAT = "td3drive.learner/1"

_LOSS_AND_NORM_KEYS = {
    "critic": (M.CRITIC_LOSS, M.CRITIC_GRAD_NORM_PRECLIP),
    "actor": (M.ACTOR_LOSS, M.ACTOR_GRAD_NORM_PRECLIP),
}

# Fields that fix the shape of the networks: a checkpoint only loads into a
# learner whose config agrees on them.
_ARCHITECTURE_FIELDS = ("encoder", "cnn", "features_dim", "actor_hidden", "critic_hidden")


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
    """A checkpoint that cannot be loaded into this learner."""


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
    """

    def __init__(self, config: LearnerConfig, device: str | torch.device | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self.mode = config.encoder
        self.updates = 0
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
        augmentation, and the initial encoder weights. Plain containers of
        tensors, numbers and strings, loadable with ``weights_only=True``."""
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
        }
        if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
            state["target_actor_encoder"] = self.target_actor_encoder.state_dict()
            state["target_critic_encoder"] = self.target_critic_encoder.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            CheckpointError: another format, or a checkpoint of networks with
                another architecture (encoder mode, CNN, widths).
        """
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
            )
        saved = state["config"]
        mine = self.config.model_dump(mode="json")
        for field in _ARCHITECTURE_FIELDS:
            if saved.get(field) != mine[field]:
                raise CheckpointError(
                    f"checkpoint has learner.{field}={saved.get(field)!r}, "
                    f"this learner has {mine[field]!r}"
                )
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
        self._encoder_init_norm = self._init_norms()
        self._generator.set_state(state["generator"].cpu())
        self.updates = int(state["updates"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` to ``path`` atomically (temp file in the
        same directory, fsync, rename): a crash leaves the old file or the new
        one, never half of one.

        Raises:
            OSError: the directory is not writable or the disk is full; any
                previous checkpoint at ``path`` is untouched.
        """
        return atomic_torch_save(self.state_dict(), path)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device | None = None
    ) -> TD3Learner:
        """A learner rebuilt from a checkpoint's own config and state.

        Raises:
            CheckpointError: unreadable or foreign file.
        """
        state = load_checkpoint(path, map_location="cpu")
        config = LearnerConfig.model_validate(state["config"])
        learner = cls(config, device=device)
        learner.load_state_dict(state)
        return learner


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`td3drive.atomic_file.atomic_write`).

    Raises:
        OSError: on any write failure; an existing file at ``path`` is left as it was.
    """
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs on load).

    Raises:
        CheckpointError: missing, truncated or not a td3drive learner checkpoint.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad=False`` (a target network)."""
    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone
