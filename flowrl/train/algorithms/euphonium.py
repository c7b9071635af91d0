"""Euphonium: rollouts steered by a process reward's gradient, and a dual (outcome + process) reward.

Rollouts add lambda * Delta * grad r(x_t, sigma_t, c) of the process reward model to the SDE drift
(``flow.guidance``, classifier guidance: Dhariwal & Nichol, 2021); the actions are scored under the unguided
mean (``flow.guidance.logprob_mean: unguided``), so the update distils the guidance into the model.
``step_reward[:, t]`` is the process reward of the state trained step t leads to, for the dual-reward advantage
(``advantage.estimator: dual_level``: outcome advantage + c_P * per-step process advantage). The update is the
flow base's per-step PPO. Recipe: ``configs/digits/euphonium.yaml``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowrl.flow.pipeline import cond_select
from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm


@register_algorithm("euphonium")
class Euphonium(FlowAlgorithm):
    """Euphonium: process-reward guidance in the rollouts (when enabled) and process step rewards."""

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if not cfg.flow.process_reward:
            raise ValueError("euphonium needs flow.process_reward (the process reward model)")

    @torch.no_grad()
    def step_rewards(self, task, traj, steps: Tensor, prompts: list[str]) -> Tensor:
        """The process reward of the state each trained step leads to: float [b, T], one batched call.

        step_reward[:, t] = r(x_{k+1}, sigma_{k+1}) for the t-th trained step k: the state the action produced.
        (Scoring x_k, the state before the action, credits action k with what earlier actions did; with the
        guidance drift grad r(x_k) inside the unguided score function, that credit is anti-correlated with the
        drift's size and taught the model to move against the guidance.)
        """
        b, T = traj.batch_size, len(steps)
        x = traj.latents[:, steps + 1].reshape(b * T, *traj.latents.shape[2:])
        sigma = traj.sigmas[steps + 1].repeat(b)
        cond = cond_select(traj.cond, torch.arange(b, device=x.device).repeat_interleave(T))
        return task.process_reward(x, sigma, cond).float().view(b, T)
