"""Diversity bonuses: a per-sample reward for being different from the other samples of its prompt's group.

GRPO-style training pushes every group toward its best-rewarded mode, and the samples of one prompt collapse
onto a few drawings. A diversity bonus is added to the outcome reward before the advantages, so that within a
group a sample that is far from the others is preferred at equal reward. Every bonus is a pure function

    bonus(features float [B, D], group long [B], reward float [B], **params) -> float [B]

registered by name in :data:`DIVERSITY_BONUSES` and scaled by a weight in the config (``flow.diversity_bonus``,
a list, so several combine by summation). ``features`` are the samples in a feature space
(``flowrl.rewards.features``: pixels, CLIP embeddings). No Python loop over samples or groups.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .diversity import group_index, mean_pairwise_distance
from .registry import Registry

__all__ = ["DIVERSITY_BONUSES", "register_bonus", "diversity_bonus", "pairwise_bonus"]

DIVERSITY_BONUSES = Registry("diversity bonus", skip=3)


def register_bonus(name: str, **meta):
    """Decorator: a diversity bonus ``fn(features, group, reward, **params) -> float [B]``."""
    return DIVERSITY_BONUSES.register(name, **meta)


def diversity_bonus(name: str, features: Tensor, group: Tensor, reward: Tensor, **params) -> Tensor:
    """The bonus registered as ``name`` (parameters checked against its signature), float [B]."""
    DIVERSITY_BONUSES.check_params(name, params)
    out = DIVERSITY_BONUSES[name](features, group, reward, **params)
    if out.shape != group.shape:
        raise ValueError(f"diversity bonus {name!r} returned shape {tuple(out.shape)}; expected {tuple(group.shape)}")
    return out


def _group_mean(x: Tensor, group: Tensor) -> Tensor:
    """mean_{j in g(i)} x_j, float [B]."""
    gi, G = group_index(group)
    s = torch.zeros(G, device=x.device, dtype=x.dtype).index_add_(0, gi, x)
    n = torch.bincount(gi, minlength=G).to(x.dtype)
    return (s / n)[gi]


@register_bonus("pairwise")
def pairwise_bonus(features: Tensor, group: Tensor, reward: Tensor, *, normalize: str = "group",
                   eps: float = 1e-8) -> Tensor:
    """Pairwise-distance bonus: b_i = D_i / s, D_i = mean_{j in g(i), j != i} ||f_i - f_j||_2.

    ``normalize``: "group" (s = mean_{j in g(i)} D_j + eps: b has mean 1 in every group, so the bonus ranks samples
    inside a group whatever the group's spread), "batch" (s = the batch's mean D + eps: a group whose samples are
    all alike gets a small bonus everywhere), or "none" (s = 1). Under GRPO's group standardisation only the
    within-group differences of b matter. A sample alone in its group gets 0. ``reward`` is not used.
    features float [B, D], group long [B] -> float [B].
    """
    D = mean_pairwise_distance(features, group)
    if normalize == "group":
        s = _group_mean(D, group) + eps
    elif normalize == "batch":
        s = D.mean() + eps
    elif normalize == "none":
        s = torch.ones_like(D)
    else:
        raise ValueError(f"pairwise bonus: normalize={normalize!r}; valid: ['group', 'batch', 'none']")
    return D / s
