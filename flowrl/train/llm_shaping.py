"""Shapers of an LLM rollout's rewards before the advantage: found by name (``llm.shaping``) in :data:`SHAPERS`.

A shaper is a function ``fn(x: ShapingInput, **params) -> Shaped`` registered with
``@register_shaper(name, needs_process_reward=...)``; ``llm.shaping_params`` are its keyword parameters,
checked against its signature when the config is read. It returns the (possibly changed) outcome and the
rows to keep (a dropped row leaves the loss and the group statistics); the task counts the kept fraction
in ``shaping/kept_frac``. A new shaper is one function here or in a user's module, plus a YAML that names it.

The process score of a completion is the mean of its finite step scores,
``p_i = (1 / |S_i|) sum_{s in S_i} r_{i,s}`` with ``S_i`` the scored steps; a completion with no scored step
(only an answer line) has ``p_i = 0`` (it contains no right step) and is counted in ``shaping/no_step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from flowrl.core import accuracy_band_filter, posterior_gate, prof_filter, trust_weight
from flowrl.core.registry import Registry

SHAPERS: Registry = Registry("llm shaper", skip=1)


@dataclass
class ShapingInput:
    """What a shaper reads, for ``B`` rows of one rank (whole groups).

    outcome: float [B]; correct: bool [B]; valid: bool [B] (the reward could be computed);
    group: long [B]; step_reward: float [B, S] or None (NaN where a step has no score);
    process: float [B] or None, the mean step score ``p_i`` (module docstring); iteration: the training
    iteration; group_size: samples per prompt.
    """

    outcome: Tensor
    correct: Tensor
    valid: Tensor
    group: Tensor
    step_reward: Optional[Tensor]
    process: Optional[Tensor]
    iteration: int
    group_size: int


class Shaped(NamedTuple):
    """A shaper's result: outcome float [B], keep bool [B], metrics."""

    outcome: Tensor
    keep: Tensor
    metrics: dict[str, float]


def register_shaper(name: str, *, needs_process_reward: bool = False) -> Callable:
    """Decorator: register ``fn(x: ShapingInput, **params) -> Shaped`` as ``llm.shaping: name``. With
    ``needs_process_reward`` a config that names it must set ``llm.process_reward``."""
    return SHAPERS.register(name, needs_process_reward=needs_process_reward)


def process_score(step_reward: Tensor) -> tuple[Tensor, Tensor]:
    """(p float [B], has bool [B]): the mean finite step score of each row, 0 where no step is scored
    (module docstring); ``has`` marks the rows with at least one scored step. step_reward: float [B, S]."""
    fin = torch.isfinite(step_reward)
    has = fin.any(dim=1)
    mean = torch.nan_to_num(step_reward, nan=0.0).sum(1) / fin.sum(1).clamp_min(1)
    return torch.where(has, mean, torch.zeros_like(mean)), has


def _all(x: ShapingInput) -> Tensor:
    return torch.ones_like(x.valid)


@register_shaper("prof", needs_process_reward=True)
def prof(x: ShapingInput, *, keep: Optional[int] = None, mode: str = "both", lam: float = 0.0,
         h_lambda: Optional[int] = None) -> Shaped:
    """PROF's process-outcome consistency filter (arXiv 2509.03403), :func:`flowrl.core.prof_filter`.

    Per group, correct rows are ranked by their mean step score (highest first) and incorrect rows by the
    lowest, and ``keep`` rows are kept, balanced between the two sides (default ``max(1, G // 2)``). A row with
    no scored step is ranked with a first step score of 0.
    """
    sr = x.step_reward.clone()
    sr[:, 0] = torch.where(torch.isfinite(sr).any(dim=1), sr[:, 0], torch.zeros_like(sr[:, 0]))
    k = max(1, x.group_size // 2) if keep is None else int(keep)
    kept = prof_filter(x.correct, sr, x.group, keep=k, mode=mode, lam=lam, h_lambda=h_lambda, valid=x.valid)
    return Shaped(x.outcome, kept, {})


@register_shaper("posterior_gate", needs_process_reward=True)
def posterior_gate_shaper(x: ShapingInput, *, coef: float = 1.0) -> Shaped:
    """Posterior-GRPO's gate (arXiv 2508.05170), :func:`flowrl.core.posterior_gate`: the process score only for
    correct rows, R_i = r_i + coef * 1[correct_i] * p_i (invalid rows keep their outcome)."""
    o = torch.where(x.valid, x.outcome, torch.zeros_like(x.outcome))
    out = torch.where(x.valid, posterior_gate(o, x.process, x.correct, coef=coef), x.outcome)
    return Shaped(out, _all(x), {})


@register_shaper("trust_weight", needs_process_reward=True)
def trust_weight_shaper(x: ShapingInput, *, alpha: float = 0.3, anneal_steps: float = 500.0, low: float = 0.1,
                        high: float = 0.9) -> Shaped:
    """Trust-GRPO's weighted thinking reward (SophiaVL-R1, arXiv 2505.17018), :func:`flowrl.core.trust_weight`:
    R_i = r_i + w_i * p_i with w_i = gamma_{g(i)} * alpha * exp(-iteration / anneal_steps), gamma_g = 0 outside
    the accuracy band (low, high), 1 where correct rows think no worse than wrong ones, else exp(mu_c - mu_w)."""
    w = trust_weight(x.correct, x.process, x.group, step=float(x.iteration), alpha=alpha, anneal_steps=anneal_steps,
                     low=low, high=high)
    return Shaped(x.outcome + w * x.process, _all(x), {"shaping/trust_weight_mean": float(w.mean())})


@register_shaper("accuracy_band")
def accuracy_band(x: ShapingInput, *, low: float = 0.2, high: float = 0.8) -> Shaped:
    """PRIME's online prompt filter (Cui et al., 2025), :func:`flowrl.core.accuracy_band_filter`: keep the groups
    whose accuracy acc_g = mean_{j in g} correct_j lies in [low, high]."""
    return Shaped(x.outcome, accuracy_band_filter(x.correct, x.group, low=low, high=high, valid=x.valid), {})


def check_shaping(name: str, params: dict, *, key: str = "llm.shaping") -> None:
    """Raise ValueError naming ``key`` when ``name`` is not a registered shaper (listing the valid ones) or
    ``params`` holds a keyword it does not take."""
    if name not in SHAPERS:
        raise ValueError(f"{key}={name!r} is not a registered shaper; valid: {SHAPERS.names()}")
    try:
        SHAPERS.check_params(name, params)
    except ValueError as e:
        raise ValueError(f"{key}_params: {e}") from None


def shape(name: str, params: dict, x: ShapingInput) -> Shaped:
    """Apply shaper ``name`` with ``params`` to ``x``."""
    return SHAPERS.build(name, x, **params)
