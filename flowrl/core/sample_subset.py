"""Sample selectors: which samples of each prompt's group a rollout trains on.

Sampling more per prompt than is trained on lets a method choose the group it learns from. A selector is a pure
function

    select(reward float [B], group long [B], features float [B, D] or None, *, keep: int, **params) -> bool [B]

registered by name in :data:`SAMPLE_SELECTORS` (the config's ``flow.sample_subset: {name, keep, ...params}``).
It keeps at most ``keep`` samples of each group among the ``valid`` ones (:func:`select_samples` never keeps
an invalid sample, and keeps every valid one of a group that has ``keep`` or fewer). The flow task marks the
others invalid (``TrajectoryBatch.sample_valid`` False), so they leave the loss and the group statistics of the
advantage alike: a group's mean and standard deviation are those of its kept samples. No Python loop over
samples or groups: groups are padded to the largest one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .diversity_bonus import pad_groups
from .registry import Registry

__all__ = ["SAMPLE_SELECTORS", "register_selector", "select_samples", "drift_subset", "top_subset"]

SAMPLE_SELECTORS = Registry("sample selector", skip=3)


def register_selector(name: str, **meta):
    """Decorator: a sample selector ``fn(reward, group, features, *, keep, **params) -> bool [B]``."""
    return SAMPLE_SELECTORS.register(name, **meta)


def select_samples(name: str, reward: Tensor, group: Tensor, features: Optional[Tensor] = None, *, keep: int,
                   valid: Optional[Tensor] = None, **params) -> Tensor:
    """The selector registered as ``name`` (parameters checked), restricted to ``valid`` samples: bool [B]."""
    SAMPLE_SELECTORS.check_params(name, {"keep": keep, **params})
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"sample selector {name!r}: keep={keep!r}; must be an int >= 1")
    if valid is None:
        valid = torch.ones_like(group, dtype=torch.bool)
    # an invalid sample's reward is meaningless: it becomes -inf, which no selector ranks into a window of
    # finite rewards, and it is masked out below whatever the selector did with it
    r = torch.where(valid, reward.float(), torch.full_like(reward, float("-inf"), dtype=torch.float32))
    out = SAMPLE_SELECTORS[name](r, group, features, keep=keep, **params)
    if out.shape != group.shape or out.dtype != torch.bool:
        raise ValueError(f"sample selector {name!r} returned {out.dtype} {tuple(out.shape)}; expected bool {tuple(group.shape)}")
    return out & valid


def _sorted_groups(reward: Tensor, group: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(sorted rewards [G, m] ascending with invalid (-inf) first and padding last (+inf), their padded
    positions [G, m], index of the first finite reward per group [G], number of finite rewards nv [G],
    kk = min(keep, nv) [G], (gi, pos) of each sample)."""
    R, valid, gi, pos = pad_groups(reward[:, None], group)
    R = torch.where(valid, R[..., 0], torch.full_like(R[..., 0], float("inf")))
    s, idx = R.sort(dim=1, stable=True)
    finite = torch.isfinite(s)
    nv = finite.sum(1)
    lo = (s == float("-inf")).sum(1)  # invalid samples sort first
    kk = torch.minimum(torch.full_like(nv, keep), nv)
    return s, idx, lo, nv, kk, torch.stack([gi, pos])


def _window(s: Tensor, idx: Tensor, start: Tensor, kk: Tensor, gp: Tensor) -> Tensor:
    """bool [B]: the samples at sorted positions start_g .. start_g + kk_g - 1 of each group."""
    G, m = s.shape
    j = torch.arange(m, device=s.device)[None, :]
    inwin = (j >= start[:, None]) & (j < (start + kk)[:, None])
    keep_pad = torch.zeros(G, m, dtype=torch.bool, device=s.device)
    keep_pad.scatter_(1, idx, inwin)
    return keep_pad[gp[0], gp[1]]


@register_selector("drift")
def drift_subset(reward: Tensor, group: Tensor, features: Optional[Tensor], *, keep: int) -> Tensor:
    """DRIFT's reward-concentrated subset (Liu et al., 2026, "Beyond the Dirac Delta", ICML): sample N per prompt
    and train on ``keep`` of them whose rewards are concentrated, so that reward outliers (a lucky best sample
    that the whole group would otherwise be pulled toward, or a failed one) do not drive a premature collapse.

    The paper's abstract gives the aim ("a reward-concentrated subset that filters out reward outliers"), not the
    rule; flowrl's choice: in each group, sort the rewards and keep the window of ``keep`` consecutive sorted
    samples with the smallest range max - min; among equally tight windows, the one with the highest rewards
    (the subset concentrates on high reward). Diversity is kept by the other half of DRIFT, the
    ``drift_potential`` bonus, computed on the kept samples. ``features`` is not used. -> bool [B].
    """
    s, idx, lo, nv, kk, gp = _sorted_groups(reward, group, keep)
    G, m = s.shape
    j = torch.arange(m, device=s.device)[None, :]
    last = (j + kk[:, None] - 1).clamp(max=m - 1)
    spread = s.gather(1, last) - s  # range of the window starting at sorted position j
    ok = (j >= lo[:, None]) & (j + kk[:, None] <= (lo + nv)[:, None])
    spread = torch.where(ok, spread, torch.full_like(spread, float("inf")))
    # ties to the highest window: argmin over the reversed positions finds the last minimum
    start = (m - 1) - spread.flip(1).argmin(1)
    start = torch.where(kk > 0, start, lo)
    return _window(s, idx, start, kk, gp)


@register_selector("top")
def top_subset(reward: Tensor, group: Tensor, features: Optional[Tensor], *, keep: int) -> Tensor:
    """The ``keep`` highest rewards of each group (best-of-N; a contrast to ``drift``, which drops the top
    outliers too). ``features`` is not used. -> bool [B]."""
    s, idx, lo, nv, kk, gp = _sorted_groups(reward, group, keep)
    return _window(s, idx, lo + nv - kk, kk, gp)
