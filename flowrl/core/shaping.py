"""Reward shapers, correctness gates and sample filters: what acts on rewards before the advantage estimator.

Shapers map rewards to rewards (outcome float [B]; step rewards float [B, S] with NaN where a step has no
reward); gates switch a reward on or off by correctness or a rubric; filters return a keep-mask bool [B] that the
trainer applies with ``TrajectoryBatch.select`` (and counts in its metrics). All group logic goes through scatter
ops (``groups.segment_stats`` and sorts over segment ids): no loop over samples, groups or tokens. Weight
schedules over training steps live in ``flowrl.core.schedules``.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import Tensor

from .groups import group_index, group_stats, group_step_stats, segment_stats

__all__ = [
    "weighted_sum", "zero_variance_filter", "accuracy_band_filter", "soft_overlong_penalty", "group_fraction",
    "clip_delta", "renorm", "posterior_gate", "rubric_gate", "gated_accumulation", "trust_weight",
    "partial_credit", "weighted_tests", "prof_filter", "oreal_pairs", "rank_in_segment",
]


# ----------------------------------------------------------------------------- outcome shapers and filters
def weighted_sum(parts: Mapping[str, Tensor], weights: Optional[Mapping[str, float]] = None) -> Tensor:
    """Combined outcome sum_k w_k r^k of named reward parts (each float [B]); w_k defaults to 1.

    A weight naming no part, parts of different shapes, or no parts at all raise ValueError.
    (Flow-GRPO's ``multi_score``; TRL's ``reward_weights`` with ``sum_then_normalize``.)
    """
    if not parts:
        raise ValueError("weighted_sum: no reward parts given")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(parts))
    if unknown:
        raise ValueError(f"weighted_sum: weights name unknown reward part(s) {unknown}; parts are {sorted(parts)}")
    shapes = {k: tuple(v.shape) for k, v in parts.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"weighted_sum: every part must be float [B] of one B; got {shapes}")
    out = None
    for k, v in parts.items():  # a handful of named parts
        term = weights.get(k, 1.0) * v.to(torch.float32)
        out = term if out is None else out + term
    return out


def zero_variance_filter(
    rewards: Tensor, group: Tensor, *, valid: Optional[Tensor] = None, keep_singletons: bool = False
) -> Tensor:
    """DAPO's dynamic sampling (Yu et al., 2025): keep groups whose rewards are not all equal.

    keep_i = 1[max_{g(i)} r != min_{g(i)} r] (such a group gives every member advantage 0, so no gradient).
    A group of one valid sample is dropped unless ``keep_singletons`` (verl keeps them).
    rewards: float [B]; group: long [B]; valid: bool [B] or None. Returns bool [B] (invalid samples False).
    """
    if valid is None:
        valid = torch.ones_like(group, dtype=torch.bool)
    st = group_stats(rewards, group, valid=valid, distributed=False)
    keep = ~st.constant
    if keep_singletons:
        keep = keep | (st.count == 1)
    return keep & valid


def accuracy_band_filter(
    correct: Tensor, group: Tensor, *, low: float = 0.2, high: float = 0.8, valid: Optional[Tensor] = None
) -> Tensor:
    """PRIME's online prompt filter (Cui et al., 2025): keep groups with accuracy in [low, high].

    acc_g = mean_{j in g} correct_j; keep_i = 1[low <= acc_{g(i)} <= high]. correct: float or bool [B]
    (1 = right); group: long [B]. Returns bool [B].
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"accuracy_band_filter: need 0 <= low <= high <= 1, got low={low}, high={high}")
    if valid is None:
        valid = torch.ones_like(group, dtype=torch.bool)
    st = group_stats(correct.to(torch.float32), group, valid=valid, distributed=False)
    return (st.mean >= low) & (st.mean <= high) & valid


def soft_overlong_penalty(lengths: Tensor, max_len: int, cache_len: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment: a length-dependent penalty added to the reward.

    R_len(L) = 0 if L <= max_len - cache_len;  factor * ((max_len - cache_len) - L) / cache_len if
    max_len - cache_len < L <= max_len;  -factor if L > max_len.
    lengths: long or float [B] (completion lengths). Returns float [B] (<= 0).
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"soft_overlong_penalty: need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    L = lengths.to(torch.float32)
    start = float(max_len - cache_len)
    ramp = factor * (start - L) / cache_len
    out = torch.where(L <= start, torch.zeros_like(L), ramp)
    return torch.where(L > max_len, torch.full_like(L, -factor), out)


def group_fraction(flag: Tensor, group: Tensor) -> Tensor:
    """Per-sample share of its group with ``flag`` set: float [B] (used by filters and metrics)."""
    inv, G = group_index(group)
    return segment_stats(flag.to(torch.float32), inv, G).mean[inv]


# ----------------------------------------------------------------------------- checks
def _vec(name: str, t: Tensor, B: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor [B]; got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if B is not None and t.shape[0] != B:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B] = ({B},)")
    return t


def _steps(name: str, t: Tensor) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be float [B, S] (NaN where a step has no reward)")
    if bool(torch.isinf(t).any()):
        raise ValueError(f"{name} holds +-inf; only NaN (no reward at that step) is allowed")
    return t.to(torch.float32)


def _finite(name: str, t: Tensor) -> Tensor:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t.to(torch.float32)


# ----------------------------------------------------------------------------- step-reward transforms
def clip_delta(step_rewards: Tensor, *, mode: str = "clip_delta", eta: float = 0.0) -> Tensor:
    """Clip and Delta step-reward refinements (Gao et al., "On Designing Effective RL Reward at Training Time", 2410.15115).

    Clip:  r~_k = min(r_k - eta, 0), so the cumulative process reward of any trajectory is <= 0.
    Delta: r~_k = r_k - r_{k+1} for every present step k but the last, r~_K = r_K for the last present
    step K; the sum over the trajectory telescopes to r_1 (bounded, no gain from repeating steps).
    "clip_delta" applies Clip, then Delta. Present steps are the non-NaN entries (they need not be a
    prefix: Delta pairs each with the next present one); NaN entries stay NaN.
    This library's choice: eta is a threshold given by the caller (the paper suggests a PRM-score quantile), default 0.

    step_rewards: float [B, S]. Returns float [B, S].
    """
    if mode not in ("clip", "delta", "clip_delta"):
        raise ValueError(f"clip_delta: mode={mode!r}; valid values are ('clip', 'delta', 'clip_delta')")
    r = _steps("clip_delta: step_rewards", step_rewards)
    present = ~torch.isnan(r)
    if mode in ("clip", "clip_delta"):
        r = torch.clamp(r - eta, max=0.0)
    if mode == "clip":
        return r
    B, S = r.shape
    pos = torch.arange(S, device=r.device).expand(B, S)
    idx = torch.where(present, pos, torch.full_like(pos, S))
    # index of the first present step at or after k, then strictly after k
    nxt_at = idx.flip(1).cummin(dim=1).values.flip(1)
    nxt = torch.cat([nxt_at[:, 1:], torch.full_like(nxt_at[:, :1], S)], dim=1)
    has_next = nxt < S
    r0 = torch.nan_to_num(r, nan=0.0)
    nv = torch.gather(r0, 1, nxt.clamp(max=S - 1))
    out = torch.where(has_next, r0 - nv, r0)
    return torch.where(present, out, torch.full_like(out, float("nan")))


def renorm(process: Tensor, outcome: Tensor) -> Tensor:
    """ReNorm of process and outcome rewards (PPR, arXiv 2509.25598).

    r~_k = r_{p,k} + r_o - 1 with r_p in [0, 1] (principle PRM score) and r_o in {0, 1}: a failed
    trajectory (r_o = 0) can never net a positive process reward, a successful one never a negative.
    This library's choice: exactly this additive form. process: float [B] or [B, S] (NaN kept); outcome: float [B].
    Returns the shape of ``process``.
    """
    o = _finite("renorm: outcome", _vec("renorm: outcome", outcome, process.shape[0])).to(torch.float32)
    p = process.to(torch.float32)
    return p + (o[:, None] if p.dim() == 2 else o) - 1.0


def posterior_gate(outcome: Tensor, process: Tensor, correct: Tensor, *, coef: float = 1.0) -> Tensor:
    """Posterior-GRPO's gated reward (arXiv 2508.05170): reasoning reward only for successful rollouts.

    R_i = outcome_i + coef * 1[correct_i] * process_i (outcome may already include the format reward).
    With every rollout correct this is the ungated sum. outcome, process: float [B]; correct: bool [B].
    Returns float [B].
    """
    B = outcome.shape[0]
    o = _finite("posterior_gate: outcome", _vec("posterior_gate: outcome", outcome))
    p = _finite("posterior_gate: process", _vec("posterior_gate: process", process, B))
    c = _vec("posterior_gate: correct", correct, B).to(torch.bool)
    return o + coef * torch.where(c, p, torch.zeros_like(p))


def rubric_gate(
    outcome: Tensor, rubric: Tensor, group: Tensor, *, alpha: float = 0.3, normalize: bool = False
) -> Tensor:
    """C-GRPO's rubric reward gated on correctness (CaRR, arXiv 2601.06021).

    R_i = 0 if r_{o,i} = 0, else (1 - alpha) * r_{o,i} + alpha * rr_i, where rr_i is the rubric score
    (fraction of satisfied rubrics, in [0, 1]) or, with ``normalize``, rr_i / max_{j in g(i)} rr_j
    (0 when the group's max is 0). The code's only-positive branch uses the raw score even when
    normalising; here ``normalize`` applies everywhere (chosen: consistent). alpha = 0.3 as the code.
    outcome, rubric: float [B]; group: long [B]. Returns float [B].
    """
    B = outcome.shape[0]
    o = _finite("rubric_gate: outcome", _vec("rubric_gate: outcome", outcome))
    rr = _finite("rubric_gate: rubric", _vec("rubric_gate: rubric", rubric, B))
    _vec("rubric_gate: group", group, B)
    if normalize:
        inv, G = group_index(group)
        mx = segment_stats(rr, inv, G).max[inv]
        rr = torch.where(mx > 0, rr / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(rr))
    return torch.where(o != 0, (1.0 - alpha) * o + alpha * rr, torch.zeros_like(o))


def gated_accumulation(high: Tensor, step_rewards: Tensor, *, tau: float = 0.0, coef: float = 1.0) -> Tensor:
    """G-RA, Gated Reward Accumulation (arXiv 2508.10548).

    R_i = R_high,i + coef * 1[R_high,i >= tau] * sum_k r_{i,k} (NaN step rewards count as absent).
    Immediate step rewards only accumulate when the long-term reward clears the threshold; when every
    trajectory clears it this is the ungated sum. high: float [B]; step_rewards: float [B, S]. Returns float [B].
    """
    h = _finite("gated_accumulation: high", _vec("gated_accumulation: high", high))
    r = _steps("gated_accumulation: step_rewards", step_rewards)
    if r.shape[0] != h.shape[0]:
        raise ValueError(f"gated_accumulation: step_rewards has {r.shape[0]} rows; high has {h.shape[0]}")
    total = torch.nansum(r, dim=1)
    return h + coef * torch.where(h >= tau, total, torch.zeros_like(total))


def trust_weight(
    correct: Tensor, think: Tensor, group: Tensor, *, step: float = 0.0, alpha: float = 0.3,
    anneal_steps: float = 500.0, low: float = 0.1, high: float = 0.9,
) -> Tensor:
    """Trust-GRPO's weight of the thinking reward (SophiaVL-R1, arXiv 2505.17018), with exponential annealing.

    Per group: acc_g = mean correct. If acc_g <= low or acc_g >= high (all right / all wrong) the
    thinking reward is off (gamma_g = 0). Otherwise mu_c, mu_w = mean thinking reward of the correct /
    incorrect members, gamma_g = 1 if mu_c >= mu_w else exp(mu_c - mu_w). Weight
    w_i = gamma_{g(i)} * alpha * exp(-step / anneal_steps); the shaped reward is r_o,i + w_i * think_i.
    Defaults alpha = 0.3, anneal_steps = 500 (the code's). correct: bool [B]; think: float [B];
    group: long [B]. Returns float [B].
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"trust_weight: need 0 <= low < high <= 1, got low={low}, high={high}")
    if anneal_steps <= 0:
        raise ValueError(f"trust_weight: anneal_steps={anneal_steps} must be > 0")
    B = correct.shape[0]
    c = _vec("trust_weight: correct", correct).to(torch.bool)
    th = _finite("trust_weight: think", _vec("trust_weight: think", think, B))
    inv, G = group_index(_vec("trust_weight: group", group, B))
    acc = segment_stats(c.to(torch.float32), inv, G).mean
    mu_c = segment_stats(th, inv, G, c).mean
    mu_w = segment_stats(th, inv, G, ~c).mean
    gamma = torch.where(mu_c >= mu_w, torch.ones_like(mu_c), torch.exp(mu_c - mu_w))
    on = (acc > low) & (acc < high)
    gamma = torch.where(on, gamma, torch.zeros_like(gamma))
    return gamma[inv] * (alpha * math.exp(-float(step) / anneal_steps))


def partial_credit(
    correct: Tensor, match_rate: Tensor, group: Tensor, *, alpha: float = 0.1,
    format_ok: Optional[Tensor] = None, format_penalty: float = 0.0,
) -> Tensor:
    """E-GRPO's entity-match partial credit (arXiv 2510.24694).

    gamma_i = |gold entities found in i's reasoning| / |gold entities| (``match_rate``, in [0, 1]);
    gamma^_i = gamma_i / max_{j in g(i)} gamma_j (0 when the group's max is 0).
    R_i = 1 if correct; alpha * gamma^_i if incorrect; -format_penalty where ``format_ok`` is False.
    This library's choice: alpha = 0.1 (small, < 1, so a wrong answer never earns near a right one) and
    format_penalty = 0. correct: bool [B]; match_rate: float [B]; group: long [B]. Returns float [B].
    """
    B = correct.shape[0]
    c = _vec("partial_credit: correct", correct).to(torch.bool)
    g = _finite("partial_credit: match_rate", _vec("partial_credit: match_rate", match_rate, B))
    if bool(((g < 0) | (g > 1)).any()):
        raise ValueError("partial_credit: match_rate must lie in [0, 1]")
    inv, G = group_index(_vec("partial_credit: group", group, B))
    mx = segment_stats(g, inv, G).max[inv]
    gh = torch.where(mx > 0, g / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(g))
    out = torch.where(c, torch.ones_like(g), alpha * gh)
    if format_ok is not None:
        f = _vec("partial_credit: format_ok", format_ok, B).to(torch.bool)
        out = torch.where(f, out, torch.full_like(out, -format_penalty))
    return out


def weighted_tests(
    passes: Tensor, group: Tensor, *, test_mask: Optional[Tensor] = None, all_pass_weight: float = 1.0,
    dense_weight: float = 0.5,
) -> Tensor:
    """VeRPO's difficulty-weighted partial success (arXiv 2601.03525).

    rho_{g,j} = share of group g's rollouts passing test j; w_{g,j} = (1 - rho_{g,j}) / sum_j' (1 - rho_{g,j'})
    over the group's real tests (uniform weights when every rollout passes every test);
    dense_i = sum_j w_{g(i),j} * pass_{i,j} in [0, 1];
    R_i = all_pass_weight * 1[i passes all its tests] + dense_weight * dense_i.
    This library's choice: weights proportional to 1 - rho, and dense_weight < all_pass_weight so full
    correctness dominates. passes: bool [B, U]; test_mask: bool [B, U] (real tests, default all);
    group: long [B]. Returns float [B].
    """
    if passes.dim() != 2:
        raise ValueError(f"weighted_tests: passes has shape {tuple(passes.shape)}; expected bool [B, U]")
    B, U = passes.shape
    _vec("weighted_tests: group", group, B)
    tm = torch.ones_like(passes, dtype=torch.bool) if test_mask is None else test_mask.to(torch.bool)
    if tuple(tm.shape) != (B, U):
        raise ValueError(f"weighted_tests: test_mask has shape {tuple(tm.shape)}; expected [B, U] = {(B, U)}")
    p = passes.to(torch.float32)
    _, rho, _, _ = group_step_stats(p, group, valid=tm)
    hard = torch.where(tm, 1.0 - rho, torch.zeros_like(rho))
    tot = hard.sum(dim=1, keepdim=True)
    n = tm.to(torch.float32).sum(dim=1, keepdim=True)
    w = torch.where(tot > 0, hard / tot.clamp_min(1e-12), tm.to(torch.float32) / n.clamp_min(1))
    dense = (w * torch.where(tm, p, torch.zeros_like(p))).sum(dim=1)
    all_pass = (passes.to(torch.bool) | ~tm).all(dim=1) & tm.any(dim=1)
    return all_pass_weight * all_pass.to(torch.float32) + dense_weight * dense


# ----------------------------------------------------------------------------- filters
def rank_in_segment(score: Tensor, seg: Tensor, *, descending: bool = True) -> Tensor:
    """Rank long [B] of each entry within its segment ``seg`` long [B] by ``score`` (0 = best); ties keep index order.

    Two stable sorts (by score, then by segment): no loop over segments.
    """
    o1 = torch.sort(score, descending=descending, stable=True).indices
    o2 = torch.sort(seg[o1], stable=True).indices
    order = o1[o2]
    sseg = seg[order]
    pos = torch.arange(score.shape[0], device=score.device)
    new = torch.ones_like(sseg, dtype=torch.bool)
    new[1:] = sseg[1:] != sseg[:-1]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - start
    return rank


def prof_filter(
    correct: Tensor, step_rewards: Tensor, group: Tensor, *, keep: int, mode: str = "both", lam: float = 0.0,
    h_lambda: Optional[int] = None, generator: Optional[torch.Generator] = None, valid: Optional[Tensor] = None,
) -> Tensor:
    """PROF's process-outcome consistency filter (arXiv 2509.03403).

    Consistency r_pro,i = (mean_h r_{i,h} - lam * 1[H_i = 1 or H_i >= h_lambda]) * r_o,i with r_o in {-1, +1}
    (H_i = number of non-NaN step rewards; the length term is off when h_lambda is None). Within each
    group correct and incorrect rollouts are ranked separately by r_pro (correct: highest mean PRM first;
    incorrect: lowest first) and the top of each side is kept. Each group keeps min(n_g, keep) rollouts,
    split as evenly as the two sides allow: k_c = min(n_c, max(ceil(K/2), K - n_w)), k_w = K - k_c
    (chosen: the balance rule from the README's "balance the correct/incorrect ratio").
    mode "correct" (Filter-Correct): incorrect rollouts are ranked at random (``generator``) instead.
    correct: bool [B]; step_rewards: float [B, S]; group: long [B]. Returns keep bool [B].
    """
    if mode not in ("both", "correct"):
        raise ValueError(f"prof_filter: mode={mode!r}; valid values are ('both', 'correct')")
    if keep < 1:
        raise ValueError(f"prof_filter: keep={keep} must be >= 1")
    B = correct.shape[0]
    c = _vec("prof_filter: correct", correct).to(torch.bool)
    r = _steps("prof_filter: step_rewards", step_rewards)
    _vec("prof_filter: group", group, B)
    v = torch.ones(B, dtype=torch.bool, device=c.device) if valid is None else _vec("prof_filter: valid", valid, B).to(torch.bool)
    H = (~torch.isnan(r)).sum(dim=1)
    if bool((v & (H == 0)).any()):
        raise ValueError("prof_filter: a valid rollout has no step reward (all NaN); PROF needs a PRM score per rollout")
    m = torch.nansum(r, dim=1) / H.clamp_min(1)
    if h_lambda is not None:
        m = m - lam * ((H == 1) | (H >= h_lambda)).to(torch.float32)
    score = m * torch.where(c, 1.0, -1.0)
    if mode == "correct":
        rnd = torch.rand(B, generator=generator, device="cpu" if generator is None else generator.device).to(c.device)
        score = torch.where(c, score, rnd)
    inv, G = group_index(group)
    side = inv * 2 + c.long()  # segment (group, correct?)
    score = torch.where(v, score, torch.full_like(score, -float("inf")))
    rank = rank_in_segment(score, side)
    n_c = segment_stats(c.to(torch.float32), inv, G, v).sum
    n = segment_stats(torch.ones_like(score), inv, G, v).count
    n_w = n - n_c
    K = torch.clamp(n, max=float(keep))
    k_c = torch.minimum(n_c, torch.maximum(torch.ceil(K / 2), K - n_w))
    k_w = K - k_c
    lim = torch.where(c, k_c[inv], k_w[inv])
    return v & (rank.to(torch.float32) < lim)


def oreal_pairs(correct: Tensor, group: Tensor, *, generator: Optional[torch.Generator] = None,
                valid: Optional[Tensor] = None) -> Tensor:
    """OREAL's trajectory filter (arXiv 2502.06781): one correct and one incorrect rollout per prompt.

    Groups whose pass rate is 0 or 1 are dropped; from the others one correct and one incorrect rollout
    are kept, drawn uniformly at random (``generator``). correct: bool [B]; group: long [B]. Returns keep bool [B].
    """
    B = correct.shape[0]
    c = _vec("oreal_pairs: correct", correct).to(torch.bool)
    _vec("oreal_pairs: group", group, B)
    v = torch.ones(B, dtype=torch.bool, device=c.device) if valid is None else _vec("oreal_pairs: valid", valid, B).to(torch.bool)
    inv, G = group_index(group)
    acc = segment_stats(c.to(torch.float32), inv, G, v).mean[inv]
    rnd = torch.rand(B, generator=generator, device="cpu" if generator is None else generator.device).to(c.device)
    rnd = torch.where(v, rnd, torch.full_like(rnd, -1.0))
    rank = rank_in_segment(rnd, inv * 2 + c.long())
    return v & (acc > 0) & (acc < 1) & (rank == 0)
