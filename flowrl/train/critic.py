"""AC-Flow's critic: a small value network V(x_t, sigma_t, c) on noisy states.

AC-Flow (actor-critic flow fine-tuning) describes a lightweight critic of "MLP + LayerNorm + CNN" on the
noisy latent, the time and the condition; its exact layout is not public, so this one is written here:
conv features of x_t (pooled to 4x4, so any latent size works; video frames are averaged), a sinusoidal
embedding of sigma, and every float [B, D] tensor of the conditioning (e.g. pooled prompt embeddings),
concatenated and read out by an MLP with LayerNorm. Output float [B].
"""
from __future__ import annotations

import math

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
