"""The learner's speed work: deferred metrics, the device-side
NaN/inf guard, the speed options, the learner actor's train loop and the
benchmark.

* With every option off the update is bit-identical to the original update
  (:func:`legacy_update`, a frozen copy of it), and
  ``update_deferred`` + ``fetch_metrics`` is bit-identical to ``update``.
* Under ``fused_adam`` a NaN/inf step is skipped on the device and raised at
  the fetch: no NaN reaches the weights, the Adam state or the targets.
* Each option trains (finite losses, weights move), validates, and is
  reachable from YAML.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import ray
import torch

import learner.td3 as td3
from learner.ray_actor import LearnerActor
from learner.td3 import GRAD_NORM_METRICS, NonFiniteLossError, TD3Learner
from rollout_workers.ray_actor import remote_weights_board_class
from td3drive.bench.learner import (
    COMPILE_WARMUP,
    DEFAULT_OPTIONS,
    OPTIONS,
    _variants,
    format_table,
    learner_torch_threads,
    run_learner_benchmark,
)
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import (
    ConfigError,
    LearnerConfig,
    RunConfig,
    TD3DriveConfig,
    load_config,
)
from td3drive.contracts.networks import load_policy_weights, policy_for
from td3drive.contracts.spec import Batch
from tests.conftest import random_batch

SMALL: dict[str, Any] = {
    "device": "cpu",
    "features_dim": 32,
    "actor_hidden": (32,),
    "critic_hidden": (32,),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make(**overrides: Any) -> TD3Learner:
    return TD3Learner(LearnerConfig(**{**SMALL, **overrides}))


def full_state(learner: TD3Learner) -> dict[str, Any]:
    """A copy of everything that an update changes (optimizer steps included)."""
    state = learner.state_dict()
    skip = ("config", "format", "generator_device")
    return _cloned({k: v for k, v in state.items() if k not in skip})


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return value


def assert_bit_identical(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bit_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def all_finite(learner: TD3Learner) -> bool:
    tensors = list(learner.actor.state_dict().values()) + list(learner.critic.state_dict().values())
    for optimizer in (learner.actor_optimizer, learner.critic_optimizer):
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------- the update of before
def legacy_update(learner: TD3Learner, batch: Batch) -> dict[str, float]:
    """``TD3Learner.update`` before the speed work (commit f2ab615), on a
    learner's networks, optimizers and generator: a host check and a host
    clipping decision per optimizer step, metrics fetched per update."""
    cfg = learner.config
    batch.validate()
    tensors = [
        None if a is None else torch.from_numpy(np.array(a)).to(learner.device)
        for a in (
            batch.obs_image,
            batch.obs_vector,
            batch.action,
            batch.reward,
            batch.discount,
            batch.next_obs_image,
            batch.next_obs_vector,
            batch.weight,
        )
    ]
    obs_image, obs_vector, action, reward, discount, next_image, next_vector, weight = tensors
    assert obs_image is not None and next_image is not None
    if cfg.random_shift_pad:
        obs_image = td3.random_shift(obs_image, cfg.random_shift_pad, learner._generator)
        next_image = td3.random_shift(next_image, cfg.random_shift_pad, learner._generator)
    update_index = learner.updates + 1
    actor_step = update_index % cfg.policy_delay == 0

    with torch.no_grad():
        if learner.target_actor_encoder is not None and learner.target_critic_encoder is not None:
            t_actor_features = learner.target_actor_encoder(next_image)
            t_critic_features = learner.target_critic_encoder(next_image)
        else:
            t_actor_features = t_critic_features = learner.critic.encoder(next_image)
        next_action = learner.target_actor_head(t_actor_features, next_vector)
        if cfg.policy_noise > 0:
            noise = torch.randn(
                next_action.shape, device=learner.device, generator=learner._generator
            )
            noise = (noise * cfg.policy_noise).clamp_(-cfg.noise_clip, cfg.noise_clip)
            next_action = (next_action + noise).clamp_(-1.0, 1.0)
        tq1, tq2 = learner.target_critic_heads(t_critic_features, next_vector, next_action)
        target_q = reward + discount * torch.minimum(tq1, tq2)

    if learner.mode == "frozen":
        with torch.no_grad():
            critic_features = learner.critic.encoder(obs_image)
    else:
        critic_features = learner.critic.encoder(obs_image)
    q1, q2 = learner.critic.heads(critic_features, obs_vector, action)
    squared_errors = (q1 - target_q).square() + (q2 - target_q).square()
    critic_loss = (squared_errors if weight is None else weight * squared_errors).mean()
    learner.critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    values: dict[str, torch.Tensor] = {
        M.CRITIC_LOSS: critic_loss.detach(),
        M.Q1_MEAN: q1.detach().mean(),
        M.Q2_MEAN: q2.detach().mean(),
        M.TARGET_Q_MEAN: target_q.mean(),
    }

    def checked_clip(
        loss_key: str, params: list[torch.Tensor], max_norm: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grads = [p.grad for p in params if p.grad is not None]
        pre = torch.nn.utils.get_total_norm(grads)
        loss_value, pre_value = torch.stack([values[loss_key], pre]).tolist()
        assert math.isfinite(loss_value) and math.isfinite(pre_value)
        if max_norm is None or pre_value <= max_norm:
            return pre, pre
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, pre)
        return pre, torch.nn.utils.get_total_norm(grads)

    values[M.CRITIC_GRAD_NORM_PRECLIP], values[M.CRITIC_GRAD_NORM_POSTCLIP] = checked_clip(
        M.CRITIC_LOSS, learner._critic_params, cfg.critic_max_grad_norm
    )
    learner.critic_optimizer.step()
    if actor_step:
        critic_features = critic_features.detach()
        if learner.mode == "separate":
            actor_features = learner.actor.encoder(obs_image)
        else:
            actor_features = critic_features
        preactivation = learner.actor.head.preactivation(actor_features, obs_vector)
        policy_action = torch.tanh(preactivation)
        actor_loss = -learner.critic.heads.q1_only(
            critic_features, obs_vector, policy_action
        ).mean()
        if cfg.action_preactivation_penalty:
            actor_loss = actor_loss + cfg.action_preactivation_penalty * (
                preactivation.square().mean()
            )
        learner.actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=learner._actor_params)
        values[M.ACTOR_LOSS] = actor_loss.detach()
        values[M.ACTOR_SATURATION] = (
            (policy_action.detach().abs() > M.ACTOR_SATURATION_THRESHOLD).float().mean()
        )
        values[M.ACTOR_GRAD_NORM_PRECLIP], values[M.ACTOR_GRAD_NORM_POSTCLIP] = checked_clip(
            M.ACTOR_LOSS, learner._actor_params, cfg.actor_max_grad_norm
        )
        learner.actor_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(learner._target_params, learner._online_params, cfg.tau)

    learner.updates = update_index
    values[M.ACTOR_ENCODER_WEIGHT_DELTA] = learner._encoder_weight_delta("actor")
    values[M.CRITIC_ENCODER_WEIGHT_DELTA] = (
        values[M.ACTOR_ENCODER_WEIGHT_DELTA]
        if learner.mode != "separate"
        else learner._encoder_weight_delta("critic")
    )
    names = list(values)
    numbers = torch.stack([values[n].float() for n in names]).tolist()
    metrics = dict(zip(names, numbers, strict=True))
    metrics.update(learner._learning_rates())
    metrics[M.LEARNER_UPDATES] = float(learner.updates)
    metrics[M.ACTOR_UPDATED] = float(actor_step)
    return metrics


# Clipping at 0.5 clips some steps and not others (both branches of the old code).
EXACT_CASES = [
    pytest.param({"encoder": "shared"}, id="shared-defaults"),
    pytest.param({"encoder": "separate", "critic_max_grad_norm": 0.5}, id="separate-clip"),
    pytest.param({"encoder": "frozen", "actor_max_grad_norm": None}, id="frozen-noclip"),
    pytest.param({"encoder": "shared", "random_shift_pad": 0, "policy_delay": 1}, id="no-shift"),
]


@pytest.mark.parametrize("fields", EXACT_CASES)
def test_with_every_option_off_the_update_is_bit_identical_to_before(
    fields: dict[str, Any],
) -> None:
    ours, before = make(**fields), make(**fields)
    assert_bit_identical(full_state(ours), full_state(before))
    for seed in range(5):
        batch = random_batch(size=8, seed=seed)
        if seed == 3:  # prioritized replay's importance weights
            batch = Batch(**{**batch.__dict__, "weight": np.full(8, 0.5, np.float32)})
        got, expected = ours.update(batch), legacy_update(before, batch)
        assert got == expected, f"metrics of update {seed + 1}"
    assert_bit_identical(full_state(ours), full_state(before))


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_deferred_updates_are_the_same_updates_and_metrics(mode: str) -> None:
    eager = make(encoder=mode, critic_max_grad_norm=0.5)
    deferred = make(encoder=mode, critic_max_grad_norm=0.5)
    per_update = []
    for seed in range(5):
        batch = random_batch(size=8, seed=seed)
        per_update.append(eager.update(batch))
        deferred.update_deferred(batch)
    assert deferred.updates == 5
    fetched = deferred.fetch_metrics()
    assert_bit_identical(full_state(eager), full_state(deferred))
    assert fetched.updates == 5
    last, last_actor = per_update[-1], per_update[-2]  # policy_delay 2: update 4 stepped the actor
    assert fetched.latest == {**last_actor, **last}
    for name in GRAD_NORM_METRICS:
        assert fetched.grad_norm_max[name] == max(m[name] for m in per_update if name in m)
    # A new window: nothing pending, only what is measured at the fetch.
    empty = deferred.fetch_metrics()
    assert empty.updates == 0 and empty.grad_norm_max == {}
    assert M.CRITIC_LOSS not in empty.latest
    assert empty.latest[M.LEARNER_UPDATES] == 5.0
    assert empty.latest[M.CRITIC_ENCODER_WEIGHT_DELTA] == last[M.CRITIC_ENCODER_WEIGHT_DELTA]


def test_pending_metrics_are_brought_over_when_nobody_fetches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(td3, "MAX_PENDING_UPDATES", 3)
    learner = make(random_shift_pad=0)
    for seed in range(7):
        learner.update_deferred(random_batch(size=4, seed=seed))
        assert len(learner._pending) < 3
    fetched = learner.fetch_metrics()
    assert fetched.updates == 7
    assert fetched.latest[M.LEARNER_UPDATES] == 7.0


def test_images_reach_the_device_as_uint8_and_are_shifted_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    learner = make(random_shift_pad=4)
    seen: list[tuple[torch.dtype, torch.device, torch.device]] = []
    original = td3.random_shift

    def spy(image: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
        seen.append((image.dtype, image.device, generator.device))
        return original(image, pad, generator)

    monkeypatch.setattr(td3, "random_shift", spy)
    tensors = learner._to_tensors(random_batch(size=4))
    assert tensors[0].dtype == tensors[5].dtype == torch.uint8
    assert tensors[0].device.type == learner.device.type
    learner.update(random_batch(size=4))
    assert seen == [(torch.uint8, learner.device, learner.device)] * 2


# ------------------------------------------------------ the NaN/inf guard
def exploding_batch(seed: int = 9) -> Batch:
    """Finite data whose critic loss overflows to inf (reward near float32's max)."""
    batch = random_batch(size=8, seed=seed)
    return Batch(**{**batch.__dict__, "reward": np.full(8, 3e38, np.float32)})


def test_host_check_stops_the_critic_step_on_an_exploding_batch() -> None:
    learner = make(fused_adam=False)
    learner.update(random_batch(size=8, seed=0))
    before = full_state(learner)
    with pytest.raises(NonFiniteLossError, match="critic") as error:
        learner.update_deferred(exploding_batch())
    assert error.value.update == 2 and learner.updates == 1
    assert_bit_identical(full_state(learner)["critic"], before["critic"])


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_device_check_skips_the_bad_step_and_every_later_one(mode: str) -> None:
    learner = make(encoder=mode, fused_adam=True, policy_delay=1)
    for seed in range(2):
        learner.update_deferred(random_batch(size=8, seed=seed))
    learner.fetch_metrics()
    before = full_state(learner)
    learner.update_deferred(random_batch(size=8, seed=2))  # applied
    applied = full_state(learner)
    learner.update_deferred(exploding_batch())  # update 4: not applied
    for seed in range(5, 8):  # updates 5-7: skipped too
        learner.update_deferred(random_batch(size=8, seed=seed))
    with pytest.raises(NonFiniteLossError) as error:
        learner.fetch_metrics()
    assert (error.value.network, error.value.update) == ("critic", 4)
    assert not math.isfinite(error.value.diagnostics[M.CRITIC_LOSS])
    assert learner.updates == 3
    assert all_finite(learner)
    after = full_state(learner)
    for key in after:  # weights, targets, Adam moments and step counts: as after update 3
        if key not in ("updates", "generator"):
            assert_bit_identical(after[key], applied[key], key)
    assert not torch.equal(
        applied["critic"]["heads.q1.0.weight"], before["critic"]["heads.q1.0.weight"]
    )
    # The learner goes on from update 3.
    metrics = learner.update(random_batch(size=8, seed=8))
    assert metrics[M.LEARNER_UPDATES] == 4.0 and math.isfinite(metrics[M.CRITIC_LOSS])
    assert not torch.equal(
        full_state(learner)["critic"]["heads.q1.0.weight"], after["critic"]["heads.q1.0.weight"]
    )


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_device_check_on_an_actor_loss_keeps_that_updates_critic_step(mode: str) -> None:
    # An infinite penalty on the pre-tanh action makes the actor loss inf, and only it.
    fields = {
        "encoder": mode,
        "fused_adam": True,
        "policy_delay": 1,
        "action_preactivation_penalty": math.inf,
    }
    one, three = make(**fields), make(**fields)
    actor_before = full_state(one)["actor"]
    one.update_deferred(random_batch(size=8, seed=0))
    for seed in range(3):
        three.update_deferred(random_batch(size=8, seed=seed))
    for learner in (one, three):
        with pytest.raises(NonFiniteLossError) as error:
            learner.fetch_metrics()
        assert (error.value.network, error.value.update) == ("actor", 1)
        assert M.CRITIC_GRAD_NORM_POSTCLIP in error.value.diagnostics
        assert learner.updates == 0
        assert all_finite(learner)
        own = "" if mode == "separate" else "head."  # a shared CNN is the critic's
        actor = {k: v for k, v in full_state(learner)["actor"].items() if k.startswith(own)}
        assert_bit_identical(actor, {k: actor_before[k] for k in actor})
    # Update 1's critic step was applied; updates 2 and 3 were skipped entirely.
    assert_bit_identical(full_state(one)["critic"], full_state(three)["critic"])
    assert_bit_identical(full_state(one)["critic_optimizer"], full_state(three)["critic_optimizer"])


def test_device_check_is_raised_before_td_errors_weights_or_checkpoints_leave(
    tmp_path: Path,
) -> None:
    learner = make(fused_adam=True)
    learner.update_deferred(random_batch(size=8, seed=0))
    assert np.isfinite(learner.last_td_errors()).all()
    for read in (
        learner.last_td_errors,
        learner.policy_weights,
        lambda: learner.save_checkpoint(tmp_path / "learner.pt"),
    ):
        learner.update_deferred(exploding_batch())
        with pytest.raises(NonFiniteLossError):
            read()
        assert learner.updates == 1
    assert not (tmp_path / "learner.pt").exists()
    metrics, errors = learner.update_with_td_errors(random_batch(size=8, seed=1))
    assert metrics[M.LEARNER_UPDATES] == 2.0 and np.isfinite(errors).all()


# ------------------------------------------------------------- the options
def moved(before: dict[str, Any], learner: TD3Learner, network: str) -> list[str]:
    after = full_state(learner)[network]
    return [k for k in before[network] if not torch.equal(before[network][k], after[k])]


def check_trains(learner: TD3Learner, updates: int = 2) -> list[dict[str, float]]:
    """A few updates: finite losses, and every trainable tensor of the actor
    and the critic moved."""
    before = full_state(learner)
    metrics = [learner.update(random_batch(size=8, seed=s)) for s in range(updates)]
    for m in metrics:
        assert math.isfinite(m[M.CRITIC_LOSS])
    assert any(math.isfinite(m.get(M.ACTOR_LOSS, math.nan)) for m in metrics)
    trainable = {
        "actor": {n for n, p in learner.actor.named_parameters() if p.requires_grad},
        "critic": {n for n, p in learner.critic.named_parameters() if p.requires_grad},
    }
    if learner.mode != "separate":  # the shared CNN is the critic's; the actor's copy of it
        trainable["actor"] |= {n for n in before["actor"] if n.startswith("encoder.")}
    for network in ("actor", "critic"):
        assert set(moved(before, learner, network)) >= trainable[network], network
    assert all_finite(learner)
    return metrics


def close_to_default(options: dict[str, Any], mode: str, rtol: float) -> None:
    """The option gives the default update up to float rounding (one update)."""
    reference, optioned = make(encoder=mode), make(encoder=mode, **options)
    batch = random_batch(size=8, seed=0)
    expected, got = reference.update(batch), optioned.update(batch)
    for name in (M.CRITIC_LOSS, M.Q1_MEAN, M.CRITIC_GRAD_NORM_PRECLIP):
        assert got[name] == pytest.approx(expected[name], rel=rtol), name
    for name, value in reference.critic.state_dict().items():
        torch.testing.assert_close(optioned.critic.state_dict()[name], value, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_channels_last_trains_and_gives_the_same_update(mode: str) -> None:
    learner = make(encoder=mode, channels_last=True)
    conv = learner.critic.encoder.conv[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    check_trains(learner)
    close_to_default({"channels_last": True}, mode, rtol=1e-4)


def test_channels_last_weights_and_checkpoints_load_anywhere(tmp_path: Path) -> None:
    learner = make(encoder="separate", channels_last=True, policy_delay=1)
    learner.update(random_batch(size=8))
    _, weights = learner.policy_weights()
    assert all(w.flags.c_contiguous for w in weights.values())
    policy = policy_for(learner.config)
    load_policy_weights(policy, weights)
    batch = random_batch(size=8, seed=1)
    image, vector = torch.from_numpy(batch.obs_image), torch.from_numpy(batch.obs_vector)
    with torch.no_grad():  # the same weights; NCHW and NHWC convs round differently
        torch.testing.assert_close(policy(image, vector), learner.actor(image, vector))
    path = learner.save_checkpoint(tmp_path / "learner.pt")
    plain = TD3Learner.from_checkpoint(
        path, learner.config.model_copy(update={"channels_last": False})
    )
    assert plain.resume_changes == {"channels_last": (True, False)}
    assert_bit_identical(full_state(plain), full_state(learner))
    moments = plain.critic_optimizer.state[plain.critic.encoder.conv[0].weight]
    assert moments["exp_avg"].is_contiguous()
    plain.update(batch)
    back = TD3Learner.from_checkpoint(path)
    assert back.critic.encoder.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert back.critic_optimizer.state[back.critic.encoder.conv[0].weight]["exp_avg"].is_contiguous(
        memory_format=torch.channels_last
    )


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_fused_adam_trains_and_gives_the_same_update(mode: str) -> None:
    learner = make(encoder=mode, fused_adam=True)
    assert all(g["fused"] for g in learner.critic_optimizer.param_groups)
    check_trains(learner)
    close_to_default({"fused_adam": True}, mode, rtol=1e-4)


def test_fused_and_unfused_checkpoints_load_into_each_other(tmp_path: Path) -> None:
    fused = make(fused_adam=True)
    fused.update(random_batch(size=8))
    path = fused.save_checkpoint(tmp_path / "fused.pt")
    plain = TD3Learner.from_checkpoint(path, fused.config.model_copy(update={"fused_adam": False}))
    assert not any(g["fused"] for g in plain.critic_optimizer.param_groups)
    for key, value in full_state(fused).items():  # all but the optimizers' own flags
        other = full_state(plain)[key]
        if key.endswith("_optimizer"):
            value, other = value["state"], other["state"]
        assert_bit_identical(value, other, key)
    plain.update(random_batch(size=8, seed=1))
    path = plain.save_checkpoint(tmp_path / "plain.pt")
    again = TD3Learner.from_checkpoint(path, plain.config.model_copy(update={"fused_adam": True}))
    assert all(g["fused"] for g in again.critic_optimizer.param_groups)
    check_trains(again)


def test_amp_bf16_is_refused_on_a_cpu() -> None:
    with pytest.raises(ValueError, match="amp_bf16 needs a CUDA learner"):
        LearnerConfig(device="cpu", amp_bf16=True)
    config = LearnerConfig(**{**SMALL, "device": "auto", "amp_bf16": True})
    with pytest.raises(RuntimeError, match=r"learner\.amp_bf16 needs a CUDA device"):
        TD3Learner(config, device="cpu")


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_amp_bf16_code_path_trains_with_fp32_master_weights(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bf16 autocast path, run on the CPU's bf16 autocast (the option itself
    is CUDA only; the CUDA test below runs it for real)."""
    monkeypatch.setattr(td3, "check_speed_options", lambda config, device: None)
    config = LearnerConfig(**{**SMALL, "device": "auto", "encoder": mode, "amp_bf16": True})
    learner = TD3Learner(config, device="cpu")
    dtypes: list[torch.dtype] = []
    first_conv = learner.critic.encoder.conv[0]
    hook = first_conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    check_trains(learner)
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the convs ran under autocast
    params = [*learner.actor.parameters(), *learner.critic.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    moments = [s["exp_avg"] for s in learner.critic_optimizer.state.values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    target = learner.td_target(random_batch(size=8))
    assert target.dtype == np.float32 and np.isfinite(target).all()


@CUDA
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_amp_bf16_trains_on_cuda(mode: str) -> None:
    learner = make(encoder=mode, device="cuda", amp_bf16=True)
    check_trains(learner)
    assert all(p.dtype == torch.float32 for p in learner.critic.parameters())


@CUDA
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_fused_adam_device_check_on_cuda(mode: str) -> None:
    learner = make(encoder=mode, device="cuda", fused_adam=True, policy_delay=1)
    check_trains(learner)
    learner.update_deferred(exploding_batch())
    with pytest.raises(NonFiniteLossError):
        learner.fetch_metrics()
    assert all_finite(learner)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"compile": "default"}, id="compile"),
        pytest.param({"compile": "default", "channels_last": True, "fused_adam": True}, id="all"),
        pytest.param(
            {"compile": "reduce-overhead", "amp_bf16": True, "device": "cuda"},
            id="cuda-graphs",
            marks=CUDA,
        ),
    ],
)
def test_compiled_networks_train(options: dict[str, Any]) -> None:
    learner = make(encoder="shared", random_shift_pad=0, **options)
    assert learner.critic.encoder._compiled_call_impl is not None
    check_trains(learner, updates=3)
    names = set(learner.actor.state_dict())
    assert names == set(policy_for(learner.config).state_dict())  # no _orig_mod prefixes


@CUDA
@pytest.mark.slow
def test_every_option_on_cuda_trains() -> None:
    options = {"channels_last": True, "fused_adam": True, "amp_bf16": True}
    check_trains(make(encoder="separate", device="cuda", **options), updates=3)


def test_the_options_are_reachable_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "learner:\n  device: cpu\n  features_dim: 32\n  actor_hidden: [32]\n"
        "  critic_hidden: [32]\n  channels_last: true\n  fused_adam: true\n"
        "  compile: reduce-overhead\n  amp_bf16: false\n"
    )
    config = load_config(path).learner
    assert (config.channels_last, config.fused_adam, config.compile, config.amp_bf16) == (
        True,
        True,
        "reduce-overhead",
        False,
    )
    learner = TD3Learner(config.model_copy(update={"compile": "off"}))
    assert all(g["fused"] for g in learner.actor_optimizer.param_groups)
    assert learner.critic.encoder.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    path.write_text("learner:\n  compile: max-autotune\n")
    with pytest.raises(ConfigError, match=r"learner\.compile"):
        load_config(path)
    path.write_text("learner:\n  device: cpu\n  amp_bf16: true\n")
    with pytest.raises(ConfigError, match="amp_bf16"):
        load_config(path)


# ------------------------------------------------- the learner actor's loop
@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class ScriptedSampler:
    """Stands in for the replay sampler: hands out the given batches."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = list(batches)
        self.priority_batches = self.priority_transitions_updated = 0
        self.priority_transitions_lost = 0

    def poll(self, timeout_s: float) -> Any:
        batch = self.batches.pop(0)
        versions = np.zeros(len(batch.reward), np.int64)
        return SimpleNamespace(sampled=SimpleNamespace(batch=batch, policy_versions=versions))

    def close(self) -> None:
        pass


def test_the_train_loop_fetches_once_per_call_and_publishes_at_its_end(
    ray_instance: None,
) -> None:
    config = TD3DriveConfig(
        learner={**SMALL, "batch_size": 8, "critic_max_grad_norm": 0.5},
        run={"publish_every_updates": 5},
    )
    board = remote_weights_board_class().remote()
    threads = torch.get_num_threads()
    actor = LearnerActor(config, [], board)
    try:
        assert ray.get(board.version.remote()) == 0
        batches = [random_batch(size=8, seed=s) for s in range(10)]
        actor.sampler.close()
        actor.sampler = ScriptedSampler(batches)  # type: ignore[assignment]
        fetches = []
        fetch = actor.learner.fetch_metrics

        def counted() -> Any:
            fetches.append(actor.learner.updates)
            return fetch()

        actor.learner.fetch_metrics = counted  # type: ignore[method-assign]
        twin = TD3Learner(config.learner)
        expected = [twin.update(b) for b in batches]

        stats = actor.train(7)
        assert fetches == [7]
        assert stats["done"] == 7 and stats["metrics"][M.LEARNER_UPDATES] == 7.0
        assert stats["metrics"][M.CRITIC_LOSS] == expected[6][M.CRITIC_LOSS]
        assert stats["metrics"][M.ACTOR_LOSS] == expected[5][M.ACTOR_LOSS]
        assert stats["grad_norm"]["critic_preclip_max"] == max(
            m[M.CRITIC_GRAD_NORM_PRECLIP] for m in expected[:7]
        )
        assert ray.get(board.version.remote()) == 7  # crossed 5: published at the call's end
        actor.train(2)  # updates 8, 9: no multiple of 5
        assert fetches == [7, 9] and ray.get(board.version.remote()) == 7
        stats = actor.train(1)  # update 10
        assert ray.get(board.version.remote()) == 10
        assert stats["metrics"] == {**stats["metrics"], **expected[9]}
        assert_bit_identical(full_state(actor.learner), full_state(twin))
    finally:
        actor.close()
        ray.kill(board)
        torch.set_num_threads(threads)


def test_the_train_loop_publishes_nothing_after_a_non_finite_step(ray_instance: None) -> None:
    config = TD3DriveConfig(
        learner={**SMALL, "batch_size": 8, "fused_adam": True}, run={"publish_every_updates": 2}
    )
    board = remote_weights_board_class().remote()
    threads = torch.get_num_threads()
    actor = LearnerActor(config, [], board)
    try:
        batches = [random_batch(size=8, seed=0), exploding_batch(), random_batch(size=8, seed=2)]
        actor.sampler.close()
        actor.sampler = ScriptedSampler(batches)  # type: ignore[assignment]
        with pytest.raises(NonFiniteLossError) as error:
            actor.train(3)
        assert error.value.update == 2 and actor.learner.updates == 1
        assert ray.get(board.version.remote()) == 0
        assert all_finite(actor.learner)
    finally:
        actor.close()
        ray.kill(board)
        torch.set_num_threads(threads)


# ------------------------------------------------------------- the benchmark
def test_bench_learner_reports_every_variant_side_by_side() -> None:
    threads = torch.get_num_threads()
    lines: list[str] = []
    report = run_learner_benchmark(
        device="cpu",
        batch_sizes=(4,),
        updates=2,
        warmup=1,
        rounds=2,
        encoders=("shared",),
        options=DEFAULT_OPTIONS,
        fetch_every=2,
        threads=1,
        progress=lines.append,
    )
    assert torch.get_num_threads() == threads  # restored
    assert report["machine"]["torch_threads"] == 1
    variants = {r["variant"]: r for r in report["variants"]}
    assert set(variants) == {
        "reference",
        "ours_fetch_every_update",
        "ours",
        "channels_last",
        "fused_adam",
        "amp_bf16",
        "all",
    }
    assert variants["amp_bf16"]["skipped"] == "bf16 autocast is CUDA only"
    assert variants["all"]["options"] == {"channels_last": True, "fused_adam": True}
    for name in ("reference", "ours_fetch_every_update", "ours", "channels_last", "all"):
        row = variants[name]
        assert row["updates_per_s"] > 0
        assert row["vs_reference"] == row["updates_per_s"] / variants["reference"]["updates_per_s"]
        assert row["vs_ours"] == row["updates_per_s"] / variants["ours"]["updates_per_s"]
    assert report["results"] == [
        {"encoder": "shared", "batch_size": 4, "updates_per_s": variants["ours"]["updates_per_s"]}
    ]
    assert report["overhead_ratio"] == variants["ours"]["vs_reference"]
    assert report["settings"]["fetch_every"] == 2
    table = format_table(report).splitlines()
    assert any("amp_bf16" in line and "skipped" in line for line in table)
    assert all(line in lines for line in table)  # printed


def test_bench_learner_rows_of_every_option_on_a_cpu() -> None:
    config = LearnerConfig(**{**SMALL, "encoder": "shared", "random_shift_pad": 0})
    variants, skipped = _variants(config, torch.device("cpu"), list(OPTIONS), 2, warmup=1)
    rows = {v.name: v for v in variants}  # built only: a compile happens at the first update
    assert list(rows) == [
        "reference",
        "ours_fetch_every_update",
        "ours",
        "channels_last",
        "fused_adam",
        "compile",
        "all",
        "all_but_compile",
    ]
    assert {r["variant"] for r in skipped} == {"amp_bf16", "compile_reduce_overhead"}
    assert rows["all"].options == {"channels_last": True, "fused_adam": True, "compile": "default"}
    assert rows["all_but_compile"].options == {"channels_last": True, "fused_adam": True}
    assert rows["compile"].warmup == rows["all"].warmup == COMPILE_WARMUP
    assert rows["ours"].warmup == 1 and all(v.error is None for v in variants)


def test_bench_learner_reports_a_failing_option_and_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(OPTIONS, "broken", {"cnn": "bogus"})  # type: ignore[index]
    report = run_learner_benchmark(
        batch_sizes=(4,),
        updates=1,
        warmup=0,
        rounds=1,
        encoders=("shared",),
        options=("broken",),
        threads=1,
        progress=lambda _: None,
    )
    rows = {r["variant"]: r for r in report["variants"]}
    assert "unknown cnn variant 'bogus'" in rows["broken"]["error"]
    assert rows["ours"]["updates_per_s"] > 0
    with pytest.raises(ValueError, match="unknown option"):
        run_learner_benchmark(options=("turbo",), progress=lambda _: None)


def test_bench_threads_follow_the_learner_actors_rule() -> None:
    assert learner_torch_threads(RunConfig()) == 1
    assert learner_torch_threads(RunConfig(learner_num_cpus=4.0)) == 4
    assert learner_torch_threads(RunConfig(learner_num_cpus=0.5)) == 1
    assert learner_torch_threads(RunConfig(learner_num_cpus=4.0, learner_torch_threads=3)) == 3
