"""``llm_grpo``: the GRPO family on token rollouts (Shao et al., 2024, DeepSeekMath, and its descendants).

Everything that varies is config over the shared LLM family (:class:`LLMAlgorithm`): the estimator
(``advantage.estimator``: grpo, dr_grpo, rloo, reinforce_pp, dual_level, ...), the loss (``loss.name``: ppo_clip
with clip-higher / dual-clip, gspo, ...), several updates per rollout (``updates_per_rollout`` x
``minibatches``), the KL to the reference in the loss (``loss.kl_beta``) or the reward (``llm.kl_in_reward``),
DAPO's dynamic sampling, overlong penalty and truncation mask, process rewards and shapers (``llm``).
For every prompt, G completions o_1..o_G are sampled and the default objective is

    L = -agg_{i,t} min(rho_{i,t} A_{i,t}, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t}) + beta * agg KL_t,
    rho_{i,t} = pi_theta(o_{i,t} | o_{i,<t}) / pi_old(o_{i,t} | o_{i,<t}).
"""
from __future__ import annotations

from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.llm_base import LLMAlgorithm


@register_algorithm("llm_grpo")
class LLMGRPO(LLMAlgorithm):
    """GRPO and its variants on an LLM: the family's defaults, nothing added (see the module docstring)."""
