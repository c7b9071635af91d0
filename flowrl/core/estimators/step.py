"""Step-level estimators: credit per reasoning step (LLM) or per denoising step (flow), mapped to the actions.

Per-step rewards come in ``batch.step_reward`` float [B, S] (NaN: no value at this step); per-step advantages
reach the actions through ``batch.step``. The conventions (present steps, probe values at the start of a step)
are stated in ``flowrl.core.estimators.common``. Those that compare the samples of a group (a group of one
gets a constant 0, or loses its outcome term) are registered with ``min_group_size=2``; ``step_returns`` (no
baseline) and ``igpo`` (its normalisation pools the turns of a group, so one rollout still has a statistic) with 1.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..advantages import register_advantage
from ..batch import TrajectoryBatch, gather_steps
from ..groups import group_advantages, group_step_stats
from .common import (
    discount_steps, f32_zero, last_step, norm_group_pooled, norm_group_step, present_step_values, present_steps,
    require_step_reward, step_token_counts, to_actions,
)

__all__ = ["stepwise_grpo", "turning_point_rewards", "tp_grpo", "step_returns", "dual_level", "igpo", "spae"]


@register_advantage("stepwise_grpo", requires=("step_reward",), min_group_size=2)
def stepwise_grpo(batch: TrajectoryBatch, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Per-step group normalisation (TurningPoint-GRPO's per-timestep trackers; Euphonium's process advantage).

    A_{i,s} = (r_{i,s} - mean_{j in g(i)} r_{j,s}) / (std_{j in g(i)} r_{j,s} + eps), each step s normalised
    within its own (group, step) cell, then mapped to the actions of step s through ``batch.step``.
    NaN step rewards (no reward) are left out of the statistics and give 0; cells of one sample or of
    equal rewards give 0. ``scale="none"`` skips the division.

    batch.step_reward: float [B, S]; batch.step: long [B, T]. Returns float [B, T].
    """
    if scale not in ("group", "none"):
        raise ValueError(f"stepwise_grpo: scale={scale!r}; valid values are ('group', 'none')")
    r = batch.step_reward
    valid = batch.valid[:, None] & ~torch.isnan(r)
    count, mean, std, constant = group_step_stats(r, batch.group, valid=valid)
    a = r.to(torch.float32) - mean
    if scale == "group":
        a = a / (std + eps)
    a = torch.where(valid & ~constant, a, torch.zeros((), device=a.device))
    return gather_steps(a, batch.step, batch.mask)


# ----------------------------------------------------------------------------- TurningPoint-GRPO
def turning_point_rewards(
    R: Tensor, *, eta: float = 1.0, balance: bool = False, valid: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """TurningPoint-GRPO step rewards (arXiv 2602.06422): incremental rewards plus turning-point bonuses.

    R: float [B, n + 1]. R[:, 0] is the reward of the ODE completion from the initial noise (before the
    first SDE step), R[:, t] that of the ODE completion after step t, R[:, n] the final reward.
    d_t = R_{t+1} - R_t (t = 0..n-1), the incremental reward of step t;
    s_t = sign(d_t) * sign(R_n - R_0), whether step t moves with the trajectory's overall trend.
    Step 0 is a turning point when sign(d_0) * sign(R_n - R_1) > 0; step t >= 1 when
    s_{t-1} < 0 and s_t > 0 and sign(d_t) * sign(R_n - R_{t+1}) > 0 (a flip back to the trend that the
    rest of the trajectory keeps). A turning step's reward is eta * (R_n - R_t) (the aggregated
    long-term reward); every other step's is d_t.
    ``balance=True`` keeps equal numbers of positive and negative turning-point bonuses in the batch, as the
    reference's ``use_balanced_bonus`` (its published script sets it; reference:
    YunzeTong/TurningPoint-GRPO/scripts/my_train_sd3_fast_with_op3.py): with P positive and N negative bonuses
    and both P, N > 0, k = min(P, N) of each sign stay turning points, chosen by the largest |R_n - R_0| of their
    trajectory (the reference ranks by its ``delta_global``, not by the bonus itself; ties: lower flat index
    first), and the others fall back to d_t. When every bonus has one sign (P = 0 or N = 0) all are kept, as
    there. Scope: the reference balances each sampling batch of one GPU (``sample.train_batch_size`` images);
    here the rows of ``R`` (a rank's iteration batch in training).
    ``valid`` bool [B] (default all): invalid rows get no turning point and are not counted.

    Returns ``(step_rewards float [B, n], turning bool [B, n])`` (after balancing).
    """
    if R.dim() != 2 or R.shape[1] < 2:
        raise ValueError(f"turning_point_rewards: R has shape {tuple(R.shape)}; expected float [B, n + 1] with n >= 1")
    B = R.shape[0]
    if valid is None:
        valid = torch.ones(B, dtype=torch.bool, device=R.device)
    elif tuple(valid.shape) != (B,):
        raise ValueError(f"turning_point_rewards: valid has shape {tuple(valid.shape)}; expected bool [B] = ({B},)")
    R = torch.where(valid[:, None], R.to(torch.float32), f32_zero(R.device))
    if not bool(torch.isfinite(R).all()):
        raise ValueError("turning_point_rewards: R contains NaN or inf on valid rows; every ODE-completion reward is needed")
    d = R[:, 1:] - R[:, :-1]
    Rn = R[:, -1:]
    sd = torch.sign(d)
    s = sd * torch.sign(Rn - R[:, :1])
    keeps = sd * torch.sign(Rn - R[:, 1:]) > 0  # the rest of the trajectory keeps the direction of step t
    flip = torch.ones_like(keeps)
    flip[:, 1:] = (s[:, :-1] < 0) & (s[:, 1:] > 0)
    turning = keeps & flip & valid[:, None]
    bonus = eta * (Rn - R[:, :-1])
    if balance:
        pos = turning & (bonus > 0)
        neg = turning & (bonus < 0)
        n_pos, n_neg = pos.sum(), neg.sum()
        # one sign absent: the reference keeps every turning point (no host sync: k = all of them then)
        k = torch.where((n_pos > 0) & (n_neg > 0), torch.minimum(n_pos, n_neg), torch.maximum(n_pos, n_neg))
        mag = (Rn - R[:, :1]).abs().expand_as(bonus)  # |R_n - R_0|: the reference's ranking key
        turning = _top_k_flat(mag, pos, k) | _top_k_flat(mag, neg, k)
    return torch.where(turning, bonus, d), turning


def _top_k_flat(mag: Tensor, sel: Tensor, k: Tensor) -> Tensor:
    """bool mask of the ``k`` (0-dim tensor) selected entries with the largest ``mag``; stable ties."""
    flat = torch.where(sel, mag, torch.full_like(mag, -1.0)).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return sel & (rank.view(mag.shape) < k)


@register_advantage("tp_grpo", requires=("step_reward",), min_group_size=2)
def tp_grpo(batch: TrajectoryBatch, *, eta: float = 1.0, balance: bool = False, eps: float = 1e-4) -> Tensor:
    """TurningPoint-GRPO (arXiv 2602.06422): turning-point step rewards, normalised per (group, step).

    Design: the ODE-completion rewards travel in the batch, not in a parameter.
    ``batch.step_reward[:, t]`` holds R_t, the reward of the ODE completion from the state at the
    **start** of step t (t = 0..S-1; R_0 is the plain ODE run), and ``batch.outcome`` holds R_S, the
    final reward, so R = [step_reward | outcome] is float [B, S + 1] and n = S. (A flow rollout has
    T == S and step[b, t] == t.) Then r = ``turning_point_rewards(R, eta=eta, balance=balance)`` [B, S] and
    A_{i,s} = (r_{i,s} - mean_{j in g(i)} r_{j,s}) / (std_{j in g(i)} r_{j,s} + eps), exactly as
    ``stepwise_grpo`` (unbiased std; cells of one sample or equal rewards give 0), mapped to actions.
    Every valid sample needs all S probe rewards (NaN there is an error).

    Returns float [B, T].
    """
    sr = require_step_reward(batch, "tp_grpo")
    R = torch.cat([sr, batch.outcome.to(torch.float32)[:, None]], dim=1)
    bad = batch.valid[:, None] & ~torch.isfinite(R)
    if bool(bad.any()):
        raise ValueError("tp_grpo: batch.step_reward / batch.outcome hold NaN or inf on valid samples; "
                         "step_reward[:, t] must be the ODE-completion reward before step t for every t")
    r, _ = turning_point_rewards(R, eta=eta, balance=balance, valid=batch.valid)
    ok = batch.valid[:, None].expand_as(r)
    a = norm_group_step(r, batch.group, ok, eps)
    return to_actions(a, batch)


# ----------------------------------------------------------------------------- step returns (MatchTIR / ProRAG)
@register_advantage("step_returns", requires=("step_reward",))
def step_returns(batch: TrajectoryBatch, *, gamma: float = 1.0, outcome_coef: float = 0.0) -> Tensor:
    """Discounted return-to-go over steps (the step-level REINFORCE return; PRIME/IGPO/MatchTIR's building block).

    r_{i,k} = step_reward[i, k] (NaN counts as 0) + outcome_coef * outcome_i * 1[k = L_i];
    G_{i,k} = sum_{k' = k}^{L_i} gamma^{k' - k} r_{i,k'}, broadcast to every action of step k.
    No baseline, no normalisation (compose with a shaper or use ``dual_level`` for that), so no group is needed
    (``min_group_size`` 1).

    batch.step_reward: float [B, S]; batch.step: long [B, T]. Returns float [B, T].
    """
    sr = require_step_reward(batch, "step_returns")
    S = sr.shape[1]
    present = present_steps(batch, S)
    r = torch.nan_to_num(sr, nan=0.0)
    if outcome_coef != 0.0:
        last = last_step(batch).clamp_min(0)
        at_last = torch.arange(S, device=batch.device)[None, :] == last[:, None]
        out = torch.where(batch.valid, batch.outcome.to(torch.float32), f32_zero(batch.device))
        r = r + outcome_coef * torch.where(at_last, out[:, None], f32_zero(batch.device))
    G = discount_steps(r, present, gamma)
    return to_actions(G, batch)


@register_advantage("dual_level", requires=("step_reward",), min_group_size=2)
def dual_level(
    batch: TrajectoryBatch, *, mode: str = "per_step", beta: Optional[float] = None,
    outcome_coef: Optional[float] = None, gamma: float = 0.9, eps: float = 1e-4,
) -> Tensor:
    """Dual-level advantage A = outcome_coef * A_outcome + beta * A_step (MatchTIR 2601.10712; ProRAG 2601.21912).

    A_outcome_i = (r_i - mean_{g(i)} r) / (std_{g(i)} r + eps) from ``batch.outcome`` (MatchTIR's
    trajectory level uses the summed turn reward: put that sum in ``outcome``).
    mode "per_step" (MatchTIR): turn returns G_{i,k} = r_{i,k} + gamma * G_{i,k+1} over present steps
    (NaN step reward = 0), z-normalised across the rollouts of the group **at the same step index k**;
    defaults outcome_coef = beta = 0.5 (MatchTIR's (A_traj + A_turn) / 2), gamma = 0.9.
    mode "group_tokens" (ProRAG): s_k = step_reward[k] on every valid action of step k; z-normalised
    with the mean and unbiased variance over **all valid actions of all rollouts of the group**
    (token-weighted; actions of steps with a NaN reward are left out and get only A_outcome);
    ``gamma`` is not used; defaults outcome_coef = 1, beta = 0.5 (ProRAG's argparse default; its script uses 0.3).
    Cells / groups of one entry or of equal values give 0 for the step part.

    batch.step_reward: float [B, S]; batch.outcome: float [B]. Returns float [B, T].
    """
    if mode not in ("per_step", "group_tokens"):
        raise ValueError(f"dual_level: mode={mode!r}; valid values are ('per_step', 'group_tokens')")
    sr = require_step_reward(batch, "dual_level")
    S = sr.shape[1]
    if outcome_coef is None:
        outcome_coef = 0.5 if mode == "per_step" else 1.0
    if beta is None:
        beta = 0.5
    a_o = group_advantages(batch.outcome, batch.group, baseline="mean", scale="group", eps=eps, valid=batch.valid)
    present = present_steps(batch, S)
    if mode == "per_step":
        G = discount_steps(torch.nan_to_num(sr, nan=0.0), present, gamma)
        a_s = norm_group_step(G, batch.group, present, eps)
    else:
        ok = present & ~torch.isnan(sr)
        counts = step_token_counts(batch.step, batch.mask, S)
        a_s = norm_group_pooled(torch.nan_to_num(sr, nan=0.0), batch.group, ok & (counts > 0), eps, weight=counts)
    per_step = torch.where(present, outcome_coef * a_o[:, None] + beta * a_s, f32_zero(batch.device))
    return to_actions(per_step, batch)


# ----------------------------------------------------------------------------- IGPO
@register_advantage("igpo", requires=("step_reward",))
def igpo(batch: TrajectoryBatch, *, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """IGPO (arXiv 2510.14967): turn-level information-gain rewards, group-normalised, discounted.

    ``batch.step_reward[i, k]`` = p_{i,k}, the teacher-forced (geometric-mean) probability of the
    ground-truth answer given the trajectory up to the **start** of turn k (k = 0: the prompt alone).
    r_{i,k} = p_{i,k+1} - p_{i,k} for k < L_i (the information gain of turn k); r_{i,L_i} = outcome_i
    (the answer turn's F1 / correctness). r~ = (r - mean_g) / (std_g + eps) over **all present turns of all
    rollouts of the group** (pooled); A_{i,k} = sum_{k' >= k} gamma^{k'-k} r~_{i,k'}, on every action of turn k.
    gamma = 1 by default (IGPO's released discounted variant uses 0.5: pass gamma=0.5 to match it).
    The normalisation pools turns, not rollouts: a group of one still compares its outcome turn with its
    information gains, so the outcome reaches the policy (``min_group_size`` 1).
    p must be finite on turns 0..L_i of every valid sample.

    Returns float [B, T].
    """
    p, last, present = present_step_values(batch, "igpo", "batch.step_reward (p_k)")
    S = p.shape[1]
    k = torch.arange(S, device=batch.device)[None, :]
    nxt = torch.cat([p[:, 1:], torch.zeros_like(p[:, :1])], dim=1)
    out = torch.where(batch.valid, batch.outcome.to(torch.float32), f32_zero(batch.device))[:, None]
    r = torch.where(k == last[:, None], out.expand_as(p), nxt - p)
    r = torch.where(present, r, f32_zero(batch.device))
    z = norm_group_pooled(r, batch.group, present, eps)
    A = discount_steps(z, present, gamma)
    return to_actions(A, batch)


# ----------------------------------------------------------------------------- SPAE
@register_advantage("spae", requires=("step_reward",), min_group_size=2)
def spae(
    batch: TrajectoryBatch, *, xi: float = 0.5, sat_threshold: float = 0.9, sat_penalty: float = 0.2,
    eps: float = 1e-4,
) -> Tensor:
    """SPAE, Step Potential Advantage Estimation (arXiv 2601.03823).

    ``batch.step_reward[i, k]`` = Phi_{i,k}, the step potential of the prefix at the **start** of step k
    (Phi = 1.5 * Acc * Conf + 0.5 * Acc - Conf from the probe, in [-1, 1]; computed by a rollout hook).
    A_i = GRPO outcome advantage (eps); Delta_k = Phi_{k+1} - Phi_k for k < L_i and 0 for the last step
    (its effect is the outcome itself); saturated_k = 1[max_{k' <= k} Phi_{k'} > sat_threshold] (the
    answer was already reached before step k: over-checking);
    A_{i,k} = A_i + xi * Delta_{i,k} - sat_penalty * saturated_{i,k}.
    This library's reading of the paper (the combination and xi are not checked against its code): additive
    potential-difference shaping and an additive saturation penalty, defaults xi = 0.5, sat_penalty = 0.2,
    threshold 0.9 (a probe that already finds the answer). The outcome term is GRPO's group comparison
    (``min_group_size`` 2). Phi must be finite on present steps.

    Returns float [B, T].
    """
    phi, last, present = present_step_values(batch, "spae", "batch.step_reward (Phi_k)")
    S = phi.shape[1]
    zero = f32_zero(batch.device)
    phi0 = torch.where(present, phi, zero)
    k = torch.arange(S, device=batch.device)[None, :]
    nxt = torch.cat([phi0[:, 1:], torch.zeros_like(phi0[:, :1])], dim=1)
    delta = torch.where(present & (k < last[:, None]), nxt - phi0, zero)
    high = torch.where(present, phi0, torch.full_like(phi0, -float("inf"))).cummax(dim=1).values
    sat = present & (high > sat_threshold)
    a = group_advantages(batch.outcome, batch.group, baseline="mean", scale="group", eps=eps, valid=batch.valid)
    step_a = torch.where(present, a[:, None] + xi * delta - sat_penalty * sat.to(torch.float32), zero)
    return to_actions(step_a, batch)
