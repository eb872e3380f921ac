"""The TD3 update math on one page: small pure torch functions, no state.

Fujimoto, van Hoof, Meger 2018, "Addressing Function Approximation Error in
Actor-Critic Methods" (ICML; arXiv:1802.09477), Algorithm 1. One update of
:meth:`learner.td3.TD3Learner.update_deferred` is, in this order::

    ã  = smoothed_target_action(μ'(s'), ε, σ, c)       # if σ > 0
    y  = td_target(r, discount, Q1'(s', ã), Q2'(s', ã))
    L_Q = critic_loss(Q1(s, a), Q2(s, a), y, w)        # critic step
    δ  = abs_td_error(Q1(s, a), Q2(s, a), y)           # PER priorities
    every policy_delay-th update:
    L_μ = actor_loss(Q1(s, tanh(u)), u, λ)             # actor step, u = μ's pre-tanh output
    polyak_update(θ, θ', τ)                            # all targets

Everything around these calls (encoders, bf16 autocast, ``torch.compile``,
gradient clipping, the NaN/inf guard, metrics, optimizers, checkpoints) lives
in :class:`learner.td3.TD3Learner`. The inputs here are float32 (the learner
casts the autocast outputs with ``.float()`` before calling), and nothing here
runs under autocast. Each option of the update is an argument. Where this
departs from the paper, and why, is listed in ``learner/README.md``.

The paper's equation numbers are not quoted here; each function cites the
line of Algorithm 1 it computes and the section that motivates it.
"""

from __future__ import annotations

import torch


def smoothed_target_action(
    next_action: torch.Tensor, noise: torch.Tensor, policy_noise: float, noise_clip: float
) -> torch.Tensor:
    """Target policy smoothing: ``ã = clip(μ'(s') + clip(σ·n, −c, c), −1, 1)``.

    Algorithm 1, "ã ← π_φ'(s') + ε, ε ~ clip(N(0, σ̃), −c, c)" (§5.3, "Target
    Policy Smoothing Regularization"); the final clip to the action bounds
    [−1, 1] is the authors' code's.

    Args:
        next_action: the target actor's action ``μ'(s')``, ``float32[B, A]`` in [−1, 1].
        noise: standard normal draws ``n ~ N(0, 1)``, same shape (the caller
            owns the generator, so the random stream stays the learner's).
        policy_noise: ``σ``, the noise's standard deviation (action units).
        noise_clip: ``c``, the bound on the scaled noise.

    Returns:
        ``float32[B, A]`` in [−1, 1]; the inputs are not modified.
    """
    noise = (noise * policy_noise).clamp_(-noise_clip, noise_clip)
    return (next_action + noise).clamp_(-1.0, 1.0)


def td_target(
    reward: torch.Tensor,
    discount: torch.Tensor,
    target_q1: torch.Tensor,
    target_q2: torch.Tensor,
) -> torch.Tensor:
    """Clipped double-Q target ``y = r + discount · min(Q1'(s', ã), Q2'(s', ã))``.

    Algorithm 1, "y ← r + γ min_{i=1,2} Q_θ'_i(s', ã)" (§4.2, "Clipped Double
    Q-Learning for Actor-Critic"). ``γ`` is the batch's per-sample
    ``discount``: ``γ^k`` after a ``k``-step return, 0 after ``terminated``
    (so no ``(1 − done)`` factor; ``learner/README.md``, departure 2).

    Args:
        reward: ``float32[B]``, the (n-step) return.
        discount: ``float32[B]`` in [0, 1].
        target_q1, target_q2: the target critics at ``(s', ã)``, ``float32[B]``.

    Returns:
        ``float32[B]``.
    """
    return reward + discount * torch.minimum(target_q1, target_q2)


def critic_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Both critics' squared TD errors, summed, averaged over the batch:
    ``mean_i w_i · ((Q1(s_i, a_i) − y_i)² + (Q2(s_i, a_i) − y_i)²)``.

    Algorithm 1, "θ_i ← argmin_θ_i N⁻¹ Σ (y − Q_θ_i(s, a))²", for both heads
    in one loss (the authors' code sums the two MSEs). Squared error only, no
    Huber variant.

    Args:
        q1, q2: the online critics at ``(s, a)``, ``float32[B]``.
        target: ``y`` from :func:`td_target`, ``float32[B]``, no gradient.
        weight: prioritized replay's importance weights ``w_i``, ``float32[B]``
            (Schaul et al. 2016, "Prioritized Experience Replay", §3.4);
            ``None`` for uniform replay (every ``w_i = 1``, no multiply).

    Returns:
        The scalar loss, float32.
    """
    squared_errors = (q1 - target).square() + (q2 - target).square()
    return (squared_errors if weight is None else weight * squared_errors).mean()


def abs_td_error(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's priority error ``δ_i = max(|Q1(s_i, a_i) − y_i|, |Q2(s_i, a_i) − y_i|)``.

    Not in the TD3 paper: the larger of the two critics' errors is the
    priority of the PER+TD3 baseline of Fujimoto, Meger, Precup 2020 ("An
    Equivalence between Loss Functions and Non-Uniform Sampling in Experience
    Replay", ``PER_TD3.py``). Same inputs as :func:`critic_loss`.

    Returns:
        ``float32[B]``, non-negative. The caller computes it under ``no_grad``.
    """
    return torch.maximum((q1 - target).abs(), (q2 - target).abs())


def actor_loss(
    q1_of_policy: torch.Tensor,
    preactivation: torch.Tensor,
    preactivation_penalty: float,
) -> torch.Tensor:
    """``−mean Q1(s, μ(s)) + λ · mean(u²)``, ``μ(s) = tanh(u)``.

    Algorithm 1, "Update φ by the deterministic policy gradient
    ∇_φ J(φ) = N⁻¹ Σ ∇_a Q_θ1(s, a)|_{a=π_φ(s)} ∇_φ π_φ(s)" (§3, "Background",
    after Silver et al. 2014): minimising ``−mean Q1`` by gradient descent is
    that gradient. The pre-tanh penalty ``λ · mean(u²)`` is ours
    (``learner/README.md``, departure 12); ``λ = 0`` is the paper's loss.

    Args:
        q1_of_policy: ``Q1`` at ``(s, tanh(u))``, ``float32[B]``.
        preactivation: ``u``, the actor's output before its tanh, ``float32[B, A]``.
        preactivation_penalty: ``λ ≥ 0``; 0 adds nothing (no term in the graph).

    Returns:
        The scalar loss, float32 (the penalty included).
    """
    loss = -q1_of_policy.mean()
    if preactivation_penalty:
        loss = loss + preactivation_penalty * (preactivation.square().mean())
    return loss


@torch.no_grad()
def polyak_update(
    online_params: list[torch.Tensor],
    target_params: list[torch.Tensor],
    tau: float | torch.Tensor,
) -> None:
    """Soft target update ``θ' ← τ θ + (1 − τ) θ'``, computed as ``θ' + τ (θ − θ')``,
    in place on ``target_params``.

    Algorithm 1, "θ'_i ← τ θ_i + (1 − τ) θ'_i, φ' ← τ φ + (1 − τ) φ'" (§5.2,
    "Target Networks and Delayed Policy Updates").

    Args:
        online_params: ``θ``, the online networks' parameters.
        target_params: ``θ'``, in the same order and shapes; updated in place.
        tau: ``τ`` in [0, 1]. A float takes one fused ``lerp``; a 0-dim
            device tensor (the learner's device-side NaN/inf guard, which sets
            it to 0 without a host sync) takes ``sub``, ``mul``, ``add``.
    """
    if isinstance(tau, torch.Tensor):
        steps = torch._foreach_sub(online_params, target_params)
        torch._foreach_mul_(steps, tau)
        torch._foreach_add_(target_params, steps)
    else:
        torch._foreach_lerp_(target_params, online_params, tau)
