"""Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL").

SDE rollouts (``flow.kind: flow_sde``), one action per trained denoising step with the kernel's Gaussian
log-prob, group-relative advantages of the outcome reward (``advantage.estimator: grpo``), per-step PPO-clip on
the recomputed log-probs with an optional KL to the reference (``loss.kl_beta``). Every hook is the
:class:`FlowAlgorithm` default. Recipe: ``configs/digits/flow_grpo.yaml``.
"""
from __future__ import annotations

from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm


@register_algorithm("flow_grpo")
class FlowGRPO(FlowAlgorithm):
    """Flow-GRPO: the flow base's defaults (SDE rollouts, outcome reward, per-step PPO)."""
