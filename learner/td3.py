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

The formulas themselves (smoothing, target, losses, TD errors, Polyak) are
the pure functions of :mod:`learner.td3_math`; this module holds the state
around them: networks, optimizers, autocast and compile, clipping, the NaN/inf
guard, metrics and checkpoints.

Every update re-encodes the sampled images, so the critic loss trains the
critic's CNN and (in ``separate`` mode) the actor loss trains the actor's CNN.
Where this departs from the paper, and why, is listed in ``learner/README.md``.

Host syncs. :meth:`TD3Learner.update_deferred` leaves every metric on the
device; :meth:`TD3Learner.fetch_metrics` brings the metrics of all updates
since the previous fetch to the host in one transfer and measures the encoder
weight change once. :meth:`TD3Learner.update` is the two together (one update,
its metrics). The NaN/inf guard (:class:`NonFiniteLossError`) has two forms:

* default (``fused_adam: false``): before each optimizer step the loss and the
  gradient norm are read on the host (one sync per step, the original update's way;
  free on a CPU, where every op is synchronous anyway). The error is raised
  before the step; nothing of it is applied.
* ``fused_adam: true``: the check runs on the device. A non-finite loss or
  norm sets a flag that the fused Adam kernel reads (its ``found_inf``, the
  mechanism of ``torch.amp.GradScaler``): that step and every later one are
  skipped on the device (weights, Adam moments and step counts, targets
  untouched) until the next fetch, which raises the error for the first bad
  update and rewinds :attr:`TD3Learner.updates` to the last applied one. No NaN
  ever reaches the weights; only the steps after the bad one are lost.

Speed options (``LearnerConfig``; all off is the exact fp32 update of before):
``channels_last`` (NHWC encoders and images), ``compile`` (``torch.compile`` of
the encoders and MLP heads, the losses and optimizers stay eager),
``amp_bf16`` (CUDA: bf16 autocast of the forward passes; fp32 weights,
gradients, Adam state and losses) and ``fused_adam``. ``td3drive bench
learner`` measures each.

This module imports torch and the shared contracts only: no Ray.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, cast

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from learner import td3_math
from learner.augmentation import random_shift
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import LearnerConfig
from td3drive.contracts.networks import (
    Actor,
    ActorHead,
    Critic,
    TwinQHead,
    encoder_for,
    policy_for,
    read_only_tensor,
)
from td3drive.contracts.spec import Batch
from td3drive.contracts.storage import RunStorage, StorageError, StorageNotFoundError, is_uri

CHECKPOINT_FORMAT = "td3drive.learner/1"

_LOSS_AND_NORM_KEYS = {
    "critic": (M.CRITIC_LOSS, M.CRITIC_GRAD_NORM_PRECLIP),
    "actor": (M.ACTOR_LOSS, M.ACTOR_GRAD_NORM_PRECLIP),
}

# How a resume treats each field of LearnerConfig (td3drive/contracts/config.py), one
# class per field; tests/test_learner_resume.py fails when a field is added to
# LearnerConfig without being classified here.
#
# ARCHITECTURE_FIELDS fix the networks' modules and tensor shapes: a
# checkpoint only loads into a learner whose config agrees on every one of
# them, and a resume that changes one is refused with a CheckpointError naming
# it (a new architecture is a new run). The frame stack, frame size, vector
# and action widths are contract constants (td3drive/contracts/spec.py), not config.
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
        "channels_last": "the resumed learner's encoders and Adam state are built in that "
        "memory format; the checkpoint's values are copied in",
        "compile": "the resumed learner compiles (or not) its networks when built",
        "amp_bf16": "read at every forward pass (weights and Adam state are fp32 either way)",
        "fused_adam": "the resumed learner's optimizers are built with it; Adam state loads "
        "into fused and unfused optimizers alike",
    }
)
# Metrics whose largest value over a fetch window LearnerMetrics.grad_norm_max reports.
GRAD_NORM_METRICS: tuple[str, ...] = (
    M.ACTOR_GRAD_NORM_PRECLIP,
    M.ACTOR_GRAD_NORM_POSTCLIP,
    M.CRITIC_GRAD_NORM_PRECLIP,
    M.CRITIC_GRAD_NORM_POSTCLIP,
)
# Updates whose device metrics are held before update_deferred brings them to
# the host itself (one sync): bounds memory when nobody fetches.
MAX_PENDING_UPDATES = 1000
# Metrics of the critic half of an update (a critic NaN/inf diagnosis shows these).
_CRITIC_PHASE = (M.CRITIC_LOSS, M.Q1_MEAN, M.Q2_MEAN, M.TARGET_Q_MEAN, M.CRITIC_GRAD_NORM_PRECLIP)
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

    With ``fused_adam`` the error is raised at the metrics fetch after it
    (see the module docstring): the steps of the later updates of that window
    were skipped too, and the learner's ``updates`` is back at ``update - 1``.

    Attributes:
        network: ``"actor"`` or ``"critic"``.
        update: the update (1-based count) whose step was not applied.
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


class LearnerMetrics(NamedTuple):
    """The metrics of the updates since the previous :meth:`TD3Learner.fetch_metrics`.

    Attributes:
        latest: by the names in :mod:`td3drive.contracts.metric_names`: the latest value of
            each update metric in the window (critic ones from the last update,
            actor ones from the last actor step), the encoder weight changes and
            learning rates measured at the fetch, ``learner/updates`` and
            ``learner/actor_updated`` (of the last update). Floats.
        grad_norm_max: the largest value in the window of each metric of
            :data:`GRAD_NORM_METRICS` that occurred in it.
        updates: how many updates the window holds.
    """

    latest: dict[str, float]
    grad_norm_max: dict[str, float]
    updates: int


def check_speed_options(config: LearnerConfig, device: torch.device) -> None:
    """Refuse a speed option the device cannot honour.

    Args:
        config: the learner config.
        device: the device the learner runs on (``config.device`` resolved).

    Raises:
        RuntimeError: ``amp_bf16`` on a device that is not CUDA, or on a GPU
            without native bf16 (before Ampere, where it would be emulated and
            slower than fp32). ``fused_adam`` where torch has no fused Adam is
            refused when the optimizers are built (:class:`TD3Learner`).
    """
    if config.amp_bf16:
        if device.type != "cuda":
            raise RuntimeError(
                f"learner.amp_bf16 needs a CUDA device and this learner runs on {device}; "
                f"set learner.amp_bf16: false"
            )
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise RuntimeError(
                f"learner.amp_bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
                f"set learner.amp_bf16: false"
            )


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
        check_speed_options(config, self.device)
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
        if config.channels_last:  # conv weights NHWC (deep copies below keep the format)
            for encoder in (self.actor.encoder, self.critic.encoder):
                encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
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
        self.actor_optimizer = self._adam(actor_groups)
        self.critic_optimizer = self._adam(critic_groups)
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

        # Device-side NaN/inf guard (fused Adam only, see the module docstring):
        # 1.0 once a loss or norm was non-finite; the fused kernels then skip.
        self._device_check = config.fused_adam
        self._found_inf = torch.zeros((), device=self.device)
        self._unit_scale = torch.ones((), device=self.device)
        if self._device_check:
            for optimizer in (self.actor_optimizer, self.critic_optimizer):
                optimizer.found_inf = self._found_inf  # type: ignore[attr-defined]
        # Metrics of the updates since the last host transfer, on the device:
        # (update index, {name: 0-dim tensor}); and what earlier transfers of
        # the current fetch window brought to the host.
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._window_latest: dict[str, float] = {}
        self._window_max: dict[str, float] = {}
        self._window_updates = 0
        self._last_actor_step = False
        self._autocast_bf16 = config.amp_bf16
        self._cudagraphs = config.compile == "reduce-overhead" and self.device.type == "cuda"
        if config.compile != "off":
            self._compile_networks()

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch) -> dict[str, float]:
        """One TD3 step: a critic update, and on every ``policy_delay``-th call
        an actor update followed by a Polyak update of all targets; then its
        metrics, brought to the host.

        The same as :meth:`update_deferred` followed by :meth:`fetch_metrics`
        (after updates that nobody fetched, the metrics cover those too).

        Args:
            batch: validated against :class:`td3drive.contracts.spec.Batch` first.

        Returns:
            Metrics by the names in :mod:`td3drive.contracts.metric_names`: critic loss,
            mean Q1/Q2 and TD target, critic grad norms before and after
            clipping, encoder weight change, learning rates, and on actor steps
            the actor loss, actor saturation and actor grad norms.

        Raises:
            td3drive.contracts.spec.SpecError: the batch breaks the contract (field named);
                nothing was changed.
            NonFiniteLossError: a loss or gradient norm is NaN/inf; the step
                of that network was not applied.
        """
        self.update_deferred(batch)
        return self.fetch_metrics().latest

    def update_deferred(self, batch: Batch) -> None:
        """:meth:`update` without bringing its metrics to the host: they stay
        on the device until :meth:`fetch_metrics` (or until
        :data:`MAX_PENDING_UPDATES` updates are pending, when this call brings
        them over itself). Same steps, same random stream, same weights.

        The images (``uint8[B, 4, 84, 84]``) go to the device as uint8, are
        shifted there (``random_shift_pad``) and become floats in the encoder.

        Raises:
            td3drive.contracts.spec.SpecError: as :meth:`update`.
            NonFiniteLossError: without ``fused_adam``, as :meth:`update`; with
                it, only from the transfer of :data:`MAX_PENDING_UPDATES`
                pending updates (otherwise the next fetch raises it).
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
        if cfg.channels_last:
            obs_image = obs_image.contiguous(memory_format=torch.channels_last)
            next_image = next_image.contiguous(memory_format=torch.channels_last)
        if self._cudagraphs:  # one training step per graph generation
            torch.compiler.cudagraph_mark_step_begin()
        update_index = self.updates + 1
        actor_step = update_index % cfg.policy_delay == 0

        # Critic: both Q heads regress on the clipped double-Q target.
        target_q = self._td_target(next_image, next_vector, reward, discount, smoothing=True)
        with self._autocast():
            if self.mode == "frozen":
                with torch.no_grad():
                    critic_features = self.critic.encoder(obs_image)
            else:
                critic_features = self.critic.encoder(obs_image)
            q1, q2 = self.critic.heads(critic_features, obs_vector, action)
        q1, q2 = q1.float(), q2.float()  # the same tensors unless amp_bf16
        critic_loss = td3_math.critic_loss(q1, q2, target_q, weight)
        with torch.no_grad():  # per-sample |TD error| for PER priorities; stays on the device
            self._abs_td_error = td3_math.abs_td_error(q1, q2, target_q)
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
            with self._autocast():
                if self.mode == "separate":
                    actor_features = self.actor.encoder(obs_image)
                else:
                    actor_features = critic_features
                preactivation = self.actor.head.preactivation(actor_features, obs_vector)
            preactivation = preactivation.float()
            policy_action = torch.tanh(preactivation)
            with self._autocast():
                q_policy = self.critic.heads.q1_only(critic_features, obs_vector, policy_action)
            actor_loss = td3_math.actor_loss(
                q_policy.float(), preactivation, cfg.action_preactivation_penalty
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
        self._last_actor_step = actor_step
        self._pending.append((update_index, values))
        if len(self._pending) >= MAX_PENDING_UPDATES:
            self._drain({})

    def fetch_metrics(self) -> LearnerMetrics:
        """The metrics of every update since the previous fetch, in one
        device-to-host transfer, and the encoder weight change measured now.
        Starts a new window.

        Returns:
            :class:`LearnerMetrics`.

        Raises:
            NonFiniteLossError: (``fused_adam`` only) an update of the window
                had a NaN/inf loss or gradient norm; its step and all later
                ones were skipped on the device, :attr:`updates` is rewound to
                ``error.update - 1`` and the learner can go on from there.
        """
        extra = {M.ACTOR_ENCODER_WEIGHT_DELTA: self._encoder_weight_delta("actor")}
        extra[M.CRITIC_ENCODER_WEIGHT_DELTA] = (
            extra[M.ACTOR_ENCODER_WEIGHT_DELTA]
            if self.mode != "separate"
            else self._encoder_weight_delta("critic")
        )
        self._drain(extra)
        latest = self._window_latest
        latest.update(self._learning_rates())
        latest[M.LEARNER_UPDATES] = float(self.updates)
        latest[M.ACTOR_UPDATED] = float(self._last_actor_step)
        result = LearnerMetrics(latest, self._window_max, self._window_updates)
        self._window_latest, self._window_max, self._window_updates = {}, {}, 0
        return result

    def _drain(self, extra: Mapping[str, torch.Tensor]) -> None:
        """Bring the pending update metrics and ``extra`` to the host in one
        transfer and fold them into the current window.

        Raises:
            NonFiniteLossError: as :meth:`fetch_metrics`.
        """
        pending, self._pending = self._pending, []
        tensors = [value for _, values in pending for value in values.values()]
        tensors += list(extra.values())
        if self._device_check:
            tensors.append(self._found_inf)
        if not tensors:
            return
        numbers = iter(torch.stack([t.float() for t in tensors]).tolist())
        records = [(index, {name: next(numbers) for name in values}) for index, values in pending]
        extras = {name: next(numbers) for name in extra}
        if self._device_check and next(numbers):
            self._raise_first_non_finite(records)
        for _, record in records:
            self._window_latest.update(record)
            for name in GRAD_NORM_METRICS:
                if name in record:
                    known = self._window_max.get(name, -math.inf)
                    self._window_max[name] = max(known, record[name])
        self._window_latest.update(extras)
        self._window_updates += len(records)

    def _raise_first_non_finite(self, records: list[tuple[int, dict[str, float]]]) -> None:
        """The device flag is set: raise for the first update whose loss or
        gradient norm is NaN/inf (its step and all later ones were skipped)."""
        self._found_inf.zero_()
        for index, record in records:
            for network, keys in _LOSS_AND_NORM_KEYS.items():
                if keys[0] not in record:
                    continue  # a critic-only update
                if all(math.isfinite(record[key]) for key in keys):
                    continue
                self.updates = index - 1
                if network == "critic":
                    diagnostics = {k: record[k] for k in _CRITIC_PHASE}
                else:
                    diagnostics = {
                        k: v for k, v in record.items() if k != M.ACTOR_GRAD_NORM_POSTCLIP
                    }
                raise NonFiniteLossError(network, index, diagnostics)
        # Not reached: the flag is only set by a non-finite value recorded here.
        first = records[0][0] if records else self.updates
        self.updates = first - 1
        raise NonFiniteLossError("critic", first, {})

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
            td3drive.contracts.spec.SpecError: as :meth:`update`.
            NonFiniteLossError: as :meth:`update`; a finite critic loss implies
                finite TD errors, so NaN/inf never comes back from here.
        """
        metrics = self.update(batch)
        return metrics, self.last_td_errors()

    def last_td_errors(self) -> np.ndarray:
        """The absolute TD errors of the last update (see
        :meth:`update_with_td_errors`), for a loop of :meth:`update_deferred`.

        Returns:
            ``float32[B]``, non-negative and finite. One device-to-host transfer,
            which also carries the device NaN/inf flag under ``fused_adam``.

        Raises:
            NonFiniteLossError: (``fused_adam``) the flag is set: this or an
                earlier update of the window was not applied (see
                :meth:`fetch_metrics`); the errors are not returned.
            RuntimeError: no update since the learner was built or loaded.
        """
        if self._abs_td_error is None:
            raise RuntimeError("no TD errors: no update has run")
        if not self._device_check:
            return self._abs_td_error.float().cpu().numpy()
        both = torch.cat([self._abs_td_error.float(), self._found_inf.view(1)]).cpu().numpy()
        if both[-1]:
            self._drain({})  # raises for the first bad update
        return both[:-1]

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
            td3drive.contracts.spec.SpecError: the batch breaks the contract.
        """
        batch.validate()
        _, _, _, reward, discount, next_image, next_vector, _ = self._to_tensors(batch)
        if self.config.channels_last:
            next_image = next_image.contiguous(memory_format=torch.channels_last)
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
        with self._autocast():
            if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
                actor_features = self.target_actor_encoder(next_image)
                critic_features = self.target_critic_encoder(next_image)
            else:
                actor_features = critic_features = self.critic.encoder(next_image)
            next_action = self.target_actor_head(actor_features, next_vector)
        next_action = next_action.float()
        if smoothing and self.config.policy_noise > 0:
            noise = torch.randn(
                next_action.shape,
                device=self.device,
                generator=self._generator if generator is None else generator,
            )
            next_action = td3_math.smoothed_target_action(
                next_action, noise, self.config.policy_noise, self.config.noise_clip
            )
        with self._autocast():
            target_q1, target_q2 = self.target_critic_heads(
                critic_features, next_vector, next_action
            )
        return td3_math.td_target(reward, discount, target_q1.float(), target_q2.float())

    # ----------------------------------------------------------------- helpers
    def _to_tensors(self, batch: Batch) -> tuple[Any, ...]:
        """The batch's arrays on the device, dtypes kept: images stay uint8
        (a quarter of float32's bytes on the host-to-device copy) and become
        floats in the encoder's first line (``normalize_image``).

        On CUDA each array is first copied into page-locked (pinned) host
        memory, so the host-to-device copy is asynchronous (a pageable source
        makes ``non_blocking`` a synchronous copy). Pinned blocks come from
        torch's caching host allocator, which reuses them once their copy has
        finished (PyTorch docs, "CUDA semantics: use pinned memory buffers")."""
        pin = self.device.type == "cuda"

        def put(array: np.ndarray | None) -> torch.Tensor | None:
            if array is None:
                return None
            tensor = read_only_tensor(array)
            if pin:
                tensor = tensor.pin_memory()
            return tensor.to(self.device, non_blocking=True)

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
        """Polyak-average every target toward its online network (``td3_math.polyak_update``)."""
        tau: float | torch.Tensor = self.config.tau
        if self._device_check:
            # Device-side guard: τ while the NaN/inf flag is clear, 0 once it is set
            # (θ − θ' is finite: a skipped step leaves θ as it was).
            tau = self._found_inf.mul(-self.config.tau).add_(self.config.tau)
        td3_math.polyak_update(self._online_params, self._target_params, tau)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast of a forward pass under ``amp_bf16``, else nothing."""
        if self._autocast_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _adam(self, groups: list[dict[str, Any]]) -> torch.optim.Adam:
        """Adam over ``groups``, fused under ``fused_adam``.

        Raises:
            RuntimeError: ``fused_adam`` where this torch has no fused Adam for
                the device.
        """
        if not self.config.fused_adam:
            return torch.optim.Adam(groups)
        try:
            return torch.optim.Adam(groups, fused=True)
        except (RuntimeError, ValueError) as exc:
            raise RuntimeError(
                f"learner.fused_adam: torch {torch.__version__} has no fused Adam on "
                f"{self.device} ({_short_reason(exc)}); set learner.fused_adam: false"
            ) from exc

    def _compile_networks(self) -> None:
        """``torch.compile`` each encoder and MLP in place (``nn.Module.compile``:
        parameter names, state dicts and checkpoints stay as they are). The
        losses, the optimizers and the Polyak update stay eager. On a CPU,
        ``reduce-overhead`` (CUDA graphs) compiles as ``default``."""
        mode = "reduce-overhead" if self._cudagraphs else None
        actor_head = cast(ActorHead, self.target_actor_head)
        critic_heads = cast(TwinQHead, self.target_critic_heads)
        modules: list[nn.Module] = [
            self.actor.encoder,
            self.critic.encoder,
            self.actor.head.net,
            self.critic.heads.q1,
            self.critic.heads.q2,
            actor_head.net,
            critic_heads.q1,
            critic_heads.q2,
        ]
        for encoder in (self.target_actor_encoder, self.target_critic_encoder):
            if encoder is not None:
                modules.append(encoder)
        seen: set[int] = set()
        for module in modules:
            if id(module) not in seen:  # the shared encoder is both networks'
                seen.add(id(module))
                module.compile(mode=mode)

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

        Under ``fused_adam`` there is no host sync: the check sets the device
        flag that makes the fused Adam skip (see the module docstring), and the
        gradients are always multiplied by ``min(1, max_norm / (norm + 1e-6))``
        (``clip_grad_norm_``'s own rule; × 1.0 leaves them exact).

        Raises:
            NonFiniteLossError: the network's loss (taken from ``values``) or the
                gradient norm is NaN/inf; nothing has been stepped.
        """
        grads = [p.grad for p in params if p.grad is not None]
        pre = torch.nn.utils.get_total_norm(grads)
        loss_key, norm_key = _LOSS_AND_NORM_KEYS[network]
        if self._device_check:
            # Sets _found_inf to 1 when either is NaN/inf (× 1.0 otherwise): no sync.
            torch._amp_foreach_non_finite_check_and_unscale_(
                [torch.stack([values[loss_key], pre])], self._found_inf, self._unit_scale
            )
            if max_norm is None:
                return pre, pre
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, pre)
            post = torch.where(pre > max_norm, torch.nn.utils.get_total_norm(grads), pre)
            return pre, post
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
            dict maps :class:`td3drive.contracts.networks.Actor` parameter names
            (``encoder.*``, ``head.*``) to float32 numpy copies on the host,
            which Ray ships zero-copy. Load with
            ``actor.load_state_dict({k: torch.from_numpy(v) ...})``.

        Raises:
            NonFiniteLossError: (``fused_adam``) a pending update was not
                applied (see :meth:`fetch_metrics`): ``version`` would be wrong.
        """
        self._check_pending()
        weights = {k: v.detach().cpu().numpy().copy() for k, v in self.actor.state_dict().items()}
        return self.updates, weights

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: networks, targets,
        optimizers, the update counter, the RNG state of noise and
        augmentation (with the device type it belongs to), and the initial
        encoder weights. Plain containers of tensors, numbers and strings,
        loadable with ``weights_only=True``.

        Raises:
            NonFiniteLossError: as :meth:`policy_weights`.
        """
        self._check_pending()
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
            for optimizer, key in (
                (self.actor_optimizer, "actor_optimizer"),
                (self.critic_optimizer, "critic_optimizer"),
            ):
                _load_adam_state(optimizer, state[key])
            for key, tensors in state["encoder_init"].items():
                encoder = self.actor.encoder if key == "actor" else self.critic.encoder
                self._encoder_init[key] = [
                    _like(param, t) for param, t in zip(encoder.parameters(), tensors, strict=True)
                ]
            updates = int(state["updates"])
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"checkpoint tensors do not fit its own learner config: {_short_reason(exc)}"
            ) from exc
        self._apply_learning_rates()
        self._encoder_init_norm = self._init_norms()
        self.updates = updates
        self._pending, self._window_latest, self._window_max = [], {}, {}
        self._window_updates, self._last_actor_step = 0, False
        self._found_inf.zero_()
        self.resume_changes = config_changes(saved, self.config)
        self._restore_generator(state)

    def _check_pending(self) -> None:
        """Under ``fused_adam``, bring pending metrics to the host when any are
        pending, so that a skipped step raises before weights or a checkpoint
        are read. Raises :class:`NonFiniteLossError` as :meth:`fetch_metrics`."""
        if self._device_check and self._pending:
            self._drain({})

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
            OSError: (:class:`td3drive.contracts.storage.StorageError`) the directory is
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
        weights: :class:`td3drive.contracts.networks.Actor` parameter names (``encoder.*``,
            ``head.*``) to float32 numpy arrays on the host, as
            :meth:`TD3Learner.policy_weights` publishes them; load with
            :func:`td3drive.contracts.networks.load_policy_weights`.
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
    (:meth:`td3drive.contracts.storage.RunStorage.write_with`): on a local filesystem
    streamed to a temp file that is fsynced and renamed; on an object store
    saved to memory (``io.BytesIO``) and uploaded in one piece.

    Args:
        obj: what ``torch.save`` takes.
        path: a local path (relative to this process's working directory) or
            a URI (``s3://``, ``gs://``, ``file://``).

    Returns:
        ``path`` as a ``Path`` for a local path, the URI for a URI.

    Raises:
        OSError: (:class:`td3drive.contracts.storage.StorageError`) on any write failure;
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


_ADAM_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _load_adam_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)`` that keeps the optimizer's own
    implementation (``fused``, ``foreach``; ``load_state_dict`` would take the
    checkpoint's) and puts the state where that implementation wants it: each
    moment in its parameter's memory format (a checkpoint written with another
    ``channels_last``), ``step`` on the parameter's device for a fused Adam and
    on the CPU otherwise."""
    flags = [
        {k: group[k] for k in _ADAM_IMPLEMENTATION_FLAGS if k in group}
        for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(dict(saved))
    for group, own in zip(optimizer.param_groups, flags, strict=True):
        group.update(own)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    where = param.device if on_device else torch.device("cpu")
                    state[key] = value.to(where, torch.float32)
                elif value.shape == param.shape:
                    state[key] = _like(param, value)


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into a tensor with ``param``'s device, dtype and memory format."""
    return torch.empty_like(param, requires_grad=False).copy_(value)


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
