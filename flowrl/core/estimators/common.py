"""Helpers the estimators share: returns over actions and steps, present steps, per-step statistics.

Conventions of the step-level estimators:

* **Present steps.** Steps are numbered contiguously from 0 in the order of the actions (``step`` is
  non-decreasing along T, as every rollout here produces it); step s of trajectory i is *present* when
  s <= L_i, the step of i's last valid action (``last_step``). A trajectory with no valid action has no present
  step. Invalid samples (``batch.sample_valid`` False) have none either and take part in no statistic.
* **Probe values.** Estimators built on a probe of the partial trajectory (TurningPoint-GRPO's ODE-completion
  reward, IGPO's answer probability, SPAE's step potential) read ``step_reward[:, k]`` as the probe of the state
  at the **start** of step k (k = 0 is the state before any step). The state after the final step is the
  outcome itself. This keeps n = S exactly and every per-sample quantity inside the batch (no tensors in config
  parameters).

No Python loop runs over samples, groups or tokens; the one loop left is the recurrence over the S steps of a
discounted step return. The only host syncs are the shape of ``torch.unique`` (group and node ids) and
``bool(...)`` checks that raise on bad input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..batch import TrajectoryBatch, gather_steps
from ..groups import group_index, group_step_stats, segment_stats
from ..kernels.scan import masked_discounted_scan
from ..masks import last_valid_index

__all__ = [
    "discounted_returns", "kl_penalty_rewards", "last_step", "present_steps", "to_actions", "step_token_counts",
    "require_step_reward", "require_node", "check_finite_on", "discount_steps", "norm_group_step",
    "norm_group_pooled", "dense_ids", "segment_mean", "f32_zero",
]


# ----------------------------------------------------------------------------- returns over actions
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Return-to-go G_t = sum_{s >= t, mask_s} gamma^{(# valid actions between t and s)} r_s, float [B, T].

    Masked actions (padding, tool observations) neither earn nor discount: the return passes through
    them (as verl's REINFORCE++). Computed by ``kernels.scan.masked_discounted_scan`` (vectorised over time).
    """
    return masked_discounted_scan(rewards, mask, gamma)


def kl_penalty_rewards(batch: TrajectoryBatch, kl_coef: float) -> Tensor:
    """-kl_coef * (old_logp - ref_logp) per action (k1, the in-reward KL of REINFORCE++/PPO): float [B, T]."""
    if kl_coef == 0.0:
        return torch.zeros(batch.mask.shape, device=batch.device)
    if batch.ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs batch.ref_logp (reference log-probs), which is not set")
    diff = torch.sub(batch.ref_logp.to(torch.float32), batch.old_logp.to(torch.float32))
    return diff if kl_coef == 1.0 else diff.mul_(kl_coef)


# ----------------------------------------------------------------------------- steps
def f32_zero(device) -> Tensor:
    """A float32 0-dim zero on ``device`` (the fill value of ``where``)."""
    return torch.zeros((), dtype=torch.float32, device=device)


def last_step(batch: TrajectoryBatch) -> Tensor:
    """L_i: the step index of the last valid action of each trajectory, long [B]; -1 when it has none.

    Steps are numbered in the order of the actions (non-decreasing along T), so this is also the
    largest step index among the valid actions. One read of the mask's bytes (``last_valid_index``).
    """
    last_t = last_valid_index(batch.mask)
    L = torch.gather(batch.step.long(), 1, last_t.clamp_min(0)[:, None])[:, 0]
    return torch.where(last_t >= 0, L, torch.full_like(L, -1))


def to_actions(per_step: Tensor, batch: TrajectoryBatch) -> Tensor:
    """Per-step values float [B, S] on the actions: float [B, T], 0 off ``batch.mask`` (``gather_steps`` with the
    step range that ``validate`` remembered)."""
    return gather_steps(per_step, batch.step, batch.mask, step_range=batch.step_range())


def present_steps(batch: TrajectoryBatch, S: int, last: Optional[Tensor] = None) -> Tensor:
    """bool [B, S]: step s of trajectory i is present (s <= L_i) and sample i is valid (``last``: ``last_step``
    when the caller has it; it costs a pass over the mask)."""
    s = torch.arange(S, device=batch.device)
    last = last_step(batch) if last is None else last
    return (s[None, :] <= last[:, None]) & batch.valid[:, None]


def step_token_counts(step: Tensor, mask: Tensor, S: int) -> Tensor:
    """Number of valid actions in each step: float [B, S] from ``step`` long [B, T] and ``mask`` bool [B, T]."""
    idx = step.long().clamp(0, max(S - 1, 0))
    return torch.zeros(mask.shape[0], S, device=mask.device).scatter_add_(1, idx, mask.to(torch.float32))


def require_step_reward(batch: TrajectoryBatch, name: str) -> Tensor:
    if batch.step_reward is None:
        raise ValueError(f"{name} needs batch.step_reward (float [B, S]), which is not set")
    return batch.step_reward.to(torch.float32)


def check_finite_on(values: Tensor, where: Tensor, name: str, what: str) -> None:
    bad = where & ~torch.isfinite(values)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:8].tolist()
        raise ValueError(f"{name}: {what} is NaN/inf on {int(bad.sum())} present step(s) (first samples {rows}); "
                         "every present step needs a finite value here")


def present_step_values(batch: TrajectoryBatch, name: str, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """The per-step values an estimator reads (``batch.step_reward`` as float32 [B, S]), the last step of each
    trajectory (long [B], ``last_step``) and the present steps (bool [B, S], ``present_steps``); a value that is
    not finite on a present step raises, naming ``name`` and ``what`` the values mean."""
    values = require_step_reward(batch, name)
    last = last_step(batch)
    present = present_steps(batch, values.shape[1], last)
    check_finite_on(values, present, name, what)
    return values, last, present


def discount_steps(r: Tensor, present: Tensor, gamma: float) -> Tensor:
    """G_k = sum_{k' >= k, present} gamma^{k' - k} r_{k'} over steps, float [B, S]; 0 on absent steps.

    A recurrence over the S steps (not over samples).
    """
    r = torch.where(present, r, f32_zero(r.device))
    if gamma == 1.0:
        out = r.flip(1).cumsum(1).flip(1)
    else:
        out = torch.empty_like(r)
        g = torch.zeros(r.shape[0], device=r.device)
        for k in range(r.shape[1] - 1, -1, -1):  # recurrence over steps
            g = r[:, k] + gamma * g
            out[:, k] = g
    return torch.where(present, out, f32_zero(r.device))


def norm_group_step(values: Tensor, group: Tensor, ok: Tensor, eps: float) -> Tensor:
    """(v - mean_{g,s}) / (std_{g,s} + eps) per (group, step) cell over the ``ok`` entries; 0 elsewhere,
    and 0 in cells of one entry or of equal values (as ``stepwise_grpo``)."""
    v = torch.where(ok, values, f32_zero(values.device))
    count, mean, std, constant = group_step_stats(v, group, valid=ok)
    a = (v - mean) / (std + eps)
    return torch.where(ok & ~constant, a, f32_zero(a.device))


def norm_group_pooled(values: Tensor, group: Tensor, ok: Tensor, eps: float, weight: Optional[Tensor] = None) -> Tensor:
    """z-score of ``values`` [B, S] pooled over every ``ok`` entry of a group (all its steps together).

    With ``weight`` [B, S] (e.g. token counts) mean and unbiased variance are weighted: each entry counts
    ``weight`` times (ProRAG's statistics over all valid tokens of the group). Groups whose entries are
    all equal, or that hold a single unit of weight, give 0.
    """
    B, S = values.shape
    inv, G = group_index(group)
    seg = inv[:, None].expand(B, S).reshape(-1)
    v = torch.where(ok, values, f32_zero(values.device)).reshape(-1)
    okf = ok.reshape(-1)
    w = okf.to(torch.float32) if weight is None else torch.where(okf, weight.reshape(-1).to(torch.float32), f32_zero(v.device))
    okf = okf & (w > 0)
    st = segment_stats(v, seg, G, okf)  # min / max for the all-equal test
    n = torch.zeros(G, device=v.device).index_add_(0, seg, w)
    mean = torch.zeros(G, device=v.device).index_add_(0, seg, w * v) / n.clamp_min(1e-12)
    dev = torch.where(okf, v - mean[seg], f32_zero(v.device))
    var = torch.zeros(G, device=v.device).index_add_(0, seg, w * dev * dev) / (n - 1).clamp_min(1e-12)
    std = var.clamp_min(0).sqrt()
    keep = okf & (st.max > st.min)[seg] & (n > 1)[seg]
    a = (v - mean[seg]) / (std[seg] + eps)
    return torch.where(keep, a, f32_zero(v.device)).view(B, S)


def dense_ids(group: Tensor, node: Tensor) -> tuple[Tensor, int]:
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


def segment_mean(values: Tensor, seg: Tensor, K: int, valid: Tensor) -> Tensor:
    """Mean of ``values`` float [N] over the ``valid`` members of each segment ``seg`` long [N] in [0, K): float [K]
    (0 for a segment without one). ``segment_stats`` without the spread, min and max that tree_mc / salt ignore."""
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    cnt = torch.zeros(K, device=values.device).index_add_(0, seg, valid.to(torch.float32))
    tot = torch.zeros(K, device=values.device).index_add_(0, seg, torch.where(valid, values.to(torch.float32), zero))
    return tot / cnt.clamp_min(1)


def require_node(batch: TrajectoryBatch, name: str) -> Tensor:
    if batch.node is None:
        raise ValueError(f"{name} needs batch.node (long [B, S] ids of shared prefixes), which is not set")
    return batch.node


