"""The TD3 update: where gradients go, what each step may touch, targets,
bootstrapping, clipping, checkpoints and bad input (DESIGN.md §3)."""

from __future__ import annotations

import copy
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from learner.td3 import CheckpointError, NonFiniteLossError, TD3Learner
from td3drive.contracts import metric_names as M
from td3drive.contracts.config import LearnerConfig
from td3drive.contracts.networks import load_policy_weights, policy_for
from td3drive.contracts.spec import Batch, SpecError, Transition
from tests.conftest import random_batch

SMALL = {"features_dim": 64, "actor_hidden": (32,), "critic_hidden": (32,)}


def make_learner(**overrides: object) -> TD3Learner:
    fields = {**SMALL, "device": "cpu", "random_shift_pad": 0, **overrides}
    return TD3Learner(LearnerConfig(**fields))  # type: ignore[arg-type]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} changed"


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


class GradientRecorder:
    """Records which backward pass accumulated a gradient into which parameter.

    The phase is "critic" until the critic optimizer has stepped, "actor" after;
    that is the order of :meth:`TD3Learner.update`.
    """

    def __init__(self, learner: TD3Learner) -> None:
        self.phase = "critic"
        self.events: dict[str, list[tuple[str, float]]] = defaultdict(list)
        self._handles = []
        names = {}
        for prefix, module in (("critic", learner.critic), ("actor", learner.actor)):
            for name, param in module.named_parameters():
                names.setdefault(param, f"{prefix}.{name}")  # shared CNN: "critic."
        for param, name in names.items():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))
        learner.critic_optimizer.register_step_post_hook(lambda *_: self._set("actor"))

    def _set(self, phase: str) -> None:
        self.phase = phase

    def _hook(self, name: str):
        def record(param: torch.Tensor) -> None:
            assert param.grad is not None
            self.events[self.phase].append((name, float(param.grad.abs().sum())))

        return record

    def touched(self, phase: str, prefix: str) -> dict[str, float]:
        return {n: g for n, g in self.events[phase] if n.startswith(prefix)}


# --------------------------------------------------------------- gradient flow
def test_separate_mode_each_loss_trains_its_own_encoder(batch: Batch) -> None:
    learner = make_learner(encoder="separate", policy_delay=1)
    recorder = GradientRecorder(learner)
    learner.update(batch)

    critic_encoder_params = {
        f"critic.encoder.{n}" for n, _ in learner.critic.encoder.named_parameters()
    }
    from_critic = recorder.touched("critic", "critic.encoder.")
    assert set(from_critic) == critic_encoder_params
    assert all(g > 0 for g in from_critic.values()), from_critic

    actor_encoder_params = {
        f"actor.encoder.{n}" for n, _ in learner.actor.encoder.named_parameters()
    }
    from_actor = recorder.touched("actor", "actor.encoder.")
    assert set(from_actor) == actor_encoder_params
    assert all(g > 0 for g in from_actor.values()), from_actor

    # Neither loss reaches the other network's encoder or weights.
    assert recorder.touched("critic", "actor.") == {}
    assert recorder.touched("actor", "critic.") == {}
    # The grads left on the critic are the critic loss's own.
    for name, param in learner.critic.encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_shared_mode_actor_loss_leaves_encoder_grads_untouched(batch: Batch) -> None:
    learner = make_learner(encoder="shared", policy_delay=1)
    recorder = GradientRecorder(learner)
    grads_after_critic: dict[str, torch.Tensor] = {}

    def keep_grads(*_: object) -> None:
        for name, param in learner.critic.encoder.named_parameters():
            assert param.grad is not None
            grads_after_critic[name] = param.grad.clone()

    learner.critic_optimizer.register_step_post_hook(keep_grads)
    metrics = learner.update(batch)
    assert metrics[M.ACTOR_UPDATED] == 1.0

    assert learner.actor.encoder is learner.critic.encoder
    from_critic = recorder.touched("critic", "critic.encoder.")
    assert len(from_critic) == len(list(learner.critic.encoder.parameters()))
    assert all(g > 0 for g in from_critic.values())
    # The actor step accumulated nothing anywhere but the actor head.
    assert recorder.touched("actor", "critic.") == {}
    assert recorder.touched("actor", "actor.encoder.") == {}
    assert recorder.touched("actor", "actor.head.")
    for name, param in learner.critic.encoder.named_parameters():
        assert torch.equal(param.grad, grads_after_critic[name]), name


def test_frozen_mode_encoder_never_changes(batch: Batch) -> None:
    learner = make_learner(encoder="frozen", policy_delay=1, actor_lr=1e-2, critic_lr=1e-2)
    recorder = GradientRecorder(learner)
    before = snapshot(learner.critic.encoder)
    heads_before = snapshot(learner.critic.heads)
    for seed in range(3):
        metrics = learner.update(random_batch(seed=seed))
    assert_same(before, learner.critic.encoder)
    assert changed(heads_before, learner.critic.heads)  # the heads did train
    assert recorder.touched("critic", "critic.encoder.") == {}
    assert metrics[M.ACTOR_ENCODER_WEIGHT_DELTA] == 0.0
    assert metrics[M.CRITIC_ENCODER_WEIGHT_DELTA] == 0.0


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_encoder_weight_delta_reports_relative_l2_change(mode: str, batch: Batch) -> None:
    learner = make_learner(encoder=mode, policy_delay=1)
    initial = {k: v.clone() for k, v in learner.critic.encoder.state_dict().items()}
    metrics = learner.update(batch)
    now = learner.critic.encoder.state_dict()
    change = torch.sqrt(sum(((now[k] - initial[k]) ** 2).sum() for k in initial))
    scale = torch.sqrt(sum((v**2).sum() for v in initial.values()))
    assert metrics[M.CRITIC_ENCODER_WEIGHT_DELTA] == pytest.approx(float(change / scale), rel=1e-4)
    assert metrics[M.CRITIC_ENCODER_WEIGHT_DELTA] > 0
    if mode == "shared":
        assert metrics[M.ACTOR_ENCODER_WEIGHT_DELTA] == metrics[M.CRITIC_ENCODER_WEIGHT_DELTA]


# ------------------------------------------------- actor loss on critic features
def test_actor_loss_uses_the_critics_own_encoder_features(batch: Batch) -> None:
    # lr 0 for the critic and the encoders: the critic step changes nothing, so
    # the actor loss can be recomputed from the networks as they are now.
    learner = make_learner(
        encoder="separate",
        policy_delay=1,
        critic_lr=0.0,
        encoder_lr=0.0,
        policy_noise=0.0,
        action_preactivation_penalty=0.0,  # the loss is -Q1 alone here
    )
    image = torch.from_numpy(batch.obs_image)
    vector = torch.from_numpy(batch.obs_vector)
    with torch.no_grad():
        critic_features = learner.critic.encoder(image)
        actor_features = learner.actor.encoder(image)
        action = learner.actor.head(actor_features, vector)
        right = -learner.critic.heads.q1_only(critic_features, vector, action).mean()
        wrong = -learner.critic.heads.q1_only(actor_features, vector, action).mean()
    assert abs(float(right - wrong)) > 1e-3, "the case does not tell the two apart"

    metrics = learner.update(batch)
    assert metrics[M.ACTOR_LOSS] == pytest.approx(float(right), rel=1e-5, abs=1e-7)
    assert metrics[M.ACTOR_LOSS] != pytest.approx(float(wrong), rel=1e-3)


def test_actor_loss_adds_the_preactivation_penalty_and_reports_saturation(batch: Batch) -> None:
    penalty = 0.25
    learner = make_learner(
        encoder="separate",
        policy_delay=1,
        critic_lr=0.0,
        encoder_lr=0.0,
        policy_noise=0.0,
        action_preactivation_penalty=penalty,
    )
    # Scale the last layer so some actions saturate and some do not.
    with torch.no_grad():
        learner.actor.head.net[-1].weight.mul_(40.0)
    image = torch.from_numpy(batch.obs_image)
    vector = torch.from_numpy(batch.obs_vector)
    with torch.no_grad():
        critic_features = learner.critic.encoder(image)
        pre = learner.actor.head.preactivation(learner.actor.encoder(image), vector)
        action = torch.tanh(pre)
        q_term = -learner.critic.heads.q1_only(critic_features, vector, action).mean()
        expected = q_term + penalty * pre.square().mean()
        saturation = (action.abs() > 0.99).float().mean()
    assert 0.0 < float(saturation) < 1.0, "the case does not exercise the metric"
    assert float(penalty * pre.square().mean()) > 1e-3, "the penalty is too small to see"

    metrics = learner.update(batch)
    assert metrics[M.ACTOR_LOSS] == pytest.approx(float(expected), rel=1e-5)
    assert metrics[M.ACTOR_SATURATION] == pytest.approx(float(saturation))


def test_the_penalty_pulls_a_saturated_actor_back(batch: Batch) -> None:
    # A saturated tanh passes almost no gradient from Q; the penalty's gradient
    # acts on the pre-activation directly, so it still moves the actor.
    def saturation_after(penalty: float) -> float:
        learner = make_learner(
            encoder="separate",
            policy_delay=1,
            critic_lr=0.0,
            encoder_lr=0.0,
            actor_lr=1e-2,
            action_preactivation_penalty=penalty,
        )
        with torch.no_grad():
            learner.actor.head.net[-1].bias.fill_(4.0)  # tanh(4) = 0.9993
        for _ in range(20):
            metrics = learner.update(batch)
        return metrics[M.ACTOR_SATURATION]

    assert saturation_after(0.0) == 1.0
    assert saturation_after(1.0) < 0.5


# ---------------------------------------------- each step touches its own network
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_actor_step_leaves_critic_bit_identical(mode: str, batch: Batch) -> None:
    learner = make_learner(encoder=mode, policy_delay=1, actor_lr=1e-2)
    after_critic_step: dict[str, torch.Tensor] = {}
    learner.critic_optimizer.register_step_post_hook(
        lambda *_: after_critic_step.update(snapshot(learner.critic))
    )
    actor_before = snapshot(learner.actor.head)
    metrics = learner.update(batch)
    assert metrics[M.ACTOR_UPDATED] == 1.0
    assert changed(actor_before, learner.actor.head), "the actor step did not run"
    assert_same(after_critic_step, learner.critic)


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_critic_step_leaves_actor_bit_identical(mode: str, batch: Batch) -> None:
    learner = make_learner(encoder=mode, policy_delay=2, critic_lr=1e-2)
    actor_params = {
        k: v
        for k, v in snapshot(learner.actor).items()
        if mode == "separate" or k.startswith("head.")  # shared: the CNN is the critic's
    }
    critic_before = snapshot(learner.critic.heads)
    targets_before = snapshot(learner.target_actor_head)

    metrics = learner.update(batch)  # update 1 of policy_delay 2: critic only
    assert metrics[M.ACTOR_UPDATED] == 0.0
    assert M.ACTOR_LOSS not in metrics
    assert changed(critic_before, learner.critic.heads), "the critic step did not run"
    now = learner.actor.state_dict()
    for name, value in actor_params.items():
        assert torch.equal(value, now[name]), name
    assert_same(targets_before, learner.target_actor_head)

    before_actor_step: dict[str, torch.Tensor] = {}
    learner.actor_optimizer.register_step_pre_hook(
        lambda *_: before_actor_step.update(snapshot(learner.actor))
    )
    actor_now = snapshot(learner.actor)
    learner.update(random_batch(seed=1))  # update 2: critic step, then actor step
    for name, value in actor_now.items():
        if mode == "separate" or name.startswith("head."):
            assert torch.equal(value, before_actor_step[name]), name


# ------------------------------------------------------------------- targets
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_targets_move_by_exactly_tau(mode: str, batch: Batch) -> None:
    tau = 0.1
    learner = make_learner(encoder=mode, policy_delay=1, tau=tau, actor_lr=1e-2, critic_lr=1e-2)
    # Make targets differ from online weights first, so the interpolation shows.
    learner.update(random_batch(seed=5))
    pairs = [
        (learner.target_actor_head, learner.actor.head),
        (learner.target_critic_heads, learner.critic.heads),
    ]
    if mode == "separate":
        assert learner.target_actor_encoder is not None
        assert learner.target_critic_encoder is not None
        pairs += [
            (learner.target_actor_encoder, learner.actor.encoder),
            (learner.target_critic_encoder, learner.critic.encoder),
        ]
    else:
        assert learner.target_actor_encoder is None and learner.target_critic_encoder is None
    old_targets = [snapshot(t) for t, _ in pairs]
    learner.update(batch)
    for (target, online), old in zip(pairs, old_targets, strict=True):
        new_online = online.state_dict()
        for name, value in target.state_dict().items():
            expected = old[name] + tau * (new_online[name] - old[name])
            assert not torch.equal(old[name], value), f"{name} did not move"
            # Two float32 roundings apart at most (LayerNorm weights sit near 1.0,
            # where one ulp is 1.2e-7); a move by the wrong rate is ~1e-4 off.
            torch.testing.assert_close(value, expected, rtol=2.5e-7, atol=1e-7, msg=name)


def test_targets_do_not_move_between_delayed_updates(batch: Batch) -> None:
    learner = make_learner(encoder="separate", policy_delay=3)
    assert learner.target_critic_encoder is not None
    before = [snapshot(learner.target_critic_heads), snapshot(learner.target_critic_encoder)]
    learner.update(batch)
    learner.update(batch)
    assert_same(before[0], learner.target_critic_heads)
    assert_same(before[1], learner.target_critic_encoder)
    metrics = learner.update(batch)
    assert metrics[M.ACTOR_UPDATED] == 1.0
    assert changed(before[0], learner.target_critic_heads)


# ------------------------------------------- prioritized replay: per-sample TD errors
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_update_with_td_errors_returns_each_samples_abs_td_error(mode: str) -> None:
    # No smoothing noise and no augmentation: the update's target is td_target's.
    learner = make_learner(encoder=mode, policy_noise=0.0, policy_delay=1)
    learner.update(random_batch(seed=5))  # targets differ from the online networks
    batch = random_batch(size=12, seed=3)
    target = learner.td_target(batch, smoothing=False)
    with torch.no_grad():
        q1, q2 = learner.critic(
            torch.from_numpy(batch.obs_image),
            torch.from_numpy(batch.obs_vector),
            torch.from_numpy(batch.action),
        )
    expected = np.maximum(np.abs(q1.numpy() - target), np.abs(q2.numpy() - target))

    metrics, td_errors = learner.update_with_td_errors(batch)

    assert isinstance(td_errors, np.ndarray)
    assert td_errors.shape == (12,) and td_errors.dtype == np.float32
    assert np.isfinite(td_errors).all() and (td_errors >= 0).all()
    # Measured before the critic step, on the update's own forward pass.
    np.testing.assert_allclose(td_errors, expected, rtol=1e-5, atol=1e-6)
    assert metrics[M.LEARNER_UPDATES] == 2.0 and M.CRITIC_LOSS in metrics


def test_update_with_td_errors_is_the_same_update(batch: Batch) -> None:
    plain, prioritized = make_learner(policy_delay=1), make_learner(policy_delay=1)
    weighted = Batch(**{**batch.arrays(), "weight": np.linspace(0.2, 1.0, 8, dtype=np.float32)})
    for step in range(2):
        expected = plain.update(weighted)
        metrics, _ = prioritized.update_with_td_errors(weighted)
        assert metrics == expected, step
    for mine, theirs in ((prioritized.critic, plain.critic), (prioritized.actor, plain.actor)):
        assert_same(snapshot(theirs), mine)


def test_update_with_td_errors_never_returns_non_finite_errors(batch: Batch) -> None:
    learner = make_learner(policy_delay=1)
    with torch.no_grad():
        learner.target_critic_heads.q1[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="critic"):
        learner.update_with_td_errors(batch)
    assert learner.updates == 0


# ------------------------------------------------------------- bootstrapping
def _transition(rng: np.random.Generator, terminated: bool, truncated: bool) -> Transition:
    def obs() -> dict[str, np.ndarray]:
        return {
            "image": rng.integers(0, 256, (4, 84, 84), dtype=np.uint8),
            "vector": rng.standard_normal(23).astype(np.float32),
        }

    return Transition(
        obs=obs(),
        action=rng.uniform(-1, 1, 2).astype(np.float32),
        reward=1.5,
        next_obs=obs(),
        terminated=terminated,
        truncated=truncated,
    )


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_terminated_does_not_bootstrap_truncated_does(mode: str) -> None:
    gamma = 0.9
    rng = np.random.default_rng(0)
    learner = make_learner(encoder=mode)
    transitions = [
        _transition(rng, terminated=True, truncated=False),
        _transition(rng, terminated=False, truncated=True),
        _transition(rng, terminated=False, truncated=False),
    ]
    batch = Batch.from_transitions(transitions, gamma)
    np.testing.assert_array_equal(batch.discount, np.float32([0.0, gamma, gamma]))
    target = learner.td_target(batch)

    image = torch.from_numpy(batch.next_obs_image)
    vector = torch.from_numpy(batch.next_obs_vector)
    with torch.no_grad():
        if mode == "separate":
            assert learner.target_actor_encoder is not None
            assert learner.target_critic_encoder is not None
            actor_features = learner.target_actor_encoder(image)
            critic_features = learner.target_critic_encoder(image)
        else:
            actor_features = critic_features = learner.critic.encoder(image)
        next_action = learner.target_actor_head(actor_features, vector)
        q1, q2 = learner.target_critic_heads(critic_features, vector, next_action)
        next_value = torch.minimum(q1, q2).numpy()
    assert np.all(np.abs(next_value) > 1e-4), "bootstrap value too small to tell apart"
    assert target[0] == np.float32(1.5)  # terminated: reward only
    np.testing.assert_allclose(target[1:], 1.5 + gamma * next_value[1:], rtol=1e-6)


def test_discount_never_merges_terminated_and_truncated() -> None:
    rng = np.random.default_rng(1)
    both = _transition(rng, terminated=True, truncated=True)
    batch = Batch.from_transitions([both], gamma=0.99)
    assert batch.discount[0] == 0.0  # terminal wins: the state has no future


# ------------------------------------------------------------------ clipping
def _independent_critic_grad_norm(learner: TD3Learner, batch: Batch) -> float:
    """The critic loss and its gradient norm, recomputed without the learner's update()."""
    twin = copy.deepcopy(learner)
    t = {k: torch.from_numpy(v) for k, v in batch.arrays().items()}
    with torch.no_grad():
        if twin.target_actor_encoder is not None and twin.target_critic_encoder is not None:
            fa = twin.target_actor_encoder(t["next_obs_image"])
            fc = twin.target_critic_encoder(t["next_obs_image"])
        else:
            fa = fc = twin.critic.encoder(t["next_obs_image"])
        a2 = twin.target_actor_head(fa, t["next_obs_vector"])
        tq1, tq2 = twin.target_critic_heads(fc, t["next_obs_vector"], a2)
        y = t["reward"] + t["discount"] * torch.minimum(tq1, tq2)
    q1, q2 = twin.critic(t["obs_image"], t["obs_vector"], t["action"])
    loss = torch.nn.functional.mse_loss(q1, y) + torch.nn.functional.mse_loss(q2, y)
    params = [p for p in twin.critic.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_clipping_bounds_postclip_norm_and_reports_true_preclip_norm(mode: str) -> None:
    max_norm = 1.0
    learner = make_learner(
        encoder=mode,
        policy_delay=1,
        policy_noise=0.0,
        critic_max_grad_norm=max_norm,
        actor_max_grad_norm=1e-4,
    )
    batch = random_batch(seed=3)
    batch = Batch(**{**batch.arrays(), "reward": batch.reward * np.float32(1e6)})
    expected_preclip = _independent_critic_grad_norm(learner, batch)
    assert expected_preclip > 1e3 * max_norm, "gradients not huge; the test shows nothing"

    metrics = learner.update(batch)
    assert metrics[M.CRITIC_GRAD_NORM_PRECLIP] == pytest.approx(expected_preclip, rel=1e-4)
    critic_grads = [p.grad for p in learner.critic.parameters() if p.grad is not None]
    critic_post = float(torch.sqrt(sum((g.double() ** 2).sum() for g in critic_grads)))
    # float32 norms of ~1e6-sized gradients carry ~1e-6 relative rounding.
    assert critic_post <= max_norm * (1 + 1e-5)
    assert metrics[M.CRITIC_GRAD_NORM_POSTCLIP] == pytest.approx(critic_post, rel=1e-5)
    assert metrics[M.CRITIC_GRAD_NORM_POSTCLIP] <= max_norm * (1 + 1e-5)

    actor_grads = [p.grad for p in learner.actor_optimizer.param_groups[0]["params"]]
    if mode == "separate":
        actor_grads += [p.grad for p in learner.actor.encoder.parameters()]
    actor_post = float(torch.sqrt(sum((g.double() ** 2).sum() for g in actor_grads)))
    assert actor_post <= 1e-4 * (1 + 1e-5)
    assert metrics[M.ACTOR_GRAD_NORM_PRECLIP] > 1e-4
    assert metrics[M.ACTOR_GRAD_NORM_POSTCLIP] == pytest.approx(actor_post, rel=1e-5)


def test_clipping_off_reports_equal_pre_and_post_norms(batch: Batch) -> None:
    learner = make_learner(
        policy_delay=1, policy_noise=0.0, critic_max_grad_norm=None, actor_max_grad_norm=None
    )
    expected = _independent_critic_grad_norm(learner, batch)
    metrics = learner.update(batch)
    assert metrics[M.CRITIC_GRAD_NORM_PRECLIP] == pytest.approx(expected, rel=1e-4)
    assert metrics[M.CRITIC_GRAD_NORM_POSTCLIP] == metrics[M.CRITIC_GRAD_NORM_PRECLIP]
    assert metrics[M.ACTOR_GRAD_NORM_POSTCLIP] == metrics[M.ACTOR_GRAD_NORM_PRECLIP]


# --------------------------------------------------------------- checkpoints
def _optimizer_states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, state in sa["state"].items():
        for name, value in state.items():
            other = sb["state"][key][name]
            assert torch.equal(value, other), (key, name)


@pytest.mark.parametrize("mode", ["separate", "shared", "frozen"])
def test_checkpoint_round_trip_is_bit_identical(mode: str, tmp_path: Path) -> None:
    learner = make_learner(encoder=mode, policy_delay=2, random_shift_pad=4)
    for seed in range(3):
        learner.update(random_batch(seed=seed))
    path = learner.save_checkpoint(tmp_path / "ckpt" / "learner.pt")
    restored = TD3Learner.from_checkpoint(path, device="cpu")

    assert restored.updates == learner.updates == 3
    probe = random_batch(seed=10)
    image, vector = torch.from_numpy(probe.obs_image), torch.from_numpy(probe.obs_vector)
    with torch.no_grad():
        assert torch.equal(learner.actor(image, vector), restored.actor(image, vector))
    _optimizer_states_equal(learner.actor_optimizer, restored.actor_optimizer)
    _optimizer_states_equal(learner.critic_optimizer, restored.critic_optimizer)
    # Continuing gives the same update, noise and augmentation included.
    assert learner.update(probe) == restored.update(probe)
    for a, b in zip(learner.critic.parameters(), restored.critic.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(snapshot(learner.target_critic_heads), restored.target_critic_heads)


def test_checkpoint_into_other_architecture_is_refused(tmp_path: Path) -> None:
    path = make_learner(encoder="separate").save_checkpoint(tmp_path / "a.pt")
    other = make_learner(encoder="shared")
    with pytest.raises(CheckpointError, match=r"learner\.encoder"):
        other.load_state_dict(torch.load(path, weights_only=True))


def test_corrupt_checkpoint_raises_typed_error(tmp_path: Path) -> None:
    path = make_learner().save_checkpoint(tmp_path / "a.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        TD3Learner.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        TD3Learner.from_checkpoint(tmp_path / "missing.pt")


def test_failed_save_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    learner = make_learner()
    path = learner.save_checkpoint(tmp_path / "learner.pt")
    good = path.read_bytes()

    def disk_full(obj: object, handle: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    learner.update(random_batch())
    with pytest.raises(OSError, match="No space"):
        learner.save_checkpoint(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["learner.pt"]


# ----------------------------------------------------------------- bad input
BAD_INPUTS = [
    ("obs_image", lambda b: b.obs_image[:, :3], "shape"),
    ("obs_image", lambda b: b.obs_image.astype(np.float32), "dtype"),
    ("next_obs_image", lambda b: b.next_obs_image[..., :80], "shape"),
    ("obs_vector", lambda b: _with_nan(b.obs_vector), "NaN"),
    ("obs_vector", lambda b: b.obs_vector.astype(np.float64), "dtype"),
    ("next_obs_vector", lambda b: b.next_obs_vector[:, :22], "shape"),
    ("action", lambda b: _with_nan(b.action), "NaN"),
    ("action", lambda b: b.action * 3, r"\[-1, 1\]"),
    ("reward", lambda b: _with_nan(b.reward), "NaN"),
    ("reward", lambda b: b.reward[:-1], "batch size"),
    ("discount", lambda b: b.discount + 1, r"\[0, 1\]"),
    ("discount", lambda b: np.full_like(b.discount, np.inf), "NaN or inf"),
    ("weight", lambda b: np.zeros_like(b.reward), "> 0"),
    ("obs_image", lambda b: b.obs_image.tolist(), "numpy array"),
]


def _with_nan(array: np.ndarray) -> np.ndarray:
    out = array.copy()
    out.flat[min(3, out.size - 1)] = np.nan
    return out


@pytest.mark.parametrize(("field", "corrupt", "message"), BAD_INPUTS)
def test_bad_batch_is_rejected_naming_the_field_and_nothing_changes(
    field: str, corrupt: object, message: str, batch: Batch
) -> None:
    learner = make_learner(policy_delay=1)
    learner.update(random_batch(seed=7))
    state_before = copy.deepcopy(learner.state_dict())
    bad = Batch(**{**batch.arrays(), field: corrupt(batch)})  # type: ignore[operator]
    with pytest.raises(SpecError, match=message) as error:
        learner.update(bad)
    assert error.value.field == f"batch.{field}"
    assert f"batch.{field}" in str(error.value)
    after = learner.state_dict()
    assert after["updates"] == state_before["updates"]
    for key in ("actor", "critic", "target_actor_head", "target_critic_heads"):
        for name, value in state_before[key].items():
            assert torch.equal(value, after[key][name]), (key, name)
    _optimizer_states_equal_dicts(state_before["critic_optimizer"], after["critic_optimizer"])


def _optimizer_states_equal_dicts(a: dict, b: dict) -> None:
    for key, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def test_non_finite_loss_stops_before_the_step(batch: Batch) -> None:
    learner = make_learner(policy_delay=1)
    with torch.no_grad():
        learner.target_critic_heads.q1[-1].bias.fill_(float("inf"))
        learner.target_critic_heads.q2[-1].bias.fill_(float("inf"))
    critic_before = snapshot(learner.critic)
    with pytest.raises(NonFiniteLossError, match="critic") as error:
        learner.update(batch)
    assert error.value.network == "critic"
    assert_same(critic_before, learner.critic)
    assert learner.updates == 0


# --------------------------------------------------------------- publishing
@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_policy_weights_load_into_a_worker_policy(mode: str, batch: Batch) -> None:
    learner = make_learner(encoder=mode, policy_delay=1)
    learner.update(batch)
    version, weights = learner.policy_weights()
    assert version == learner.updates == 1
    policy = policy_for(learner.config)
    assert set(weights) == set(policy.state_dict())
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in weights.values())
    load_policy_weights(policy, weights)
    image, vector = torch.from_numpy(batch.obs_image), torch.from_numpy(batch.obs_vector)
    with torch.no_grad():
        assert torch.equal(policy(image, vector), learner.actor(image, vector))
    if mode == "shared":
        critic_encoder = learner.critic.encoder.state_dict()
        for name, value in critic_encoder.items():
            np.testing.assert_array_equal(weights[f"encoder.{name}"], value.numpy())
    # A copy: later updates do not reach what was published.
    frozen = {k: v.copy() for k, v in weights.items()}
    learner.update(batch)
    for name, value in weights.items():
        np.testing.assert_array_equal(value, frozen[name])
