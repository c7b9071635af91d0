"""A conservative ensemble of reward models: one reward whose score is a pessimistic reduction of several.

Policy optimisation exploits the errors of a learned reward: samples drift to where the reward model is confidently
wrong, and an independent judge stops agreeing. Coste et al. (ICLR 2024, "Reward Model Ensembles Help Mitigate
Overoptimization") optimise a pessimistic reduction of an ensemble instead of one model; with K members scoring
r_k [B] (stacked R [K, B]):

    "min"   r = min_k r_k                                   (worst-case optimisation, WCO)
    "uwo"   r = mean_k r_k - penalty * var_k r_k            (uncertainty-weighted optimisation; population variance)
    "mean"  r = mean_k r_k                                  (the plain ensemble average, for comparison)

A sample then earns reward only where every member agrees it is good, and the members' errors must coincide to be
exploited, which is rarer the more the members differ (another model family, other data). The members should
score on one scale (probabilities, or rewards normalised alike): the reduction compares raw scores.

Config (any registered reward or a reference to the user's code can be a member, with its options)::

    flow:
      rewards:
        digits_conservative:
          type: ensemble
          reduce: min
          members:
            digits: {}                # the CNN classifier's p(d | x)
            digits_gaussian: {}       # a Gaussian generative classifier's p(d | x)

Parts: the score (key: the ensemble's name) and every part of every member, prefixed ``"<name>/"`` (a member's
score appears as ``"<name>/<member name>"``, so each member's mean is logged as a metric). A member that masks a
sample (``on_error: mask``) gives NaN there, and so does the ensemble: give the ensemble ``on_error: mask`` too.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .base import Reward, register_reward
from .build import _entries, build_reward

REDUCTIONS = ("min", "uwo", "mean")


def reduce_ensemble(scores: Tensor, reduce: str, penalty: float = 1.0) -> Tensor:
    """The ensemble score float [B] from the members' scores float [K, B] (formulas in the module docstring).
    NaN in any member gives NaN (``torch.amin`` and ``mean`` propagate it): never a silent pass."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"ensemble scores must be float [K, B] with K >= 1; got {tuple(scores.shape)}")
    if reduce == "min":
        nan = torch.isnan(scores).any(0)
        return torch.where(nan, torch.full_like(scores[0], float("nan")), scores.amin(0))
    mean = scores.mean(0)
    if reduce == "mean":
        return mean
    if reduce == "uwo":
        return mean - float(penalty) * scores.var(0, unbiased=False)
    raise ValueError(f"ensemble: reduce={reduce!r} is not valid; valid values: {list(REDUCTIONS)}")


@register_reward("ensemble")
class EnsembleReward(Reward):
    """Several reward models reduced to one pessimistic score (module docstring: formulas, config, parts).

    ``members``: ``{key: {type: registered name or reference (default: key), **options}}`` (at least two; no
    ``weight``: the reduction, not a weighted sum, combines them). ``reduce``: "min" (default), "uwo" or "mean";
    ``penalty``: the variance weight of "uwo" (>= 0).
    """

    def __init__(self, *, members: Mapping[str, Any], reduce: str = "min", penalty: float = 1.0,
                 name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        entries = self.sub_rewards({"members": members, "reduce": reduce, "penalty": penalty, "name": self.name})
        self.reduce, self.penalty = reduce, float(penalty)
        self.members = {key: build_reward(typ, **cfg) for key, typ, cfg in entries}

    @staticmethod
    def sub_rewards(options: Mapping[str, Any]) -> list[tuple[str, str, dict]]:
        """The members ``[(key, registered name or reference, options)]`` of an ensemble's config ``options``, its
        shape checked (ValueError naming the problem). ``flowrl train --dry-run`` checks each member like a top-level
        reward through this, so a misspelt member fails before any model loads."""
        members, reduce = options.get("members"), options.get("reduce", "min")
        penalty, name = options.get("penalty", 1.0), options.get("name") or "ensemble"
        if reduce not in REDUCTIONS:
            raise ValueError(f"ensemble: reduce={reduce!r} is not valid; valid values: {list(REDUCTIONS)}")
        if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not float(penalty) >= 0.0:
            raise ValueError(f"ensemble: penalty={penalty!r} must be a number >= 0 (it weighs the members' disagreement)")
        if not isinstance(members, Mapping) or len(members) < 2:
            raise ValueError(f"ensemble: give at least two members {{key: {{type, options}}}}; got {members!r}")
        weighted = [k for k, v in members.items() if isinstance(v, Mapping) and "weight" in v]
        if weighted:
            raise ValueError(f"ensemble: members {weighted} have a 'weight'; an ensemble reduces its members' scores "
                             f"with reduce={reduce!r} and takes no weights (weigh the ensemble itself in the rewards table)")
        return [(key, typ, cfg) for key, typ, _, cfg in _entries(members, f"{name}.members")]

    def score(self, samples, prompts, meta):
        parts: dict[str, Tensor] = {}
        scores = []
        for member in self.members.values():  # a handful of reward models, each batched over the samples
            out = member(samples, prompts, meta)
            scores.append(out[member.name])
            for k, v in out.items():
                parts[f"{self.name}/{k}"] = v
        parts[self.name] = reduce_ensemble(torch.stack(scores), self.reduce, self.penalty)
        return parts
