"""flowrl.flow: flow-matching math; a velocity function in, trajectories with log-probs out.

sde.py (step kernels with log-prob), sampler.py (rollout, recompute, ODE completion, ``sample``),
guidance.py (Euphonium reward-gradient drift), pipeline.py (the protocol model adapters implement).
"""
from flowrl.flow.guidance import Guidance, reward_gradient, spsa_gradient
from flowrl.flow.pipeline import Cond, FlowPipeline, cond_repeat, cond_select
from flowrl.flow.sampler import (
    FlowTrajectory,
    complete_with_ode,
    ode_complete,
    recompute_log_prob,
    rollout,
    sample,
    sde_window_mask,
)
from flowrl.flow.sde import KINDS, SDEStep, gaussian_log_prob, kernel_std, noise_scale, sde_step

__all__ = [
    "Cond", "FlowPipeline", "cond_repeat", "cond_select",
    "KINDS", "SDEStep", "sde_step", "gaussian_log_prob", "kernel_std", "noise_scale",
    "FlowTrajectory", "rollout", "sample", "recompute_log_prob", "ode_complete", "complete_with_ode",
    "sde_window_mask", "Guidance", "reward_gradient", "spsa_gradient",
]
