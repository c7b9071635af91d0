"""DanceGRPO (Xue et al., 2025, "DanceGRPO: Unleashing GRPO on Visual Generation").

Flow-GRPO's objective with DanceGRPO's rollout settings, all of them config keys the task reads: the
constant-noise SDE (``flow.kind: dance_sde``), one initial noise per prompt's group
(``flow.same_noise_per_prompt``), a random fraction of the denoising steps trained per iteration
(``flow.timestep_fraction``), and rewards combined at the advantage level (``advantage.estimator: gdpo``).
Recipe: ``configs/digits/dance_grpo.yaml``.
"""
from __future__ import annotations

from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm


@register_algorithm("dance_grpo")
class DanceGRPO(FlowAlgorithm):
    """DanceGRPO: the flow base's hooks; its differences are rollout settings in the config."""
