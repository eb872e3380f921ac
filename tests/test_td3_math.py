"""The TD3 formulas of learner/td3_math.py against hand-written arithmetic on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from learner import td3_math


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_smoothed_target_action_clips_the_noise_then_the_action() -> None:
    next_action = torch.tensor([[0.0, 0.9], [-0.95, 0.1]])
    noise = torch.tensor([[10.0, 1.0], [-1.0, 0.5]])  # standard normal draws
    noise_before = noise.clone()
    got = td3_math.smoothed_target_action(next_action, noise, policy_noise=0.2, noise_clip=0.5)
    # σ·n = [[2, .2], [-.2, .1]] -> clipped to ±0.5 -> [[.5, .2], [-.2, .1]]
    expected = torch.tensor([[0.5, 1.0], [-1.0, 0.2]])  # 0.9+0.2 and -0.95-0.2 hit ±1
    torch.testing.assert_close(got, expected)
    assert torch.equal(noise, noise_before)  # inputs untouched


def test_smoothed_noise_never_moves_the_action_by_more_than_noise_clip() -> None:
    generator = torch.Generator().manual_seed(0)
    next_action = torch.zeros(1000, 2)
    noise = torch.randn(1000, 2, generator=generator)
    got = td3_math.smoothed_target_action(next_action, noise, policy_noise=1.0, noise_clip=0.3)
    assert got.abs().max() == pytest.approx(0.3)


def test_td_target_is_reward_plus_discount_times_the_smaller_target_q() -> None:
    reward, discount = t(1.0, -0.5, 2.0), t(0.99, 0.0, 0.9801)
    q1, q2 = t(10.0, 3.0, -4.0), t(12.0, -7.0, -5.0)
    got = td3_math.td_target(reward, discount, q1, q2)
    expected = t(1.0 + 0.99 * 10.0, -0.5 + 0.0, 2.0 + 0.9801 * -5.0)
    torch.testing.assert_close(got, expected)


def test_critic_loss_is_the_mean_of_both_squared_errors() -> None:
    q1, q2, y = t(1.0, 2.0), t(0.0, 4.0), t(1.5, 3.0)
    expected = ((0.5**2 + 1.5**2) + (1.0**2 + 1.0**2)) / 2
    assert td3_math.critic_loss(q1, q2, y).item() == pytest.approx(expected)


def test_critic_loss_with_importance_weights_is_their_weighted_mean() -> None:
    q1, q2, y, w = t(1.0, 2.0), t(0.0, 4.0), t(1.5, 3.0), t(0.25, 1.0)
    expected = (0.25 * (0.5**2 + 1.5**2) + 1.0 * (1.0**2 + 1.0**2)) / 2
    assert td3_math.critic_loss(q1, q2, y, w).item() == pytest.approx(expected)
    ones = torch.ones(2)
    assert torch.equal(td3_math.critic_loss(q1, q2, y, ones), td3_math.critic_loss(q1, q2, y))


def test_critic_loss_is_squared_error_not_huber() -> None:
    # A large error stays quadratic: no Huber (smooth L1) variant in the learner.
    q, y = t(10.0), t(0.0)
    assert td3_math.critic_loss(q, q, y).item() == pytest.approx(200.0)
    mse = torch.nn.functional.mse_loss(q, y) + torch.nn.functional.mse_loss(q, y)
    assert td3_math.critic_loss(q, q, y).item() == pytest.approx(mse.item())


def test_abs_td_error_is_the_larger_absolute_error_of_the_two_critics() -> None:
    q1, q2, y = t(1.0, 5.0, -2.0), t(3.0, 4.0, -2.5), t(2.0, 2.0, -2.0)
    torch.testing.assert_close(td3_math.abs_td_error(q1, q2, y), t(1.0, 3.0, 0.5))


def test_actor_loss_is_minus_mean_q1_plus_the_preactivation_penalty() -> None:
    q = t(1.0, 3.0)
    u = torch.tensor([[2.0, 0.0], [1.0, -1.0]])  # mean(u²) = 6/4
    assert td3_math.actor_loss(q, u, 0.0).item() == pytest.approx(-2.0)
    assert td3_math.actor_loss(q, u, 0.1).item() == pytest.approx(-2.0 + 0.1 * 1.5)


def test_actor_loss_gradient_is_the_deterministic_policy_gradient() -> None:
    # Q1(a) = -(a - 0.5)², a = tanh(u): d(-Q1)/du = 2 (a - 0.5) (1 - a²), penalty off.
    u = torch.tensor([[0.3]], requires_grad=True)
    a = torch.tanh(u)
    td3_math.actor_loss(-(a - 0.5).square().squeeze(1), u, 0.0).backward()
    a0 = torch.tanh(torch.tensor(0.3))
    assert u.grad is not None
    assert u.grad.item() == pytest.approx((2 * (a0 - 0.5) * (1 - a0**2)).item())


def test_polyak_with_tau_one_copies_and_tau_zero_keeps() -> None:
    online = [t(1.0, 2.0), torch.tensor([[3.0], [-4.0]])]
    for tau in (1.0, torch.tensor(1.0)):
        target = [t(7.0, -8.0), torch.tensor([[0.5], [9.0]])]
        td3_math.polyak_update(online, target, tau)
        for got, want in zip(target, online, strict=True):
            assert torch.equal(got, want)
    for tau in (0.0, torch.tensor(0.0)):
        target = [t(7.0, -8.0), torch.tensor([[0.5], [9.0]])]
        kept = [p.clone() for p in target]
        td3_math.polyak_update(online, target, tau)
        for got, want in zip(target, kept, strict=True):
            assert torch.equal(got, want)


def test_polyak_moves_each_target_a_fraction_tau_toward_online() -> None:
    online, start = [t(1.0, 2.0)], t(5.0, -2.0)
    for tau in (0.25, torch.tensor(0.25)):
        target = [start.clone()]
        td3_math.polyak_update(online, target, tau)
        torch.testing.assert_close(target[0], 0.25 * online[0] + 0.75 * start)
    assert torch.equal(online[0], t(1.0, 2.0))  # the online side is read only


def test_polyak_runs_under_no_grad_on_parameters_that_require_grad() -> None:
    online: list[torch.Tensor] = [torch.nn.Parameter(t(1.0, 2.0))]
    target: list[torch.Tensor] = [torch.nn.Parameter(t(0.0, 0.0), requires_grad=False)]
    td3_math.polyak_update(online, target, 0.5)
    assert target[0].grad_fn is None
    torch.testing.assert_close(target[0].detach(), t(0.5, 1.0))
