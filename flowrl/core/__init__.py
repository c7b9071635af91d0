"""The shared trajectory/advantage core: torch only, no model libraries (on CPU, ``native`` adds fused C
kernels for the token-level passes, built on first use with the system compiler; without one, the torch path).

Import what you need from here: the data contract, group statistics, the estimator and loss
registries, shapers and filters.
"""
from .batch import TrajectoryBatch, broadcast_to_actions, gather_steps
from .groups import group_advantages, group_stats, group_step_stats, masked_whiten, segment_stats
from .advantages import ADVANTAGES, compute_advantages, register_advantage, get_advantage
from .losses import (
    AGG_MODES, LOSSES, aggregate, compute_policy_loss, importance_weights, kl_estimate, register_loss,
)
from .shaping import accuracy_band_filter, soft_overlong_penalty, weighted_sum, zero_variance_filter
from . import credit  # noqa: F401  (registers the step-level credit estimators)
from . import losses_extra  # noqa: F401  (registers oreal, pacs, etr)

__all__ = [
    "TrajectoryBatch", "broadcast_to_actions", "gather_steps",
    "group_advantages", "group_stats", "group_step_stats", "masked_whiten", "segment_stats",
    "ADVANTAGES", "compute_advantages", "register_advantage", "get_advantage",
    "AGG_MODES", "LOSSES", "aggregate", "compute_policy_loss", "importance_weights", "kl_estimate", "register_loss",
    "accuracy_band_filter", "soft_overlong_penalty", "weighted_sum", "zero_variance_filter",
]
