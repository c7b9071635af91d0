"""The registry of advantage / credit-assignment estimators, and ``compute_advantages``.

Every estimator is a pure function ``fn(batch: TrajectoryBatch, **params) -> float [B, T]``, registered by name
with ``@register_advantage(name, requires=..., min_group_size=...)``; the built-in ones live in
``flowrl.core.estimators`` (outcome, token, step and tree estimators, one module each). ``compute_advantages``
looks one up, checks the batch and the parameter names, and zeroes the result off ``batch.mask``.

Registration metadata:

- ``requires``: the optional ``TrajectoryBatch`` fields the estimator reads (``compute_advantages`` raises a
  clear error when one is None);
- ``min_group_size``: the smallest group for which the estimator's statistic means anything. 2 for an estimator
  that compares the samples of a group (a group of one gets a constant 0 there, so the outcome never reaches the
  policy); 1 for one that needs no group (a critic, a batch baseline). A trainer refuses a smaller group size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .batch import TrajectoryBatch
from .kernels.rows import zero_off_mask_all_finite_
from .masks import and_rows
from .registry import Registry, import_submodules

AdvantageFn = Callable[..., Tensor]


def _load_builtin() -> dict[str, str]:
    return import_submodules("flowrl.core.estimators", exclude=("common",))


ADVANTAGES = Registry("advantage estimator", skip=1, loader=_load_builtin)


def register_advantage(name: str, *, requires: tuple[str, ...] = (), min_group_size: int = 1):
    """Decorator: register ``fn(batch, **params) -> float [B, T]`` under ``name``.

    ``requires`` names the optional ``TrajectoryBatch`` fields the estimator reads (e.g. ``("value",)``);
    ``min_group_size`` is 2 when its statistic compares the samples of a group, 1 otherwise (see the module
    docstring). Registering a taken name with another function is an error.
    """
    if not isinstance(min_group_size, int) or min_group_size < 1:
        raise ValueError(f"register_advantage({name!r}): min_group_size={min_group_size!r}; expected an int >= 1")
    return ADVANTAGES.register(name, requires=tuple(requires), min_group_size=min_group_size)


def get_advantage(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; an unknown name raises ``UnknownNameError`` listing the valid ones."""
    return ADVANTAGES[name]


def min_group_size(name: str) -> int:
    """The smallest group size estimator ``name`` is meaningful for (2 when it compares samples within a group)."""
    return ADVANTAGES.meta(name).get("min_group_size", 1)


def compute_advantages(name: str, batch: TrajectoryBatch, **params) -> Tensor:
    """Advantages float32 [B, T] of estimator ``name`` on ``batch``; exactly 0 where ``batch.mask`` is False
    and on samples whose ``batch.sample_valid`` is False (their actions join no statistic either).

    Raises ``UnknownNameError`` (a KeyError) for an unknown name, listing the registered ones;
    ``ParameterError`` (a TypeError) for an unknown parameter, listing the valid ones; ValueError for a malformed
    batch, a missing field the estimator needs, or a non-finite result.
    """
    fn = ADVANTAGES[name]
    ADVANTAGES.check_params(name, params)
    if not batch.is_validated():  # the trainer validates once per rollout; do not pay for it twice
        batch = batch.validate()
    if batch.sample_valid is not None:  # an invalid sample has no actions: it takes part in no statistic
        batch = batch.with_mask(and_rows(batch.mask, batch.sample_valid))
    for field in ADVANTAGES.meta(name).get("requires", ()):
        if getattr(batch, field) is None or (field == "outcome_parts" and not batch.outcome_parts):
            raise ValueError(f"advantage estimator {name!r} needs batch.{field}, which is not set")
    adv = fn(batch, **params)
    if tuple(adv.shape) != tuple(batch.mask.shape):
        raise ValueError(f"advantage estimator {name!r} returned shape {tuple(adv.shape)}; expected [B, T] = {tuple(batch.mask.shape)}")
    adv, ok = zero_off_mask_all_finite_(adv.to(torch.float32), batch.mask)
    if not ok:
        raise ValueError(f"advantage estimator {name!r} produced NaN or inf; check its inputs (rewards, values, log-probs)")
    return adv
