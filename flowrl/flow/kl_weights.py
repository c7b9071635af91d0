"""Weights of the KL (or other regularisation) over the denoising steps: ``fn(sigma float [n], **params) -> float [n]``.

A flow sampler decides the composition of an image on its first, high-noise steps and its details on the last
ones; the samples of one prompt stop differing when the early steps collapse. A uniform KL to the reference
weighs every step alike; a weight that grows with the noise level sigma of the step's start keeps the early steps
close to the reference (and with them the spread of compositions) while the late steps stay free to fix what the
reward asks for. Registered by name in :data:`KL_WEIGHTS`; the config's ``flow.kl_weight`` names one and its
parameters, and the trainer multiplies each step's KL by it (``uniform``, the default, is 1 everywhere).
"""
from __future__ import annotations

import torch
from torch import Tensor

from flowrl.core.registry import Registry

__all__ = ["KL_WEIGHTS", "kl_step_weights"]

KL_WEIGHTS = Registry("KL weight", skip=1)


def kl_step_weights(name: str, sigma: Tensor, **params) -> Tensor:
    """The weight registered as ``name`` at noise levels ``sigma`` float [n] (parameters checked), float [n] >= 0."""
    KL_WEIGHTS.check_params(name, params)
    w = KL_WEIGHTS[name](sigma.float(), **params)
    if w.shape != sigma.shape or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"KL weight {name!r} must return finite weights >= 0 of shape {tuple(sigma.shape)}")
    return w


@KL_WEIGHTS.register("uniform")
def uniform(sigma: Tensor) -> Tensor:
    """w(sigma) = 1: every step alike (Flow-GRPO)."""
    return torch.ones_like(sigma)


@KL_WEIGHTS.register("sigma_power")
def sigma_power(sigma: Tensor, *, power: float = 2.0, scale: float = 1.0, floor: float = 0.0) -> Tensor:
    """w(sigma) = floor + scale * sigma^power, sigma in [0, 1] the noise level at the start of the step: strongest on
    the early, high-noise steps (sigma near 1) and fading to ``floor`` at the end (a noise-level-dependent
    regularisation in the spirit of DiverseGRPO's stronger early-step constraint; the exact schedule of that paper is
    not public, this power law is flowrl's choice)."""
    return floor + scale * sigma.clamp_min(0).pow(power)


@KL_WEIGHTS.register("early_steps")
def early_steps(sigma: Tensor, *, threshold: float = 0.5, early: float = 1.0, late: float = 0.0) -> Tensor:
    """w(sigma) = ``early`` where sigma > threshold (the high-noise steps), else ``late``: a step function."""
    return torch.where(sigma > threshold, torch.full_like(sigma, early), torch.full_like(sigma, late))
