"""The pass@k advantage: train for the chance that one of k samples is right, not for each sample alone.

Chen et al. (2025), "Pass@k Training for Adaptively Balancing Exploration and Exploitation of Large Reasoning
Models" (arXiv 2508.10751), Sec. "analytical derivation". GRPO's pass@1 advantage pushes every correct sample up
by the same amount and so concentrates the policy on the answer it already finds most often; the pass@k reward
of a k-subset is the max of its members' correctness, which a set of varied attempts earns as well as a set of
copies, and a wrong sample in a group that already holds a right one costs little.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..advantages import register_advantage
from ..batch import TrajectoryBatch, broadcast_to_actions
from ..groups import group_advantages, group_stats
from ..passk import binom_ratio

__all__ = ["pass_at_k_advantage", "pass_at_k_group_advantages"]


def pass_at_k_group_advantages(correct: Tensor, group: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """The analytic pass@k advantage of each sample, float32 [B].

    For a group of N valid samples with c correct (k_g = min(k, N), see below), draw every k_g-subset of the
    group (there are C(N, k_g)); a subset's reward is 1 when it holds a correct sample. Then

        R     = mean reward over the subsets          = 1 - C(N - c, k_g) / C(N, k_g),
        sigma = std (ddof 0) of the subsets' rewards  = sqrt(R (1 - R))          (a 0/1 reward),
        A_pos = (1 - R) / sigma                                                  (a correct sample),
        A_neg = (1 - R - C(N - c - 1, k_g - 1) / C(N - 1, k_g - 1)) / sigma      (an incorrect sample).

    Derivation (the paper's, rebuilt here and checked against enumeration in the tests): a subset's advantage is
    (reward - R) / sigma and a sample's advantage is the mean over the subsets that contain it. Every subset
    holding a correct sample scores 1, hence A_pos. Of the C(N - 1, k_g - 1) subsets holding a given incorrect
    sample, C(N - c - 1, k_g - 1) are all incorrect (score 0) and the rest score 1, hence A_neg.

    sigma = 0 (R is 0 or 1: no correct sample, or every k_g-subset holds one, e.g. all correct or singletons)
    gives 0 to the whole group, as GRPO's all-equal groups. Not in the paper, our choice: a group with fewer
    valid samples than k (a ragged group) uses k_g = N, which makes R 0 or 1 and the group's advantage 0: a
    pass@N reward has one subset, so nothing to compare. Invalid samples get 0 and take no part.

    correct: bool [B]; group: long [B]; valid: bool [B] or None (all). k >= 1.
    """
    if valid is None:
        valid = torch.ones_like(group, dtype=torch.bool)
    st = group_stats(correct.to(torch.float32), group, valid=valid)
    n = st.count.round().long()
    c = (st.mean * st.count).round().long()
    ok = valid & (n >= 1)
    n1 = n.clamp_min(1)
    kg = n1.clamp_max(k)
    # rows outside ``ok`` get harmless stand-in arguments (their advantage is set to 0 below)
    r = 1.0 - binom_ratio(torch.where(ok, n1 - c, n1), n1, kg)
    neg = correct.bool().logical_not() & ok
    miss = binom_ratio(torch.where(neg, n1 - c - 1, 0), torch.where(neg, n1 - 1, 0), torch.where(neg, kg - 1, 0))
    sigma = (r * (1.0 - r)).clamp_min(0.0).sqrt()
    spread = ok & (sigma > 0)
    a = torch.where(neg, 1.0 - r - miss, 1.0 - r) / torch.where(spread, sigma, torch.ones_like(sigma))
    return torch.where(spread, a, torch.zeros_like(a)).to(torch.float32)


@register_advantage("pass_at_k", min_group_size=2)
def pass_at_k_advantage(batch: TrajectoryBatch, *, k: int = 4, pass1_weight: float = 0.0, threshold: float = 0.5,
                        eps: float = 1e-4) -> Tensor:
    """Pass@k training with the analytic advantage (Chen et al., 2025), optionally mixed with GRPO's pass@1.

    A_i = (1 - w) * A^{pass@k}_i + w * A^{GRPO}_i, broadcast to every action of trajectory i, where A^{pass@k}
    is :func:`pass_at_k_group_advantages` on correct_i = (outcome_i >= ``threshold``) (the paper's reward is
    0/1), and A^{GRPO} = (r_i - mean_g r) / (std_g r + eps) on the outcome itself. ``pass1_weight`` w in [0, 1]
    is our addition (the paper trains pure pass@k, then discusses combining the two as advantage design):
    w = 0 is the paper's form. k must not exceed the group size (a group with fewer valid samples uses k = N).

    batch.outcome: float [B]; batch.group: long [B]; batch.mask: bool [B, T]. Returns float [B, T].
    """
    _validate(k=k, pass1_weight=pass1_weight, threshold=threshold, eps=eps)
    valid = batch.valid
    adv = pass_at_k_group_advantages(batch.outcome >= threshold, batch.group, k, valid)
    if pass1_weight > 0:
        g = group_advantages(batch.outcome, batch.group, baseline="mean", scale="group", eps=eps, valid=valid)
        adv = (1.0 - pass1_weight) * adv + pass1_weight * g
    return broadcast_to_actions(adv, batch.mask)


def _validate(*, k: int = 4, pass1_weight: float = 0.0, threshold: float = 0.5, eps: float = 1e-4) -> None:
    """Config-time check of pass_at_k's parameter values (``validate_train_config`` calls it)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"advantage.params.k={k!r}: pass_at_k needs an int >= 1 (k = 1 is pass@1)")
    if not (isinstance(pass1_weight, (int, float)) and 0.0 <= pass1_weight <= 1.0):
        raise ValueError(f"advantage.params.pass1_weight={pass1_weight!r}: must be a number in [0, 1]")
    if not isinstance(threshold, (int, float)) or threshold != threshold:
        raise ValueError(f"advantage.params.threshold={threshold!r}: must be a number (correct: outcome >= it)")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"advantage.params.eps={eps!r}: must be a number >= 0")


pass_at_k_advantage.validate_params = _validate
