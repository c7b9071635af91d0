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
from ..groups import all_reduce_sum, group_advantages, masked_whiten, use_distributed, whiten_rows
from ..masks import and_rows, row_counts

__all__ = ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gdpo", "grpo_per_reward", "per_reward_advantages",
           "population_std", "GRPO_SCALES"]

GRPO_SCALES = ("group", "batch", "global_std", "none")


@register_advantage("grpo", min_group_size=2)
def grpo(batch: TrajectoryBatch, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al., 2024, DeepSeekMath).

    A_i = (r_i - mean_{g(i)} r) / (s + eps), broadcast to every action of trajectory i, where ``scale`` picks s:
    "group": std_{g(i)} r, the group's unbiased std (GRPO);
    "batch": the unbiased std of every valid reward of the (global) batch (TRL's ``scale_rewards="batch"``);
    "global_std": the population std (ddof 0, numpy's ``np.std``) of every valid reward of the (global) batch:
    Flow-GRPO's ``global_std=True``, which its SD3 configs set (reference: yifan123/flow_grpo/flow_grpo/
    stat_tracking.py, ``PerPromptStatTracker.update``: group mean, ``np.std(rewards)`` over the gathered epoch,
    eps 1e-4);
    "none": s = 1 and no eps (Dr.GRPO).
    Singleton and all-equal groups get 0.

    batch.outcome: float [B]; batch.group: long [B]; batch.mask: bool [B, T]. Returns float [B, T].
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo: advantage.params.scale={scale!r}; valid values are {GRPO_SCALES}")
    if scale == "global_std":
        centred = group_advantages(batch.outcome, batch.group, baseline="mean", scale="none", valid=batch.valid)
        adv = centred / (population_std(batch.outcome, batch.valid) + eps)
    else:
        adv = group_advantages(batch.outcome, batch.group, baseline="mean", scale=scale, eps=eps, valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


def _grpo_validate_params(*, scale: str = "group", eps: float = 1e-4) -> None:
    """Config-time check of grpo's parameter values (``validate_train_config`` calls it)."""
    if scale not in GRPO_SCALES:
        raise ValueError(f"advantage.params.scale={scale!r}: valid values for grpo are {GRPO_SCALES}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"advantage.params.eps={eps!r}: must be a number >= 0")


grpo.validate_params = _grpo_validate_params


def population_std(values: Tensor, valid: Tensor) -> Tensor:
    """sqrt(sum_i (v_i - mean)^2 / N) over the N valid entries of ``values`` float [B] (the global batch when
    distributed): a 0-dim tensor, ddof 0 as numpy's ``np.std``. Two passes (mean, then squared deviations)."""
    v = values.to(torch.float32)
    zero = torch.zeros((), device=v.device)
    stats = torch.stack([valid.to(torch.float32).sum(), torch.where(valid, v, zero).sum()])
    dist = use_distributed(None)
    if dist:
        stats = all_reduce_sum(stats)
    n = stats[0].clamp_min(1)
    ss = torch.where(valid, (v - stats[1] / n) ** 2, zero).sum()
    if dist:
        ss = all_reduce_sum(ss)
    return (ss / n).sqrt()


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

    Not DanceGRPO's multi-reward form: the batch whitening of the sum rescales it (by about 1/sqrt(K) for K
    independent parts) and one loss sees the sum; DanceGRPO's is ``grpo_per_reward``.

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


def per_reward_advantages(batch: TrajectoryBatch, *, weights: dict[str, float] | None = None,
                          eps: float = 1e-8) -> dict[str, tuple[float, Tensor]]:
    """DanceGRPO's advantages of several rewards: each reward part normalised in its group on its own.

    A^k_i = (r^k_i - mean_{g(i)} r^k) / (std_{g(i)} r^k + eps) (unbiased std, as torch's ``.std()``; eps 1e-8 as
    the reference), broadcast to the actions of trajectory i; no second normalisation. Returns
    {k: (w_k, A^k float [B, T])} in the order of ``batch.outcome_parts``; ``weights`` maps part names to w_k
    (default 1 each; a name that is not a part is an error). Samples with ``sample_valid`` False take part in no
    statistic and get 0 (the same as ``compute_advantages``). Reference: XueZeyue/DanceGRPO/fastvideo/
    train_grpo_hunyuan.py (``vq_advantages`` / ``mq_advantages``, each its own clipped loss, ``vq_coef``,
    ``mq_coef``).

    batch.outcome_parts: dict[str, float [B]]; batch.group: long [B]; batch.mask: bool [B, T].
    """
    parts = batch.outcome_parts
    if not parts:
        raise ValueError("per_reward_advantages needs batch.outcome_parts (the named rewards), which is empty")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(parts))
    if unknown:
        raise KeyError(f"grpo_per_reward: weights name unknown reward part(s) {unknown}; parts are {sorted(parts)}")
    valid = batch.valid
    mask = and_rows(batch.mask, valid)
    out = {}
    for k, r in parts.items():  # a loop over reward parts (a handful), not samples
        a = group_advantages(r, batch.group, baseline="mean", scale="group", eps=eps, valid=valid)
        out[k] = (float(weights.get(k, 1.0)), broadcast_to_actions(a, mask))
    return out


@register_advantage("grpo_per_reward", requires=("outcome_parts",), min_group_size=2)
def grpo_per_reward(batch: TrajectoryBatch, *, weights: dict[str, float] | None = None, eps: float = 1e-8) -> Tensor:
    """DanceGRPO with several rewards (Xue et al., 2025): A_i = sum_k w_k A^k_i, each A^k normalised in its group
    on its own (``per_reward_advantages``), with no whitening of the sum.

    DanceGRPO gives each A^k its own clipped loss, L = sum_k w_k L_clip(A^k). An algorithm that trains per-reward
    losses (``dance_grpo``) reads the columns through this function's ``columns`` attribute
    (= ``per_reward_advantages``); any other trains one loss on this sum, which has the same gradient while
    every ratio is inside the clip range. With one reward it is GRPO with eps 1e-8.

    batch.outcome_parts: dict[str, float [B]]. Returns float [B, T].
    """
    cols = per_reward_advantages(batch, weights=weights, eps=eps)
    total = torch.zeros_like(batch.mask, dtype=torch.float32)
    for w, a in cols.values():
        total = total + w * a
    return total


grpo_per_reward.columns = per_reward_advantages  # the per-reward advantage columns (see the docstring)
