"""Reward shapers and sample filters that act before the advantage estimator.

Shapers map rewards to rewards (float [B]); filters return a keep-mask bool [B] that the trainer
applies with ``TrajectoryBatch.select`` (and counts in its metrics). All group logic goes through
``groups.segment_stats``: no loops over samples or groups.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .groups import group_index, group_stats, segment_stats


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

from .process_shaping import *  # noqa: E402,F401,F403  (issue 3: process shapers, gates, filters, schedules)
