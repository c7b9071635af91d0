"""Euphonium: rollouts steered by a process reward's gradient, and a dual (outcome + process) reward.

Rollouts add lambda * Delta * grad r(x_t, sigma_t, c) of the process reward model to the SDE drift
(``flow.guidance``, classifier guidance: Dhariwal & Nichol, 2021); the actions are scored under the unguided
mean (``flow.guidance.logprob_mean: unguided``), so the update distils the guidance into the model.
``step_reward[:, t]`` is the process reward of trained step t, for the dual-reward advantage
(``advantage.estimator: dual_level``: outcome_coef * outcome advantage + beta * per-step process advantage).
The update is the flow base's per-step PPO. Recipe: ``configs/digits/euphonium.yaml``.

Which state scores step k (``flow.guidance.step_reward``):

- ``next_state`` (flowrl's default): r(x_{k+1}, sigma_{k+1}), the state the action produced, on every trained
  step; the digits recipe weights it with beta 0.5.
- ``guided_state`` (the reference's): r(x_k, sigma_k), the state whose gradient steered step k, on the guidance
  window's steps only (NaN elsewhere, so the process advantage is 0 there), with coefficient 1
  (``advantage.params.beta: 1.0``). Reference: zerzerzerz/Euphonium/euphonium/grpo/grpo_sampling/sampling.py
  (``all_process_rewards`` recorded at the guided steps from ``compute_process_reward(noisy_latents=z)``, zeros
  elsewhere) and grpo_training/trainer.py (``process_reward_advantage_coef`` 1.0 in its script).

flowrl keeps ``next_state`` as its default because on the digits model scoring x_k (the state before the action)
credits action k with what earlier actions did, and taught the model to move against the guidance (seed 0 stayed
at 74-75% unguided accuracy for 20 iterations); x_{k+1} reached 79.5% after 10.
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

    # one set of trained steps per batch: the process advantage is normalised per (group, trained step), which
    # compares like with like only when every sample of a group trained the same denoising steps
    per_sample_steps = False

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        super().validate_config(cfg)
        if not cfg.flow.process_reward:
            raise ValueError("euphonium needs flow.process_reward (the process reward model)")
        if cfg.flow.guidance.step_reward == "guided_state" and not cfg.flow.guidance.enabled:
            raise ValueError("flow.guidance.step_reward=guided_state scores the guided steps' states: it needs "
                             "flow.guidance.enabled (use step_reward=next_state without guidance)")

    @torch.no_grad()
    def step_rewards(self, task, traj, steps: Tensor, prompts: list[str]) -> Tensor:
        """The process reward of each trained step: float [b, T], one batched call (see the module docstring).

        steps: long [T] (every sample's trained steps) or long [b, T] (each sample its own). next_state:
        step_reward[:, t] = r(x_{k+1}, sigma_{k+1}) for the t-th trained step k, the state the action produced.
        (Scoring x_k, the state before the action, credits action k with what earlier actions did; with the
        guidance drift grad r(x_k) inside the unguided score function, that credit is anti-correlated with the
        drift's size and taught the model to move against the guidance.) guided_state: r(x_k, sigma_k) where
        step k is in ``flow.guidance.window`` (every step when it is null), NaN elsewhere (only those are scored).
        """
        b = traj.batch_size
        k = steps.to(traj.latents.device).expand(b, steps.shape[-1])
        T = k.shape[1]
        gc = task.cfg.flow.guidance
        guided = gc.step_reward == "guided_state"
        at = k if guided else k + 1  # the scored state's index in the trajectory
        rows = torch.arange(b, device=k.device)[:, None].expand(b, T)
        keep = torch.ones_like(k, dtype=torch.bool)
        if guided and gc.window is not None:
            keep = (k >= int(gc.window[0])) & (k < int(gc.window[1]))
        x = traj.latents[rows[keep], at[keep]]
        sigma = traj.sigmas.to(k.device)[at[keep]]
        cond = cond_select(traj.cond, rows[keep])
        out = torch.full((b, T), float("nan"), device=k.device)
        if bool(keep.any()):
            out[keep] = task.process_reward(x, sigma, cond).float().to(k.device)
        return out
