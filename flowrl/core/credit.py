"""Step rewards and step-level credit assignment: the seed papers' estimators on the shared core.

Every estimator here is registered with ``@register_advantage`` and has the uniform signature
``fn(batch: TrajectoryBatch, **params) -> float [B, T]``. They read per-step quantities from
``batch.step_reward`` float [B, S] (NaN: "no value at this step"), shared-prefix ids from
``batch.node`` long [B, S], token entropies from ``batch.entropy``, and map per-step advantages to
actions through ``batch.step`` with ``gather_steps``.

Conventions shared by this module:

* **Present steps.** Steps are numbered contiguously from 0 in the order of the actions (``step`` is
  non-decreasing along T, as every rollout here produces it); step s of trajectory i is *present* when
  s <= L_i, the step of i's last valid action (``_last_step``). A trajectory with no valid
  action has no present step. Invalid samples (``batch.sample_valid`` False) have none either and take
  part in no statistic.
* **Probe values.** Estimators built on a probe of the partial trajectory (TurningPoint-GRPO's
  ODE-completion reward, IGPO's answer probability, SPAE's step potential) read
  ``step_reward[:, k]`` as the probe of the state at the **start** of step k (k = 0 is the state
  before any step). The state after the final step is the outcome itself. This keeps n = S exactly
  and every per-sample quantity inside the batch (no tensors in config parameters).

No Python loop runs over samples, groups or tokens; the few loops that remain are recurrences over
the S steps (discounted returns), each marked as such. No scalar is read back per call; the only host
syncs are the shape of ``torch.unique`` (group and node ids) and ``bool(...)`` checks that raise on bad input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import native
from .advantages import discounted_returns, last_action_index, outcome_at_end, register_advantage
from .batch import TrajectoryBatch, gather_steps
from .groups import group_advantages, group_index, group_step_stats, masked_whiten, segment_stats, whiten_zeroed_
from .masks import and_rows, any_valid, last_valid_index, mask_runs, row_counts, runs_layout

__all__ = [
    "turning_point_rewards", "tp_grpo", "step_returns", "prime", "implicit_prm_loss", "dual_level",
    "tree_mc", "salt", "igpo", "spae", "empg", "step_token_counts", "step_sums",
]


# ----------------------------------------------------------------------------- helpers
def _zero(device) -> Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)


def _last_step(batch: TrajectoryBatch) -> Tensor:
    """L_i: the step index of the last valid action of each trajectory, long [B]; -1 when it has none.

    Steps are numbered in the order of the actions (non-decreasing along T), so this is also the
    largest step index among the valid actions. One read of the mask's bytes (``last_valid_index``).
    """
    last_t = last_valid_index(batch.mask)
    L = torch.gather(batch.step.long(), 1, last_t.clamp_min(0)[:, None])[:, 0]
    return torch.where(last_t >= 0, L, torch.full_like(L, -1))


def _to_actions(per_step: Tensor, batch: TrajectoryBatch) -> Tensor:
    """Per-step values float [B, S] on the actions: float [B, T], 0 off ``batch.mask`` (``gather_steps`` with the
    step range that ``validate`` remembered)."""
    return gather_steps(per_step, batch.step, batch.mask, step_range=batch.step_range())


def _present(batch: TrajectoryBatch, S: int, last: Optional[Tensor] = None) -> Tensor:
    """bool [B, S]: step s of trajectory i is present (s <= L_i) and sample i is valid (``last``: ``_last_step``
    when the caller has it; it costs a pass over the mask)."""
    s = torch.arange(S, device=batch.device)
    last = _last_step(batch) if last is None else last
    return (s[None, :] <= last[:, None]) & batch.valid[:, None]


def step_token_counts(step: Tensor, mask: Tensor, S: int) -> Tensor:
    """Number of valid actions in each step: float [B, S] from ``step`` long [B, T] and ``mask`` bool [B, T]."""
    idx = step.long().clamp(0, max(S - 1, 0))
    return torch.zeros(mask.shape[0], S, device=mask.device).scatter_add_(1, idx, mask.to(torch.float32))


def step_sums(step: Tensor, mask: Tensor, values: Tensor, S: int, *, fused: Optional[bool] = None
              ) -> tuple[Tensor, Tensor]:
    """(count, total) float [B, S] each: the valid actions of each step and the sum of ``values`` over them.

    step: long [B, T] already in [0, S); mask: bool [B, T]; values: float [B, T]. On CPU with the native kernels
    (``fused`` None): one pass (``native.step_sums``). ``fused`` (default: on CPU without them)
    accumulates both in one ``scatter_add_`` of complex numbers, value + 1j on valid actions, since a CPU scatter
    costs per index read (two float scatters read the int64 index twice); off, two float scatters.
    """
    B = mask.shape[0]
    zero = torch.zeros((), device=mask.device)
    if fused is None and S > 0 and native.usable(step, mask, values):
        return native.step_sums(step, mask, values, S)  # one pass, both sums
    if fused is None:
        fused = mask.device.type == "cpu"
    if fused:
        pair = torch.empty(mask.shape + (2,), dtype=torch.float32, device=mask.device)
        torch.where(mask, values.to(torch.float32), zero, out=pair[..., 0])
        pair[..., 1].copy_(mask)
        acc = torch.zeros(B, S, dtype=torch.complex64, device=mask.device)
        acc.scatter_add_(1, step, torch.view_as_complex(pair))
        return acc.imag.contiguous(), acc.real.contiguous()
    mf = mask.to(torch.float32)
    cnt = torch.zeros(B, S, device=mask.device).scatter_add_(1, step, mf)
    tot = torch.zeros(B, S, device=mask.device).scatter_add_(1, step, torch.where(mask, values.to(torch.float32), zero))
    return cnt, tot


def _require_steps(batch: TrajectoryBatch, name: str) -> Tensor:
    if batch.step_reward is None:
        raise ValueError(f"{name} needs batch.step_reward (float [B, S]), which is not set")
    return batch.step_reward.to(torch.float32)


def _check_finite_on(values: Tensor, where: Tensor, name: str, what: str) -> None:
    bad = where & ~torch.isfinite(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:8].tolist()
        raise ValueError(f"{name}: {what} is NaN/inf on {int(bad.sum())} present step(s) (first samples {rows}); "
                         "every present step needs a finite value here")


def _discount_steps(r: Tensor, present: Tensor, gamma: float) -> Tensor:
    """G_k = sum_{k' >= k, present} gamma^{k' - k} r_{k'} over steps, float [B, S]; 0 on absent steps.

    A recurrence over the S steps (not over samples).
    """
    r = torch.where(present, r, _zero(r.device))
    if gamma == 1.0:
        out = r.flip(1).cumsum(1).flip(1)
    else:
        out = torch.empty_like(r)
        g = torch.zeros(r.shape[0], device=r.device)
        for k in range(r.shape[1] - 1, -1, -1):  # recurrence over steps
            g = r[:, k] + gamma * g
            out[:, k] = g
    return torch.where(present, out, _zero(r.device))


def _norm_group_step(values: Tensor, group: Tensor, ok: Tensor, eps: float) -> Tensor:
    """(v - mean_{g,s}) / (std_{g,s} + eps) per (group, step) cell over the ``ok`` entries; 0 elsewhere,
    and 0 in cells of one entry or of equal values (as ``stepwise_grpo``)."""
    v = torch.where(ok, values, _zero(values.device))
    count, mean, std, constant = group_step_stats(v, group, valid=ok)
    a = (v - mean) / (std + eps)
    return torch.where(ok & ~constant, a, _zero(a.device))


def _norm_group_pooled(values: Tensor, group: Tensor, ok: Tensor, eps: float, weight: Optional[Tensor] = None) -> Tensor:
    """z-score of ``values`` [B, S] pooled over every ``ok`` entry of a group (all its steps together).

    With ``weight`` [B, S] (e.g. token counts) mean and unbiased variance are weighted: each entry counts
    ``weight`` times (ProRAG's statistics over all valid tokens of the group). Groups whose entries are
    all equal, or that hold a single unit of weight, give 0.
    """
    B, S = values.shape
    inv, G = group_index(group)
    seg = inv[:, None].expand(B, S).reshape(-1)
    v = torch.where(ok, values, _zero(values.device)).reshape(-1)
    okf = ok.reshape(-1)
    w = okf.to(torch.float32) if weight is None else torch.where(okf, weight.reshape(-1).to(torch.float32), _zero(v.device))
    okf = okf & (w > 0)
    st = segment_stats(v, seg, G, okf)  # min / max for the all-equal test
    n = torch.zeros(G, device=v.device).index_add_(0, seg, w)
    mean = torch.zeros(G, device=v.device).index_add_(0, seg, w * v) / n.clamp_min(1e-12)
    dev = torch.where(okf, v - mean[seg], _zero(v.device))
    var = torch.zeros(G, device=v.device).index_add_(0, seg, w * dev * dev) / (n - 1).clamp_min(1e-12)
    std = var.clamp_min(0).sqrt()
    keep = okf & (st.max > st.min)[seg] & (n > 1)[seg]
    a = (v - mean[seg]) / (std[seg] + eps)
    return torch.where(keep, a, _zero(v.device)).view(B, S)


def _dense_ids(group: Tensor, node: Tensor) -> tuple[Tensor, int]:
    """Dense ids long [B, S] in [0, K) of the (group, node) pairs: node ids only merge inside a group.

    One ``unique`` of the packed key group_index * span + (node - min node) when that fits in int64 (node ids
    spanning less than 2^62 / G), else two (the node ids made dense first)."""
    ginv, G = group_index(group)
    lo, hi = node.aminmax()
    span = hi - lo + 1  # wraps negative for ids spanning all of int64: then the two-step path
    if bool((span > 0) & (span <= (2 ** 62) // max(G, 1))):
        key = ginv[:, None] * span + (node - lo)
    else:
        _, ninv = torch.unique(node, return_inverse=True)
        U = int(ninv.max()) + 1 if ninv.numel() else 1
        key = ginv[:, None] * U + ninv
    _, kid = torch.unique(key, return_inverse=True)
    K = int(kid.max()) + 1 if kid.numel() else 0
    return kid, K


def _segment_mean(values: Tensor, seg: Tensor, K: int, valid: Tensor) -> Tensor:
    """Mean of ``values`` float [N] over the ``valid`` members of each segment ``seg`` long [N] in [0, K): float [K]
    (0 for a segment without one). ``segment_stats`` without the spread, min and max that tree_mc / salt ignore."""
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    cnt = torch.zeros(K, device=values.device).index_add_(0, seg, valid.to(torch.float32))
    tot = torch.zeros(K, device=values.device).index_add_(0, seg, torch.where(valid, values.to(torch.float32), zero))
    return tot / cnt.clamp_min(1)


def _require_node(batch: TrajectoryBatch, name: str) -> Tensor:
    if batch.node is None:
        raise ValueError(f"{name} needs batch.node (long [B, S] ids of shared prefixes), which is not set")
    return batch.node


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
    ``balance=True`` keeps equal numbers of positive and negative turning-point bonuses in the batch:
    k = min(#positive, #negative); the k of each sign with the largest |bonus| stay turning points
    (ties: lower flat index first), the rest fall back to d_t (as the reference code does).
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
    R = torch.where(valid[:, None], R.to(torch.float32), _zero(R.device))
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
        k = torch.minimum(pos.sum(), neg.sum())
        turning = _top_k_flat(bonus.abs(), pos, k) | _top_k_flat(bonus.abs(), neg, k)
    return torch.where(turning, bonus, d), turning


def _top_k_flat(mag: Tensor, sel: Tensor, k: Tensor) -> Tensor:
    """bool mask of the ``k`` (0-dim tensor) selected entries with the largest ``mag``; stable ties."""
    flat = torch.where(sel, mag, torch.full_like(mag, -1.0)).reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return sel & (rank.view(mag.shape) < k)


@register_advantage("tp_grpo", requires=("step_reward",))
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
    sr = _require_steps(batch, "tp_grpo")
    R = torch.cat([sr, batch.outcome.to(torch.float32)[:, None]], dim=1)
    bad = batch.valid[:, None] & ~torch.isfinite(R)
    if bool(bad.any()):
        raise ValueError("tp_grpo: batch.step_reward / batch.outcome hold NaN or inf on valid samples; "
                         "step_reward[:, t] must be the ODE-completion reward before step t for every t")
    r, _ = turning_point_rewards(R, eta=eta, balance=balance, valid=batch.valid)
    ok = batch.valid[:, None].expand_as(r)
    a = _norm_group_step(r, batch.group, ok, eps)
    return _to_actions(a, batch)


# ----------------------------------------------------------------------------- step returns
@register_advantage("step_returns", requires=("step_reward",))
def step_returns(batch: TrajectoryBatch, *, gamma: float = 1.0, outcome_coef: float = 0.0) -> Tensor:
    """Discounted return-to-go over steps (the step-level REINFORCE return; PRIME/IGPO/MatchTIR's building block).

    r_{i,k} = step_reward[i, k] (NaN counts as 0) + outcome_coef * outcome_i * 1[k = L_i];
    G_{i,k} = sum_{k' = k}^{L_i} gamma^{k' - k} r_{i,k'}, broadcast to every action of step k.
    No baseline, no normalisation (compose with a shaper or use ``dual_level`` for that).

    batch.step_reward: float [B, S]; batch.step: long [B, T]. Returns float [B, T].
    """
    sr = _require_steps(batch, "step_returns")
    S = sr.shape[1]
    present = _present(batch, S)
    r = torch.nan_to_num(sr, nan=0.0)
    if outcome_coef != 0.0:
        last = _last_step(batch).clamp_min(0)
        at_last = torch.arange(S, device=batch.device)[None, :] == last[:, None]
        out = torch.where(batch.valid, batch.outcome.to(torch.float32), _zero(batch.device))
        r = r + outcome_coef * torch.where(at_last, out[:, None], _zero(batch.device))
    G = _discount_steps(r, present, gamma)
    return _to_actions(G, batch)


# ----------------------------------------------------------------------------- PRIME
def _rloo_dense(r: Tensor, pos: Tensor, group: Tensor, valid: Tensor) -> Tensor:
    """PRIME's RLOO on a dense reward r [B, T] placed at positions ``pos`` bool [B, T].

    m_i = mean of r_i over its positions; K = valid members of i's group;
    r'_t = r_t * K / (K - 1) - sum_{j in g(i)} m_j / (K - 1) at the positions (0 elsewhere; 0 when K = 1).
    (For a single position this is r_i - mean of the others: the RLOO baseline.)
    """
    zero = _zero(r.device)
    n = row_counts(pos).to(torch.float32)
    m = torch.where(pos, r, zero).sum(dim=1) / n.clamp_min(1)
    inv, G = group_index(group)
    st = segment_stats(m, inv, G, valid & (n > 0))
    K = st.count[inv]
    Kc = (K - 1).clamp_min(1)
    out = r * (K / Kc)[:, None] - (st.sum[inv] / Kc)[:, None]
    return torch.where(and_rows(pos, (K > 1) & valid), out, zero)


@register_advantage("prime", requires=("ref_logp",))
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
    RLOO (``_rloo_dense``: r_t * K/(K-1) - sum_j m_j/(K-1), m_j the mean of sample j's reward over its
    reward positions), then a discounted reverse cumsum with ``gamma``; the two returns are summed and
    A = masked_whiten(returns) over the batch's valid actions (the code's form, [code] in the notes).

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
    if granularity == "token" and gamma == 1.0:
        return _prime_token_undiscounted(batch, lp, beta, rm_coef, outcome_coef, batch_norm, eps)
    zero = _zero(batch.device)
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
    rm = _rloo_dense(rm_coef * rm, pos, batch.group, valid)
    last_pos = torch.zeros_like(mask).scatter_(1, last_action_index(mask)[:, None], mask.any(dim=1, keepdim=True))
    out = outcome_coef * torch.where(valid, batch.outcome.to(torch.float32), zero)
    ver = _rloo_dense(outcome_at_end(out, mask), last_pos,
                      batch.group, valid)
    returns = discounted_returns(rm, mask, gamma) + discounted_returns(ver, mask, gamma)
    return masked_whiten(returns, and_rows(mask, valid), eps=eps)


def _prime_token_undiscounted(batch: TrajectoryBatch, lp: Tensor, beta: float, rm_coef: float, outcome_coef: float,
                              batch_norm: bool, eps: float) -> Tensor:
    """``prime`` for granularity "token", gamma = 1, in closed form (the same numbers, fewer passes over [B, T]).

    With d = (log pi_phi - log pi_ref) on valid actions, Q_t = sum_{s >= t} d_s and N_t = # valid actions at or
    after t, the process return is c_i Q_t - b_i N_t (c_i = rm_coef * scale * K/(K-1), b_i = rm_coef *
    sum_j m_j/(K-1), m_j = scale * mean_t d_{j,t}) and the outcome return is the RLOO of outcome_coef * r, v_i, on
    every valid action; then whitening over the valid actions. Every [B, T] step is in place after three allocations.
    """
    mask = batch.mask
    valid = batch.valid
    mv = mask if batch.sample_valid is None else and_rows(mask, valid)
    if native.usable(lp, batch.ref_logp, mv):
        return _prime_token_native(batch, lp, mv, beta, rm_coef, outcome_coef, batch_norm, eps)
    counts, first, last = mask_runs(mv)
    if runs_layout(counts, first, last)[0]:
        return _prime_token_runs(batch, lp, mv, counts, first, last, beta, rm_coef, outcome_coef, batch_norm, eps)
    mf = mv.to(torch.float32)
    d = (lp.to(torch.float32) - batch.ref_logp.to(torch.float32)).mul_(mf)
    n = counts.to(torch.float32)
    dsum = d.sum(dim=1)
    Q = torch.cumsum(d, dim=1).neg_().add_(dsum[:, None]).add_(d)  # reverse cumsum
    scale = _prime_scale(Q, beta, batch_norm)
    c, b, v = _prime_coefficients(batch, n, dsum, scale, rm_coef, outcome_coef)
    N = torch.cumsum(mf, dim=1).neg_().add_(n[:, None]).add_(mf)
    R = Q.mul_(c[:, None]).sub_(N.mul_(b[:, None])).add_(v[:, None]).mul_(mf)
    return whiten_zeroed_(R, mv, eps=eps)


def _prime_token_native(batch: TrajectoryBatch, lp: Tensor, mv: Tensor, beta: float, rm_coef: float,
                        outcome_coef: float, batch_norm: bool, eps: float) -> Tensor:
    """``_prime_token_undiscounted`` with the native kernels, any mask layout: the rows' sums of d (one pass), then
    R_t = sum_{s >= t valid} (c_i d_s - b_i) + v_i by one fused scan (coef c, bias -b, v at the last action), whose
    row sums feed the whitening (one more pass). ``batch_norm`` first scans d alone for max |Q|."""
    n = row_counts(mv).to(torch.float32)
    dsum = native.row_sums(mv, lp, batch.ref_logp)[0].to(torch.float32)
    scale = torch.full((), beta)
    if batch_norm:
        scale = _prime_scale(native.scan(mv, a=lp, b=batch.ref_logp)[0], beta, True)
    c, b, v = _prime_coefficients(batch, n, dsum, scale, rm_coef, outcome_coef)
    R, rs, rq = native.scan(mv, a=lp, b=batch.ref_logp, coef=c, bias=-b, end=v, stats=True)
    return whiten_zeroed_(R, mv, eps=eps, row_sums=(rs, rq))


def _prime_scale(Q: Tensor, beta: float, batch_norm: bool) -> Tensor:
    """beta, or with ``batch_norm`` beta / (beta * max |Q|) (PRIME's batch normalisation of the implicit reward;
    Q [B, T] is the reverse cumsum of the log-ratio, 0 or a valid action's value at padded positions)."""
    scale = torch.full((), beta, device=Q.device)
    if batch_norm:
        qlo, qhi = Q.aminmax()
        denom = beta * torch.maximum(qhi, -qlo)
        scale = torch.where(denom > 0, scale / torch.where(denom > 0, denom, torch.ones_like(denom)), scale)
    return scale


def _prime_coefficients(batch: TrajectoryBatch, n: Tensor, dsum: Tensor, scale: Tensor, rm_coef: float,
                        outcome_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (c, b, v) of PRIME's closed form: process return c Q_t - b N_t, outcome return v. float [B] each."""
    valid = batch.valid
    rows = valid & (n > 0)
    inv, G = group_index(batch.group)
    m = scale * dsum / n.clamp_min(1)
    st = segment_stats(m, inv, G, rows)
    K = st.count[inv]
    Kc = (K - 1).clamp_min(1)
    on = rows & (K > 1)
    zero = _zero(n.device)
    c = torch.where(on, rm_coef * scale * K / Kc, zero)
    b = torch.where(on, rm_coef * st.sum[inv] / Kc, zero)
    r = torch.where(rows, outcome_coef * batch.outcome.to(torch.float32), zero)
    v = torch.where(on, r * K / Kc - segment_stats(r, inv, G, rows).sum[inv] / Kc, zero)
    return c, b, v


_ONE_PASS_MIN_KEEP = 1e-4  # the one-pass variance must keep this share of the sum of squares, else two passes


def _prime_token_runs(batch: TrajectoryBatch, lp: Tensor, mv: Tensor, counts: Tensor, first: Tensor, last: Tensor,
                      beta: float, rm_coef: float, outcome_coef: float, batch_norm: bool, eps: float) -> Tensor:
    """``_prime_token_undiscounted`` when every row's valid actions are one run [first_i, last_i] (no holes).

    There N_t = last_i + 1 - t, so R_t = c_i Q_t - b_i (last_i + 1 - t) + v_i is affine in t given Q, and the
    whitening statistics follow from three row sums of Q (sum Q, sum Q^2, sum t Q) and sums of powers of
    N = 1..n_i, combined in float64. Q is written once and turned into the output by one affine pass and one
    masking pass. When the one-pass variance has lost more than four digits to the mean (near-constant
    returns), the two-pass whitening runs on the materialised returns instead.
    """
    B, T = mv.shape
    zero = _zero(mv.device)
    d = torch.sub(lp.to(torch.float32), batch.ref_logp.to(torch.float32))
    torch.where(mv, d, zero, out=d)
    n = counts.to(torch.float32)
    Q = torch.cumsum(d, dim=1)
    dsum = Q[:, -1].clone()  # the prefix sum's own total: after a row's last action Q below is exactly 0
    torch.sub(dsum[:, None], Q, out=Q).add_(d)  # Q_t = sum_{s >= t} d_s (total minus the prefix before t)
    del d
    if bool((first > 0).any()):  # left padding: Q there holds the row's total
        torch.where(mv, Q, zero, out=Q)
    scale = _prime_scale(Q, beta, batch_norm)
    c, b, v = _prime_coefficients(batch, n, dsum, scale, rm_coef, outcome_coef)
    t = torch.arange(T, device=mv.device, dtype=torch.float32)
    f64 = torch.float64
    sQ, sQQ, sQt = Q.sum(dim=1).to(f64), torch.linalg.vecdot(Q, Q, dim=1).to(f64), (Q @ t).to(f64)
    c64, b64, v64, n64 = c.to(f64), b.to(f64), v.to(f64), n.to(f64)
    L1 = last.to(f64) + 1
    sN, sNN = n64 * (n64 + 1) / 2, n64 * (n64 + 1) * (2 * n64 + 1) / 6
    sQN = L1 * sQ - sQt
    sR = c64 * sQ - b64 * sN + n64 * v64
    sRR = (c64 * c64 * sQQ - 2 * c64 * b64 * sQN + 2 * c64 * v64 * sQ + b64 * b64 * sNN - 2 * b64 * v64 * sN
           + n64 * v64 * v64)
    N = n64.sum()
    mean = sR.sum() / N.clamp_min(1)
    ss = sRR.sum() - N * mean * mean
    if bool(ss <= _ONE_PASS_MIN_KEEP * sRR.sum()):  # cancellation: whiten the materialised returns in two passes
        R = Q.mul_(c[:, None]).addcmul_(b[:, None], t[None, :]).add_((v - b * L1.to(torch.float32))[:, None])
        torch.where(mv, R, zero, out=R)
        return whiten_zeroed_(R, mv, eps=eps)
    # one affine pass: rho * (c Q + b t + v - b (last + 1) - mean), then 0 off the mask
    rho = torch.rsqrt(ss / (N - 1).clamp_min(1) + eps)
    R = Q.mul_((rho * c64).to(torch.float32)[:, None]).addcmul_((rho * b64).to(torch.float32)[:, None], t[None, :])
    R.add_((rho * (v64 - b64 * L1 - mean)).to(torch.float32)[:, None])
    return torch.where(mv, R, zero, out=R)


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
    zero = _zero(mask.device)
    z = beta * torch.where(mask, prm_logp.float() - ref_logp.detach().float(), zero).sum(dim=1)
    has = any_valid(mask)
    per = torch.nn.functional.binary_cross_entropy_with_logits(z, lab, reduction="none")
    n = has.to(torch.float32).sum().clamp_min(1)
    loss = torch.where(has, per, zero).sum() / n
    acc = torch.where(has, ((z > 0) == (lab > 0.5)).to(torch.float32), zero).sum() / n
    return loss, {"prm/loss": loss.detach(), "prm/acc": acc.detach()}


# ----------------------------------------------------------------------------- dual-level (MatchTIR / ProRAG)
@register_advantage("dual_level", requires=("step_reward",))
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
    sr = _require_steps(batch, "dual_level")
    S = sr.shape[1]
    if outcome_coef is None:
        outcome_coef = 0.5 if mode == "per_step" else 1.0
    if beta is None:
        beta = 0.5
    a_o = group_advantages(batch.outcome, batch.group, baseline="mean", scale="group", eps=eps, valid=batch.valid)
    present = _present(batch, S)
    if mode == "per_step":
        G = _discount_steps(torch.nan_to_num(sr, nan=0.0), present, gamma)
        a_s = _norm_group_step(G, batch.group, present, eps)
    else:
        ok = present & ~torch.isnan(sr)
        counts = step_token_counts(batch.step, batch.mask, S)
        a_s = _norm_group_pooled(torch.nan_to_num(sr, nan=0.0), batch.group, ok & (counts > 0), eps, weight=counts)
    per_step = torch.where(present, outcome_coef * a_o[:, None] + beta * a_s, _zero(batch.device))
    return _to_actions(per_step, batch)


# ----------------------------------------------------------------------------- tree / graph credit
@register_advantage("tree_mc", requires=("node",))
def tree_mc(batch: TrajectoryBatch, *, cumulative: bool = False, scale: str = "none", eps: float = 1e-4) -> Tensor:
    """Tree Monte-Carlo step advantages (TreePS-RAG, arXiv 2601.06922).

    ``batch.node[i, k]`` is the id of the tree node (the shared prefix) reached after step k; ids merge
    only inside a group. V(n) = mean outcome of the trajectories through node n (each present step of
    a valid trajectory counts once); the root's value is the group's mean outcome.
    A_{i,k} = V(node_{i,k}) - V(node_{i,k-1}), with node_{i,-1} = root (sibling-relative credit); over a
    trajectory these telescope to r_i - mean_g r. ``cumulative=True`` gives V(node_{i,k}) - V(root)
    instead (the sum of the step credits so far). Chosen from the notes ([sum/recall]): the plain
    difference V(n) - V(parent) with no extra outcome term; scale "group" divides by (std_g r + eps).
    On a tree where every trajectory is its own branch from the root, step 0 gets r_i - mean_g r and
    later steps 0 (cumulative: r_i - mean_g r on every step).

    batch.node: long [B, S]; batch.outcome: float [B]. Returns float [B, T].
    """
    if scale not in ("none", "group"):
        raise ValueError(f"tree_mc: scale={scale!r}; valid values are ('none', 'group')")
    node = _require_node(batch, "tree_mc")
    S = node.shape[1]
    present = _present(batch, S)
    zero = _zero(batch.device)
    r = torch.where(batch.valid, batch.outcome.to(torch.float32), zero)
    kid, K = _dense_ids(batch.group, node)
    vals = r[:, None].expand(-1, S).reshape(-1)
    V = _segment_mean(vals, kid.reshape(-1), max(K, 1), present.reshape(-1))[kid]  # [B, S]
    inv, G = group_index(batch.group)
    gs = segment_stats(r, inv, G, batch.valid & present.any(dim=1))
    root = gs.mean[inv]
    if cumulative:
        a = V - root[:, None]
    else:
        parent = torch.cat([root[:, None], V[:, :-1]], dim=1)
        a = V - parent
    if scale == "group":
        a = a / (gs.std[inv][:, None] + eps)
    a = torch.where(present, a, zero)
    return _to_actions(a, batch)


@register_advantage("salt", requires=("node",))
def salt(batch: TrajectoryBatch, *, baseline: str = "mean", scale: str = "group", eps: float = 1e-4) -> Tensor:
    """SALT (arXiv 2510.20022): step advantages refined over the group's trajectory graph.

    a_i = trajectory-level advantage (``group_advantages`` with ``baseline``/``scale``: GRPO by default,
    RLOO with baseline "loo", scale "none"). Steps of one group whose ``batch.node`` ids coincide (same
    history and action) are one graph node; A(n) = mean of a_i over the present steps at n (each
    passage counts once), and step k of trajectory i gets A(node_{i,k}). Chosen ([recall] in the notes):
    a plain, unweighted mean over passages. Shared neutral steps drift to 0; a step no other trajectory
    shares keeps a_i, so with no shared steps this is the plain trajectory advantage.

    batch.node: long [B, S]. Returns float [B, T].
    """
    node = _require_node(batch, "salt")
    S = node.shape[1]
    present = _present(batch, S)
    a = group_advantages(batch.outcome, batch.group, baseline=baseline, scale=scale, eps=eps, valid=batch.valid)
    kid, K = _dense_ids(batch.group, node)
    vals = a[:, None].expand(-1, S).reshape(-1)
    A = _segment_mean(vals, kid.reshape(-1), max(K, 1), present.reshape(-1))[kid]
    A = torch.where(present, A, _zero(batch.device))
    return _to_actions(A, batch)


# ----------------------------------------------------------------------------- IGPO
@register_advantage("igpo", requires=("step_reward",))
def igpo(batch: TrajectoryBatch, *, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """IGPO (arXiv 2510.14967): turn-level information-gain rewards, group-normalised, discounted.

    ``batch.step_reward[i, k]`` = p_{i,k}, the teacher-forced (geometric-mean) probability of the
    ground-truth answer given the trajectory up to the **start** of turn k (k = 0: the prompt alone).
    r_{i,k} = p_{i,k+1} - p_{i,k} for k < L_i (the information gain of turn k); r_{i,L_i} = outcome_i
    (the answer turn's F1 / correctness). r~ = (r - mean_g) / (std_g + eps) over **all present turns of all
    rollouts of the group** (pooled); A_{i,k} = sum_{k' >= k} gamma^{k'-k} r~_{i,k'}, on every action of turn k.
    Chosen: gamma = 1 by default (the repo's discounted variant uses 0.5: pass gamma=0.5 to match it).
    p must be finite on turns 0..L_i of every valid sample.

    Returns float [B, T].
    """
    p = _require_steps(batch, "igpo")
    S = p.shape[1]
    last = _last_step(batch)
    present = _present(batch, S, last)
    _check_finite_on(p, present, "igpo", "batch.step_reward (p_k)")
    k = torch.arange(S, device=batch.device)[None, :]
    nxt = torch.cat([p[:, 1:], torch.zeros_like(p[:, :1])], dim=1)
    out = torch.where(batch.valid, batch.outcome.to(torch.float32), _zero(batch.device))[:, None]
    r = torch.where(k == last[:, None], out.expand_as(p), nxt - p)
    r = torch.where(present, r, _zero(batch.device))
    z = _norm_group_pooled(r, batch.group, present, eps)
    A = _discount_steps(z, present, gamma)
    return _to_actions(A, batch)


# ----------------------------------------------------------------------------- SPAE
@register_advantage("spae", requires=("step_reward",))
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
    Chosen ([recall] in the notes; the combination and xi are not verified against the paper): additive
    potential-difference shaping and an additive saturation penalty, defaults xi = 0.5, sat_penalty = 0.2,
    threshold 0.9 (the notes' saturation level). Phi must be finite on present steps.

    Returns float [B, T].
    """
    phi = _require_steps(batch, "spae")
    S = phi.shape[1]
    last = _last_step(batch)
    present = _present(batch, S, last)
    _check_finite_on(phi, present, "spae", "batch.step_reward (Phi_k)")
    zero = _zero(batch.device)
    phi0 = torch.where(present, phi, zero)
    k = torch.arange(S, device=batch.device)[None, :]
    nxt = torch.cat([phi0[:, 1:], torch.zeros_like(phi0[:, :1])], dim=1)
    delta = torch.where(present & (k < last[:, None]), nxt - phi0, zero)
    high = torch.where(present, phi0, torch.full_like(phi0, -float("inf"))).cummax(dim=1).values
    sat = present & (high > sat_threshold)
    a = group_advantages(batch.outcome, batch.group, baseline="mean", scale="group", eps=eps, valid=batch.valid)
    step_a = torch.where(present, a[:, None] + xi * delta - sat_penalty * sat.to(torch.float32), zero)
    return _to_actions(step_a, batch)


# ----------------------------------------------------------------------------- EMPG
@register_advantage("empg", requires=("entropy",))
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
    masked whitening over the batch's valid actions (the notes' "final batch normalization", [recall];
    chosen on by default). Defaults k = k_f = 1, zeta = 0.1 (project-page pseudocode).

    Returns float [B, T].
    """
    mask = batch.mask
    S = max(batch.num_steps, 1)
    zero = _zero(batch.device)
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
    return _to_actions(step_a, batch)
