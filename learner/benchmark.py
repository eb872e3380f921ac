"""``td3drive bench learner``: TD3 updates/s, ours against a plain reference.

The reference is the same TD3 update (same networks from
:mod:`learner.networks`, same Adam, same feature reuse for the actor loss) as a
bare PyTorch loop with none of the learner's machinery: no batch validation,
no gradient clipping or norm measurement, no NaN checks, no metrics. The ratio
``ours / reference`` is therefore the cost of that machinery. Both sides get
the same numpy batches and copy them to the device inside the timed loop, and
their timed segments are interleaved so machine drift hits both alike.

Augmentation is off on both sides (``random_shift_pad=0``); one extra row
measures ours with DrQ random shift, to show what it costs.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from learner.networks import ActorHead, TwinQHead, encoder_for
from learner.td3 import TD3Learner, frozen_copy, resolve_device
from td3drive.config import LearnerConfig
from td3drive.spec import ACTION_DIM, IMAGE_SHAPE, VECTOR_DIM, Batch

Progress = Callable[[str], None]


class ReferenceTD3:
    """A minimal TD3 update loop in plain PyTorch (the benchmark's baseline).

    Same architecture and optimizers as :class:`learner.td3.TD3Learner` for
    ``encoder`` in ``{"separate", "shared"}``; hyperparameters from ``config``.
    """

    def __init__(self, config: LearnerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.separate = config.encoder == "separate"
        torch.manual_seed(config.seed)
        self.critic_encoder = encoder_for(config).to(device)
        self.actor_encoder = (
            encoder_for(config).to(device) if self.separate else self.critic_encoder
        )
        self.actor = ActorHead(config.features_dim, config.actor_hidden).to(device)
        self.critic = TwinQHead(config.features_dim, config.critic_hidden).to(device)
        self.target_actor = frozen_copy(self.actor)
        self.target_critic = frozen_copy(self.critic)
        self.target_actor_encoder = frozen_copy(self.actor_encoder) if self.separate else None
        self.target_critic_encoder = frozen_copy(self.critic_encoder) if self.separate else None
        actor_params = list(self.actor.parameters())
        if self.separate:
            actor_params += list(self.actor_encoder.parameters())
        self.actor_params = actor_params
        self.actor_optimizer = torch.optim.Adam(actor_params, lr=config.actor_lr)
        self.critic_optimizer = torch.optim.Adam(
            [*self.critic.parameters(), *self.critic_encoder.parameters()], lr=config.critic_lr
        )
        pairs = [(self.target_actor, self.actor), (self.target_critic, self.critic)]
        if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
            pairs += [
                (self.target_actor_encoder, self.actor_encoder),
                (self.target_critic_encoder, self.critic_encoder),
            ]
        self.targets: list[torch.Tensor] = [p for t, _ in pairs for p in t.parameters()]
        self.online: list[torch.Tensor] = [p for _, o in pairs for p in o.parameters()]
        self.step = 0

    def update(self, batch: Batch) -> None:
        cfg, dev = self.config, self.device
        obs = torch.from_numpy(batch.obs_image).to(dev, non_blocking=True)
        vec = torch.from_numpy(batch.obs_vector).to(dev, non_blocking=True)
        act = torch.from_numpy(batch.action).to(dev, non_blocking=True)
        rew = torch.from_numpy(batch.reward).to(dev, non_blocking=True)
        disc = torch.from_numpy(batch.discount).to(dev, non_blocking=True)
        next_obs = torch.from_numpy(batch.next_obs_image).to(dev, non_blocking=True)
        next_vec = torch.from_numpy(batch.next_obs_vector).to(dev, non_blocking=True)
        self.step += 1
        with torch.no_grad():
            if self.target_actor_encoder is not None and self.target_critic_encoder is not None:
                fa, fc = self.target_actor_encoder(next_obs), self.target_critic_encoder(next_obs)
            else:
                fa = fc = self.critic_encoder(next_obs)
            noise = (torch.randn(act.shape, device=dev) * cfg.policy_noise).clamp(
                -cfg.noise_clip, cfg.noise_clip
            )
            next_act = (self.target_actor(fa, next_vec) + noise).clamp(-1, 1)
            tq1, tq2 = self.target_critic(fc, next_vec, next_act)
            y = rew + disc * torch.min(tq1, tq2)
        features = self.critic_encoder(obs)
        q1, q2 = self.critic(features, vec, act)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()
        if self.step % cfg.policy_delay == 0:
            features = features.detach()
            actor_features = self.actor_encoder(obs) if self.separate else features
            actor_loss = -self.critic.q1_only(features, vec, self.actor(actor_features, vec)).mean()
            self.actor_optimizer.zero_grad()
            actor_loss.backward(inputs=self.actor_params)
            self.actor_optimizer.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.targets, self.online, cfg.tau)


def synthetic_batches(batch_size: int, count: int, seed: int = 0) -> list[Batch]:
    """``count`` contract-valid batches of random pixels and vectors.

    Random pixels cost the encoder exactly what real ones do; the benchmark
    measures the update, not what it learns.
    """
    rng = np.random.default_rng(seed)

    def one() -> Batch:
        return Batch(
            obs_image=rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8),
            obs_vector=rng.standard_normal((batch_size, VECTOR_DIM), dtype=np.float32),
            action=rng.uniform(-1, 1, (batch_size, ACTION_DIM)).astype(np.float32),
            reward=rng.standard_normal(batch_size, dtype=np.float32),
            discount=np.full(batch_size, 0.99, dtype=np.float32),
            next_obs_image=rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8),
            next_obs_vector=rng.standard_normal((batch_size, VECTOR_DIM), dtype=np.float32),
        )

    return [one() for _ in range(count)]


def _timed(
    update: Callable[[Batch], Any], batches: Sequence[Batch], n: int, device: torch.device
) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(n):
        update(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_learner_benchmark(
    device: str = "cpu",
    batch_sizes: Sequence[int] = (100, 256),
    updates: int = 20,
    warmup: int = 3,
    rounds: int = 4,
    encoders: Sequence[str] = ("separate", "shared"),
    progress: Progress = print,
) -> dict[str, Any]:
    """Measure updates/s of :class:`TD3Learner` and :class:`ReferenceTD3`.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_sizes: transitions per update, one row per size and encoder mode.
        updates: timed updates per row and side (split over ``rounds``
            interleaved segments), after ``warmup`` untimed ones.
        encoders: encoder modes to measure.
        progress: called with one line per finished row.

    Returns:
        The JSON document: ``device``, ``results`` and ``reference_updates_per_s``
        (lists of ``{encoder, batch_size, updates_per_s}``), ``overhead_ratio``
        (ours / reference, ``separate`` at the largest batch size), plus
        ``augmentation`` (ours with random shift), ``settings`` and ``machine``.

    Raises:
        RuntimeError: ``device="cuda"`` without a GPU.
        ValueError: ``updates < rounds``.
    """
    if updates < rounds:
        raise ValueError(f"updates ({updates}) must be at least rounds ({rounds})")
    dev = resolve_device(device)
    per_round = [updates // rounds + (1 if i < updates % rounds else 0) for i in range(rounds)]
    results: list[dict[str, Any]] = []
    reference: list[dict[str, Any]] = []
    augmentation: list[dict[str, Any]] = []
    for batch_size in batch_sizes:
        batches = synthetic_batches(batch_size, count=4, seed=batch_size)
        for encoder in encoders:
            config = LearnerConfig(
                encoder=encoder,
                batch_size=batch_size,
                random_shift_pad=0,
            )
            ours = TD3Learner(config, device=dev)
            ref = ReferenceTD3(config, dev)
            _timed(ours.update, batches, warmup, dev)
            _timed(ref.update, batches, warmup, dev)
            ours_s = ref_s = 0.0
            for i, n in enumerate(per_round):
                # Alternate who goes first, so neither always follows the other.
                if i % 2 == 0:
                    ours_s += _timed(ours.update, batches, n, dev)
                    ref_s += _timed(ref.update, batches, n, dev)
                else:
                    ref_s += _timed(ref.update, batches, n, dev)
                    ours_s += _timed(ours.update, batches, n, dev)
            row = {"encoder": encoder, "batch_size": batch_size}
            results.append({**row, "updates_per_s": updates / ours_s})
            reference.append({**row, "updates_per_s": updates / ref_s})
            progress(
                f"{encoder:>8} batch {batch_size:>4}: ours {updates / ours_s:7.2f} updates/s, "
                f"reference {updates / ref_s:7.2f} updates/s, ratio {ref_s / ours_s:.3f}"
            )
            del ours, ref
    largest = max(batch_sizes)
    if "separate" in encoders:
        config = LearnerConfig(encoder="separate", batch_size=largest, random_shift_pad=4)
        aug = TD3Learner(config, device=dev)
        batches = synthetic_batches(largest, count=4, seed=largest)
        _timed(aug.update, batches, warmup, dev)
        seconds = _timed(aug.update, batches, updates, dev)
        augmentation.append(
            {
                "encoder": "separate",
                "batch_size": largest,
                "random_shift_pad": 4,
                "updates_per_s": updates / seconds,
            }
        )
        progress(
            f"separate batch {largest:>4} + random shift pad 4: {updates / seconds:7.2f} updates/s"
        )

    def rate(rows: list[dict[str, Any]], encoder: str) -> float | None:
        for r in rows:
            if r["encoder"] == encoder and r["batch_size"] == largest:
                return float(r["updates_per_s"])
        return None

    ours_rate, ref_rate = rate(results, "separate"), rate(reference, "separate")
    return {
        "benchmark": "learner",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev),
        "results": results,
        "reference_updates_per_s": reference,
        "overhead_ratio": (ours_rate / ref_rate) if ours_rate and ref_rate else None,
        "augmentation": augmentation,
        "settings": {
            "updates": updates,
            "warmup": warmup,
            "rounds": rounds,
            "random_shift_pad": 0,
            "defaults": LearnerConfig().model_dump(mode="json"),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        },
    }
