"""AC-Flow's critic: a small value network V(x_t, sigma_t, c) on noisy states.

AC-Flow (actor-critic flow fine-tuning) describes a lightweight critic of "MLP + LayerNorm + CNN" on the
noisy latent, the time and the condition; its exact layout is not public, so this one is written here:
conv features of x_t (pooled to 4x4, so any latent size works; video frames are averaged), a sinusoidal
embedding of sigma, and every float [B, D] tensor of the conditioning (e.g. pooled prompt embeddings),
concatenated and read out by an MLP with LayerNorm. Output float [B].
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def sigma_embedding(sigma: Tensor, dim: int = 16) -> Tensor:
    """Sinusoidal features of sigma float [B] -> float [B, dim]."""
    freqs = torch.exp(torch.arange(dim // 2, device=sigma.device, dtype=torch.float32) * (-math.log(1000.0) / (dim // 2)))
    ang = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class FlowCritic(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.width = width
        self.conv = nn.Sequential(nn.LazyConv2d(width, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.LazyLinear(width * 2), nn.LayerNorm(width * 2), nn.SiLU(), nn.Linear(width * 2, 1))

    def forward(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """x float [B, C, H, W] (or video [B, C, F, H, W]); sigma float [B]; cond batch-first tensors -> float [B]."""
        if x.dim() == 5:
            x = x.mean(dim=2)
        if x.dim() == 3:  # packed tokens [B, N, C] (FLUX): treat as a 1-pixel-high image
            x = x.transpose(1, 2)[:, :, None]
        feats = [self.conv(x.float()).flatten(1), sigma_embedding(sigma)]
        for k in sorted(cond):
            v = cond[k]
            if v.dim() == 2 and v.is_floating_point() and not k.startswith("negative_"):
                feats.append(v.float())
        return self.head(torch.cat(feats, dim=1)).squeeze(1)


def critic_inputs(traj, rows: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor], int]:
    """The critic's inputs at every state k < K of rollouts ``rows`` long [r] of ``traj`` (a FlowTrajectory):
    x float [r*K, ...] (row-major: sample, then step), sigma float [r*K], the cond rows, and K."""
    from flowrl.flow.pipeline import cond_select

    K = traj.num_steps
    x = traj.latents[rows, :K].reshape(len(rows) * K, *traj.latents.shape[2:]).float()
    sigma = traj.sigmas[:K].repeat(len(rows))
    cond = cond_select(traj.cond, rows.repeat_interleave(K))
    return x, sigma, cond, K


def step_advantages(G: Tensor, V: Tensor, steps: Tensor, clip: float) -> Tensor:
    """AC-Flow's per-step advantage of each trained step.

    A[b, t] = clip(G_b - V[b, steps[t]], -clip, clip): the return G_b (the normalised reward of sample b) against
    the critic's value of the state x_{b, k} the step started from, k = steps[t]. A step whose start state already
    predicted the outcome (V close to G, typically the late, low-noise steps) gets little credit; a step after which
    the outcome beat the expectation gets a large one. G float [B]; V float [B, K] (the critic at every state
    k < K, evaluated before the critic is fitted to these rollouts, so that it is not biased toward G); steps long
    [T] (indices into K). Returns float [B, T].
    """
    if G.dim() != 1 or V.dim() != 2 or V.shape[0] != G.shape[0] or steps.dim() != 1:
        raise ValueError(f"step_advantages: G must be float [B], V float [B, K] and steps long [T]; got "
                         f"{tuple(G.shape)}, {tuple(V.shape)} and {tuple(steps.shape)}")
    if not clip > 0:
        raise ValueError(f"step_advantages: clip must be > 0; got {clip}")
    return (G[:, None] - V.index_select(1, steps.to(V.device))).clamp(-clip, clip)


WEIGHTINGS = ("exp", "positive")


def advantage_weights(a: Tensor, valid: Tensor, *, weighting: str, temperature: float = 1.0,
                      reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """AC-Flow's weight of each flow-matching term from its advantage, normalised to mean 1.

    exp (ORW-CFM-W2, Fan et al., 2025: w proportional to exp(tau r)):  e_i = exp(a_i / temperature)
    positive (the positive part: only terms better than expected are fitted):  e_i = max(a_i, 0)
    w_i = e_i / ((sum_{valid} e) / n_valid), and w_i = 0 where ``valid`` is False. If every e_i of the valid
    entries is 0 (positive weighting, no a_i > 0) then w = 0 everywhere (only the W2 term acts).
    ``reduce`` (e.g. an all-reduce over ranks) is applied to the float [2] tensor (sum e, n_valid) so the mean is
    global. a float of any shape (per sample [B], or per trained step [B, T]); valid bool of the same shape.
    Returns float of a's shape.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"AC-Flow weighting {weighting!r} is unknown; valid: {WEIGHTINGS}")
    if a.dim() < 1 or valid.shape != a.shape or valid.dtype != torch.bool:
        raise ValueError(f"advantage_weights: a must be float [B] or [B, T] and valid bool of the same shape; got "
                         f"{tuple(a.shape)} and {tuple(valid.shape)} {valid.dtype}")
    if weighting == "exp" and not temperature > 0:
        raise ValueError(f"advantage_weights: temperature must be > 0 for exp weighting; got {temperature}")
    raw = torch.exp(a.float() / temperature) if weighting == "exp" else a.float().clamp_min(0)
    e = torch.where(valid, raw, torch.zeros_like(raw))
    tot = torch.stack([e.sum(), valid.float().sum()])
    if reduce is not None:
        tot = reduce(tot)
    return e / (tot[0] / tot[1].clamp_min(1)).clamp_min(1e-12)
