"""Outcome estimators: one advantage per trajectory from its outcome reward, broadcast to every action.

A_i compares r_i with the other samples of its group (GRPO, Dr.GRPO, RLOO, GDPO) or with the group mean and then
the whole batch (REINFORCE++-baseline). Each of them compares samples within a group, so each is registered with
``min_group_size=2``: a group of one gets a constant 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..advantages import register_advantage
from ..batch import TrajectoryBatch, broadcast_to_actions
from ..groups import group_advantages, masked_whiten, whiten_rows
from ..masks import row_counts

__all__ = ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gdpo"]


@register_advantage("grpo", min_group_size=2)
def grpo(batch: TrajectoryBatch, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al., 2024, DeepSeekMath).

    A_i = (r_i - mean_{g(i)} r) / (std_{g(i)} r + eps), broadcast to every action of trajectory i.
    ``scale="batch"`` divides by the std of the whole batch's rewards instead (TRL's scale_rewards),
    ``scale="none"`` by nothing. Unbiased std; singleton and all-equal groups get 0.

    batch.outcome: float [B]; batch.group: long [B]; batch.mask: bool [B, T]. Returns float [B, T].
    """
    adv = group_advantages(batch.outcome, batch.group, baseline="mean", scale=scale, eps=eps, valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


@register_advantage("dr_grpo", min_group_size=2)
def dr_grpo(batch: TrajectoryBatch) -> Tensor:
    """Dr.GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training").

    A_i = r_i - mean_{g(i)} r (no division by the std), broadcast to the actions. Pair it with the
    ``seq_mean_token_sum_norm`` aggregation (constant normaliser) to remove the length bias as well.

    Returns float [B, T].
    """
    adv = group_advantages(batch.outcome, batch.group, baseline="mean", scale="none", valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


@register_advantage("rloo", min_group_size=2)
def rloo(batch: TrajectoryBatch) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al., 2024).

    A_i = r_i - (1 / (n_g - 1)) * sum_{j in g(i), j != i} r_j, broadcast to every action of trajectory i.
    A group of one sample gets 0.

    batch.outcome: float [B]; batch.group: long [B]; batch.mask: bool [B, T]. Returns float [B, T].
    """
    adv = group_advantages(batch.outcome, batch.group, baseline="loo", scale="none", valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


@register_advantage("reinforce_pp_baseline", min_group_size=2)
def reinforce_pp_baseline(batch: TrajectoryBatch, *, eps: float = 1e-8) -> Tensor:
    """REINFORCE++-baseline (Hu, 2025): the group mean as baseline, then whitening over the batch.

    A_{i,t} = whiten_B(r_i - mean_{g(i)} r), where whitening runs over every valid action of the (global)
    batch (so longer completions weigh more, as in verl/OpenRLHF). The KL term goes into the loss.

    Returns float [B, T].
    """
    centred = group_advantages(batch.outcome, batch.group, baseline="mean", scale="none", valid=batch.valid)
    # row-constant: whitened over the valid actions exactly in [B] (token-weighted), then one broadcast
    return broadcast_to_actions(whiten_rows(centred, row_counts(batch.mask), eps=eps), batch.mask)


@register_advantage("gdpo", requires=("outcome_parts",), min_group_size=2)
def gdpo(batch: TrajectoryBatch, *, weights: dict[str, float] | None = None, eps: float = 1e-4) -> Tensor:
    """GDPO (group reward-decoupled normalisation for multi-reward RL; TRL's ``normalize_then_sum``).

    For each named part k: A^k_i = (r^k_i - mean_{g(i)} r^k) / (std_{g(i)} r^k + eps); then
    A_i = whiten_B(sum_k w_k A^k_i) over the batch's valid samples, broadcast to the actions.
    ``weights`` maps part names to w_k (default 1 each); a name that is not a part is an error.

    batch.outcome_parts: dict[str, float [B]]. Returns float [B, T].
    """
    parts = batch.outcome_parts
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(parts))
    if unknown:
        raise KeyError(f"gdpo: weights name unknown reward part(s) {unknown}; parts are {sorted(parts)}")
    total = torch.zeros(batch.batch_size, device=batch.device)
    for k, r in parts.items():  # a loop over reward parts (a handful), not samples
        total = total + weights.get(k, 1.0) * group_advantages(r, batch.group, valid=batch.valid, eps=eps)
    whitened = masked_whiten(total, batch.valid)
    return broadcast_to_actions(whitened, batch.mask)
