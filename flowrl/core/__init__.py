"""The shared trajectory/advantage core: torch only, no model libraries.

Import what you need from here: the data contract (``TrajectoryBatch``), group statistics, the estimator and
loss registries, shapers, gates, filters and schedules. The layout, by concept:

- ``batch``, ``masks``, ``groups``: the data contract, mask reductions, group statistics (exact across ranks);
- ``advantages``: the estimator registry and ``compute_advantages``; ``estimators/``: the built-in estimators
  (outcome, token, step and tree credit), each written as its formula;
- ``losses``: policy losses, KL estimators, aggregation, importance weights;
- ``shaping``, ``schedules``: reward shapers, gates and filters; weight schedules;
- ``kernels/``: the fast paths behind the formulas (fused C kernels on CPU, built on first use with the system
  compiler; matrix-product scans), chosen per call by ``kernels.use_native``;
- ``registry``, ``dtypes``: the one registry type and the one dtype map.
"""
from . import estimators  # noqa: F401  (the built-in estimators register themselves)
from .advantages import ADVANTAGES, compute_advantages, get_advantage, min_group_size, register_advantage
from .batch import TrajectoryBatch, broadcast_to_actions, gather_steps
from .estimators.step import turning_point_rewards
from .estimators.token import gae_advantages_and_returns, implicit_prm_loss
from .groups import group_advantages, group_stats, group_step_stats, masked_whiten, segment_stats
from .kernels import native
from .losses import (
    AGG_MODES, LOSSES, aggregate, compute_policy_loss, importance_weights, kl_estimate, masked_mean,
    oreal_token_rm_loss, oreal_token_weights, register_loss,
)
from .registry import ParameterError, UnknownNameError
from .schedules import SCHEDULES, schedule
from .shaping import (
    accuracy_band_filter, clip_delta, gated_accumulation, oreal_pairs, partial_credit, posterior_gate, prof_filter,
    renorm, rubric_gate, soft_overlong_penalty, trust_weight, weighted_sum, weighted_tests, zero_variance_filter,
)

__all__ = [
    "TrajectoryBatch", "broadcast_to_actions", "gather_steps",
    "group_advantages", "group_stats", "group_step_stats", "masked_whiten", "segment_stats",
    "ADVANTAGES", "compute_advantages", "register_advantage", "get_advantage", "min_group_size",
    "turning_point_rewards", "implicit_prm_loss", "gae_advantages_and_returns",
    "AGG_MODES", "LOSSES", "aggregate", "compute_policy_loss", "importance_weights", "kl_estimate", "masked_mean",
    "register_loss", "oreal_token_rm_loss", "oreal_token_weights",
    "accuracy_band_filter", "soft_overlong_penalty", "weighted_sum", "zero_variance_filter", "clip_delta", "renorm",
    "posterior_gate", "rubric_gate", "gated_accumulation", "trust_weight", "partial_credit", "weighted_tests",
    "prof_filter", "oreal_pairs", "SCHEDULES", "schedule",
    "UnknownNameError", "ParameterError", "native",
]
