"""The base of every flow-model algorithm: the hooks :class:`flowrl.train.flow_task.FlowTask` calls, with the
defaults that make plain Flow-GRPO.

A flow algorithm is a subclass of :class:`FlowAlgorithm` registered with ``@register_algorithm("name")``. The
task does the plumbing (prompts, SDE rollouts through the sampler, outcome rewards, the TrajectoryBatch,
evaluation, export) and asks the algorithm

- ``validate_config(cfg)``: cross-field checks before any model loads (the base checks ``flow.model`` and
  guidance; subclasses call ``super().validate_config(cfg)`` and add theirs);
- ``needs_reference(cfg)``: keep a reference policy (a frozen copy, or the model with LoRA disabled);
- ``uses_guidance(cfg)``: steer rollouts with the process reward's gradient (``flow.guidance``);
- ``setup(task)``: once, when the task has built its model and rewards (a critic, an optimiser);
- ``step_rewards(task, traj, steps, prompts)``: ``batch.step_reward`` float [b, T] or None;
- ``prepare_update(task, rollout, batch, adv, it)``: before the updates (train a critic; new advantages);
- ``backward(task, rollout, index, batch, adv, it)``: one minibatch's loss, backpropagated. The default is the
  per-step PPO objective on the recomputed kernel log-probs (:func:`flowrl.train.algorithms.flow_ppo.ppo_backward`);
- ``state_dict()`` / ``load_state_dict(state)``: the algorithm's own state in checkpoints.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from flowrl.train.algorithms.base import Algorithm
from flowrl.train.algorithms.flow_ppo import ppo_backward

if TYPE_CHECKING:  # types only
    from flowrl.core import TrajectoryBatch
    from flowrl.flow.sampler import FlowTrajectory
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import Rollout


class FlowAlgorithm(Algorithm):
    """A training algorithm for flow-matching models (see the module docstring). Plain, it is Flow-GRPO."""

    family = "flow"
    # whether the hooks take each sample's own trained steps (``steps`` long [B, T], flow.timestep_subset: sample)
    per_sample_steps: bool = False

    # ------------------------------------------------------------------ config-time hooks
    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        from flowrl.pipelines.registry import PIPELINES, pipeline_names
        from flowrl.rewards.build import check_process_reward_spec, check_reward_spec

        fc = cfg.flow
        check_reward_spec(fc.rewards, key="flow.rewards")  # references to the user's code: read, not imported
        check_process_reward_spec(fc.process_reward, key="flow.process_reward")
        if fc.model not in PIPELINES or PIPELINES.meta(fc.model).get("family") != "flow":
            raise ValueError(f"flow.model={fc.model!r} is not a registered flow model adapter; valid: "
                             f"{pipeline_names('flow')}")
        if cls.uses_guidance(cfg) and not fc.process_reward:
            raise ValueError("flow.guidance.enabled needs flow.process_reward (the model whose gradient steers)")
        if fc.timestep_subset == "sample" and fc.timestep_fraction < 1.0 and not cls.per_sample_steps:
            raise ValueError(f"flow.timestep_subset=sample: algorithm {cls.name!r} trains one set of steps for the whole "
                             "batch; use flow.timestep_subset=batch (per-sample subsets: dance_grpo)")
        from flowrl.train.flow_diversity import check_diversity_config

        check_diversity_config(fc, cfg.group_size)
        if fc.kl_weight.get("name") != "uniform" and not cfg.loss.kl_beta > 0:
            raise ValueError(f"flow.kl_weight={fc.kl_weight} has no effect with loss.kl_beta={cfg.loss.kl_beta}: set "
                             "loss.kl_beta > 0 or leave flow.kl_weight {name: uniform}")
        if fc.kl_form != "true_kl" and not cfg.loss.kl_beta > 0:
            raise ValueError(f"flow.kl_form={fc.kl_form!r} has no effect with loss.kl_beta={cfg.loss.kl_beta}: set "
                             "loss.kl_beta > 0 or leave flow.kl_form 'true_kl'")

    @classmethod
    def uses_guidance(cls, cfg: Any) -> bool:
        """Whether rollouts add the process reward's gradient to the SDE drift (``flow.guidance``)."""
        return bool(cfg.flow.guidance.enabled)

    @classmethod
    def build_task(cls, cfg: Any, accelerator: Any) -> "FlowTask":
        from flowrl.train.flow_task import FlowTask

        return FlowTask(cfg, accelerator, algorithm=cls(cfg))

    # ------------------------------------------------------------------ rollout hooks
    def setup(self, task: "FlowTask") -> None:
        """Called once at the end of the task's construction (model, reference, rewards and guidance exist)."""

    def step_rewards(self, task: "FlowTask", traj: "FlowTrajectory", steps: Tensor,
                     prompts: list[str]) -> Optional[Tensor]:
        """Process rewards of the trained steps ``steps`` long [T] of rollout ``traj``: float [b, T] (NaN where a
        step has none), or None (outcome reward only)."""
        return None

    # ------------------------------------------------------------------ update hooks
    def backward(self, task: "FlowTask", rollout: "Rollout", index: Tensor, batch: "TrajectoryBatch", adv: Tensor,
                 it: int) -> dict[str, float]:
        return ppo_backward(task, rollout, index, batch, adv)
