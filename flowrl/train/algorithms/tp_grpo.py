"""TurningPoint-GRPO (TP-GRPO): step rewards from ODE completions of every intermediate state.

After each SDE step of a rollout the state before trained step t is finished with the ODE and scored by the
outcome reward: ``step_reward[:, t]`` = R_t, and ``outcome`` = R_n. The ``tp_grpo`` advantage estimator
(``advantage.estimator: tp_grpo``, its ``eta`` and ``balance`` in ``advantage.params``) turns these into the
incremental deltas R_{t+1} - R_t with the long-term reward eta (R_n - R_t) given to turning points. The update is
the flow base's per-step PPO. Recipe: ``configs/digits/tp_grpo.yaml``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowrl.flow.sampler import complete_with_ode
from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm


@register_algorithm("tp_grpo")
class TPGRPO(FlowAlgorithm):
    """TP-GRPO: ODE-completion rewards of every trained step as ``step_reward``."""

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if cfg.flow.timestep_fraction != 1.0:
            raise ValueError("tp_grpo scores every SDE step's ODE completion: set flow.timestep_fraction = 1.0 "
                             f"(got {cfg.flow.timestep_fraction})")

    @torch.no_grad()
    def step_rewards(self, task, traj, steps: Tensor, prompts: list[str]) -> Tensor:
        """R_t: outcome reward of the ODE completion from the state before each trained step t: float [b, T]
        (NaN where the reward marked a completion invalid)."""
        cols = []
        for k in steps.tolist():  # one ODE completion per step (a loop over time)
            imgs = complete_with_ode(task.pipe, traj, k, decode=True)
            r, _, ok, _ = task.reward.score(imgs, prompts)
            cols.append(torch.where(ok, r.float(), torch.full_like(r.float(), float("nan"))))
        return torch.stack(cols, dim=1).to(task.pipe.device)
