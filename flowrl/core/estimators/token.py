"""Token-level estimators: a reward on each action, a return over the actions after it, a baseline.

REINFORCE++ (returns whitened over the batch), GAE (a critic), PRIME (implicit process rewards, RLOO per reward
source) and EMPG (entropy-modulated step credit). Each reads as its formula; the scans over T and PRIME's
closed form run in ``flowrl.core.kernels`` (fused C kernels on CPU, matrix products elsewhere).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..advantages import register_advantage
from ..batch import TrajectoryBatch, broadcast_to_actions, last_action_index, outcome_at_end
from ..groups import group_advantages, group_index, masked_whiten, segment_stats, whiten_rows, whiten_zeroed_
from ..kernels.prime import prime_token_advantages
from ..kernels.rows import step_sums
from ..kernels.scan import gae_advantages, reinforce_pp_returns
from ..masks import and_rows, any_valid, row_counts
from .common import discounted_returns, f32_zero, to_actions

__all__ = ["reinforce_pp", "gae", "gae_advantages_and_returns", "prime", "implicit_prm_loss", "empg"]


@register_advantage("reinforce_pp")
def reinforce_pp(batch: TrajectoryBatch, *, kl_coef: float = 0.0, gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ (Hu, 2025).

    r_t = 1[t = last action] * r - kl_coef * (log pi_old - log pi_ref)_t;  G_t = sum_{s >= t} gamma^{s-t} r_s;
    A_t = (G_t - mu_B) / sqrt(var_B + eps), whitened over every valid action of the (global) batch; no critic,
    no group baseline (``min_group_size`` 1). Masked actions neither earn nor discount. ``kl_coef > 0`` needs
    ``batch.ref_logp``.

    Returns float [B, T].
    """
    if kl_coef != 0.0 and batch.ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs batch.ref_logp (reference log-probs), which is not set")
    if kl_coef == 0.0 and gamma == 1.0:
        # outcome only: G_t = r on every valid action up to the last one, so the return is row-constant and
        # its whitening over actions is exact in [B] (token-weighted), with one broadcast at the end
        r = torch.where(batch.valid, batch.outcome.to(torch.float32), 0.0)
        return broadcast_to_actions(whiten_rows(r, row_counts(batch.mask), eps=eps), batch.mask)
    # G over the valid actions (0 off the mask); the native scan also returns the rows' sums for the whitening
    returns, sums = reinforce_pp_returns(batch.mask, batch.outcome, batch.old_logp, batch.ref_logp,
                                         kl_coef=kl_coef, gamma=gamma)
    return whiten_zeroed_(returns, batch.mask, eps=eps, row_sums=sums)


@register_advantage("gae", requires=("value",))
def gae(
    batch: TrajectoryBatch, *, gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.0, whiten: bool = True
) -> Tensor:
    """Generalised Advantage Estimation (Schulman et al., 2016), for PPO with a critic.

    r_t = 1[t = last action] * r - kl_coef * (log pi_old - log pi_ref)_t;
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last action is 0);  A_t = delta_t + gamma * lam * A_{t+1}.
    Masked actions are skipped: V_{t+1} and A_{t+1} are those of the next *valid* action. The recurrence runs
    as one scan (``kernels.scan.gae_advantages``). ``whiten`` normalises over the batch's valid actions.
    Returns float [B, T]; ``gae_advantages_and_returns`` also gives the critic targets A + V.
    """
    adv, sums = _gae(batch, gamma=gamma, lam=lam, kl_coef=kl_coef, row_sums=whiten)
    return whiten_zeroed_(adv, batch.mask, row_sums=sums) if whiten else adv


def gae_advantages_and_returns(
    batch: TrajectoryBatch, *, gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Un-whitened GAE advantages and returns (A + V), each float [B, T], 0 off the mask."""
    adv = _gae(batch, gamma=gamma, lam=lam, kl_coef=kl_coef)[0]
    values = batch.value.to(torch.float32)
    return adv, torch.where(batch.mask, adv + values, torch.zeros((), device=adv.device))


def _gae(batch: TrajectoryBatch, *, gamma: float, lam: float, kl_coef: float, row_sums: bool = False):
    if batch.value is None:
        raise ValueError("GAE needs batch.value (critic values), which is not set")
    if kl_coef != 0.0 and batch.ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs batch.ref_logp (reference log-probs), which is not set")
    return gae_advantages(batch.mask, batch.outcome, batch.value, batch.old_logp, batch.ref_logp, gamma=gamma,
                          lam=lam, kl_coef=kl_coef, row_sums=row_sums)


# ----------------------------------------------------------------------------- PRIME
def rloo_dense(r: Tensor, pos: Tensor, group: Tensor, valid: Tensor) -> Tensor:
    """PRIME's RLOO on a dense reward r [B, T] placed at positions ``pos`` bool [B, T].

    m_i = mean of r_i over its positions; K = valid members of i's group;
    r'_t = r_t * K / (K - 1) - sum_{j in g(i)} m_j / (K - 1) at the positions (0 elsewhere; 0 when K = 1).
    (For a single position this is r_i - mean of the others: the RLOO baseline.)
    """
    zero = f32_zero(r.device)
    n = row_counts(pos).to(torch.float32)
    m = torch.where(pos, r, zero).sum(dim=1) / n.clamp_min(1)
    inv, G = group_index(group)
    st = segment_stats(m, inv, G, valid & (n > 0))
    K = st.count[inv]
    Kc = (K - 1).clamp_min(1)
    out = r * (K / Kc)[:, None] - (st.sum[inv] / Kc)[:, None]
    return torch.where(and_rows(pos, (K > 1) & valid), out, zero)


@register_advantage("prime", requires=("ref_logp",), min_group_size=2)
def prime(
    batch: TrajectoryBatch, *, prm_logp: Optional[Tensor] = None, beta: float = 0.05, rm_coef: float = 5.0,
    outcome_coef: float = 5.0, granularity: str = "token", gamma: float = 1.0, batch_norm: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """PRIME (Cui et al., arXiv 2502.01456): implicit process rewards + outcome, RLOO per source, whitened.

    Implicit PRM token score q_t = beta * (log pi_phi(y_t) - log pi_ref(y_t)) on valid actions.
    granularity "token": the reward is q_t on every valid action; "step": the sum of q over a step,
    on the step's last valid action; "whole": the sum over the trajectory, on its last valid action.
    ``batch_norm``: the process rewards are divided by max over the batch of |reverse cumsum| (prime_norm).
    Each source (process, times ``rm_coef``, PRIME's reward_dpo_coef; outcome on the last valid action, times
    ``outcome_coef``, PRIME's reward_gt_coef; both 5 in PRIME, so the two sources weigh the same) goes through PRIME's
    RLOO (``rloo_dense``: r_t * K/(K-1) - sum_j m_j/(K-1), m_j the mean of sample j's reward over its
    reward positions), then a discounted reverse cumsum with ``gamma``; the two returns are summed and
    A = masked_whiten(returns) over the batch's valid actions (the form of PRIME's released code). RLOO needs a
    group of two or more (``min_group_size`` 2).

    ``prm_logp`` float [B, T]: the implicit PRM's log-probs of the sampled actions (pi_phi). When None the
    behaviour log-probs ``batch.old_logp`` are used: the policy itself is the PRM (PRIME initialises the
    PRM from the SFT model, the policy's starting point). batch.ref_logp is pi_ref. Returns float [B, T].
    """
    if granularity not in ("token", "step", "whole"):
        raise ValueError(f"prime: granularity={granularity!r}; valid values are ('token', 'step', 'whole')")
    mask = batch.mask
    lp = batch.old_logp if prm_logp is None else prm_logp
    if tuple(lp.shape) != tuple(mask.shape):
        raise ValueError(f"prime: prm_logp has shape {tuple(lp.shape)}; expected [B, T] = {tuple(mask.shape)}")
    if granularity == "token" and gamma == 1.0:  # the same numbers in closed form, in fewer passes
        return prime_token_advantages(batch, lp, beta, rm_coef, outcome_coef, batch_norm, eps)
    zero = f32_zero(batch.device)
    q = torch.where(mask, beta * (lp.to(torch.float32) - batch.ref_logp.to(torch.float32)), zero)
    if granularity == "token":
        rm, pos = q, mask
    elif granularity == "whole":
        rm = outcome_at_end(q.sum(dim=1), mask)
        pos = torch.zeros_like(mask).scatter_(1, last_action_index(mask)[:, None], mask.any(dim=1, keepdim=True))
    else:
        S = max(batch.num_steps, 1)
        idx = batch.step.long().clamp(0, S - 1)
        per_step = torch.zeros(mask.shape[0], S, device=batch.device).scatter_add_(1, idx, q)
        t = torch.arange(mask.shape[1], device=batch.device).expand_as(idx)
        last_t = torch.full((mask.shape[0], S), -1, dtype=torch.long, device=batch.device)
        last_t = last_t.scatter_reduce_(1, idx, torch.where(mask, t, torch.full_like(t, -1)), "amax")
        pos = mask & (torch.gather(last_t, 1, idx) == t)
        rm = torch.where(pos, torch.gather(per_step, 1, idx), zero)
    if batch_norm:
        rc = rm.flip(1).cumsum(1).flip(1).abs()
        denom = torch.where(mask, rc, zero).amax()
        rm = rm / torch.where(denom > 0, denom, torch.ones_like(denom))
    valid = batch.valid
    rm = rloo_dense(rm_coef * rm, pos, batch.group, valid)
    last_pos = torch.zeros_like(mask).scatter_(1, last_action_index(mask)[:, None], mask.any(dim=1, keepdim=True))
    out = outcome_coef * torch.where(valid, batch.outcome.to(torch.float32), zero)
    ver = rloo_dense(outcome_at_end(out, mask), last_pos,
                      batch.group, valid)
    returns = discounted_returns(rm, mask, gamma) + discounted_returns(ver, mask, gamma)
    return masked_whiten(returns, and_rows(mask, valid), eps=eps)


def implicit_prm_loss(
    prm_logp: Tensor, ref_logp: Tensor, mask: Tensor, labels: Tensor, *, beta: float = 0.05
) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy that trains PRIME's implicit PRM online from outcome labels (Yuan et al. 2412.01981; PRIME).

    z_i = beta * sum_t mask_{i,t} (log pi_phi - log pi_ref)_{i,t} (the implicit outcome reward);
    loss = mean_i BCE(sigmoid(z_i), l_i) = mean_i -[l_i log sigmoid(z_i) + (1 - l_i) log(1 - sigmoid(z_i))],
    over the trajectories with at least one valid action. ``labels`` float/bool [B] in [0, 1] (1 = correct).
    prm_logp (differentiable), ref_logp: float [B, T]; mask: bool [B, T]. Returns (loss 0-dim, metrics)
    with prm/loss and prm/acc (share of trajectories whose sign of z matches the label).
    """
    if mask.dim() != 2 or tuple(prm_logp.shape) != tuple(mask.shape) or tuple(ref_logp.shape) != tuple(mask.shape):
        raise ValueError(f"implicit_prm_loss: prm_logp {tuple(prm_logp.shape)}, ref_logp {tuple(ref_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must all be [B, T]")
    if tuple(labels.shape) != (mask.shape[0],):
        raise ValueError(f"implicit_prm_loss: labels has shape {tuple(labels.shape)}; expected [B] = ({mask.shape[0]},)")
    lab = labels.to(torch.float32)
    if bool(((lab < 0) | (lab > 1)).any()):
        raise ValueError("implicit_prm_loss: labels must lie in [0, 1]")
    zero = f32_zero(mask.device)
    z = beta * torch.where(mask, prm_logp.float() - ref_logp.detach().float(), zero).sum(dim=1)
    has = any_valid(mask)
    per = torch.nn.functional.binary_cross_entropy_with_logits(z, lab, reduction="none")
    n = has.to(torch.float32).sum().clamp_min(1)
    loss = torch.where(has, per, zero).sum() / n
    acc = torch.where(has, ((z > 0) == (lab > 0.5)).to(torch.float32), zero).sum() / n
    return loss, {"prm/loss": loss.detach(), "prm/acc": acc.detach()}


# ----------------------------------------------------------------------------- EMPG
@register_advantage("empg", requires=("entropy",), min_group_size=2)
def empg(
    batch: TrajectoryBatch, *, k: float = 1.0, k_f: float = 1.0, zeta: float = 0.1, whiten: bool = True,
    eps: float = 1e-4,
) -> Tensor:
    """EMPG, Entropy-Modulated Policy Gradients (arXiv 2509.09265).

    H_{i,k} = mean entropy of the valid actions of step k (``batch.entropy`` [B, T]); steps with no valid
    action take no part. H~ = (H - min H) / (max H - min H + 1e-8) over every such step of the batch
    (local batch); g = exp(-k H~) / mean(exp(-k H~)) (self-calibrating, batch mean 1);
    f = exp(-k_f H~) (future clarity). A_{i,k} = g_{i,k} * A_i + zeta * f_{i,k+1}, where A_i is the GRPO
    outcome advantage and f_{i,k+1} is 0 when step k has no next step with actions. ``whiten``: a final
    masked whitening over the batch's valid actions (the paper's final batch normalisation; on by default).
    Defaults k = k_f = 1, zeta = 0.1 (the paper's project-page pseudocode). The outcome signal is a group
    comparison (GRPO), so ``min_group_size`` is 2.

    Returns float [B, T].
    """
    mask = batch.mask
    S = max(batch.num_steps, 1)
    zero = f32_zero(batch.device)
    step = batch.step.long()
    lo_s, hi_s = batch.step_range()
    if bool(lo_s < 0) or bool(hi_s >= S):
        step = step.clamp(0, S - 1)
    cnt, tot = step_sums(step, mask, batch.entropy, S)
    has = (cnt > 0) & batch.valid[:, None]
    H = tot / cnt.clamp_min(1)
    inf = torch.tensor(float("inf"), device=batch.device)
    lo = torch.where(has, H, inf).amin()
    hi = torch.where(has, H, -inf).amax()
    Hn = (H - lo) / (hi - lo + 1e-8)
    e = torch.where(has, torch.exp(-k * Hn), zero)
    g = e / (e.sum() / has.to(torch.float32).sum().clamp_min(1))
    f = torch.where(has, torch.exp(-k_f * Hn), zero)
    f_next = torch.cat([f[:, 1:], torch.zeros_like(f[:, :1])], dim=1)  # 0 where no next step has actions
    a = group_advantages(batch.outcome, batch.group, baseline="mean", scale="group", eps=eps, valid=batch.valid)
    step_a = torch.where(has, g * a[:, None] + zeta * f_next, zero)
    if whiten:
        # the values are constant within a step: whitening over the valid actions is the same as a
        # token-count-weighted whitening of the per-step values (a [B, S] computation, not [B, T])
        w = torch.where(has, cnt, zero)
        n = w.sum()
        mean = (w * step_a).sum() / n.clamp_min(1)
        var = (w * (step_a - mean) ** 2).sum() / (n - 1).clamp_min(1)
        step_a = torch.where(has, (step_a - mean) * torch.rsqrt(var + 1e-8), zero)
    return to_actions(step_a, batch)
