"""Test pipelines for the flow sampler (not a test module): an analytic Gaussian flow and a tiny random MLP.

Both implement flowrl.flow.pipeline.FlowPipeline and nothing else, as real adapters do.

Gaussian data x0 ~ N(mu, s^2 I), x = (1 - sigma) x0 + sigma eps. Then x ~ N((1 - sigma) mu, V I) with
V = (1 - sigma)^2 s^2 + sigma^2, and (x0, eps) are jointly Gaussian with x, so
    E[x0 | x]  = mu + (1 - sigma) s^2 / V * (x - (1 - sigma) mu),
    E[eps | x] = sigma / V * (x - (1 - sigma) mu),
    v*(x, sigma) = E[eps - x0 | x] = (sigma - (1 - sigma) s^2) / V * (x - (1 - sigma) mu) - mu.
s = 0 is a point mass at mu: v* = (x - mu) / sigma and x - sigma v* = mu exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class GaussianPipeline:
    """The exact velocity of Gaussian data N(mu, s^2 I); latents [B, *mu.shape]; conditioning is ignored."""

    def __init__(self, mu: Tensor, s: float, *, shift: float = 1.0):
        self.mu = mu.float()
        self.s = float(s)
        self.shift = shift
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self._trainable = nn.Identity()

    def _view(self, sigma: Tensor, x: Tensor) -> Tensor:
        return sigma.float().reshape((-1,) + (1,) * (x.dim() - 1))

    def encode_prompts(self, prompts, *, cfg=False):
        ids = torch.tensor([sum(map(ord, p)) % 97 for p in prompts], dtype=torch.long)
        return {"ids": ids, "neg": torch.zeros_like(ids)} if cfg else {"ids": ids}

    def variance(self, sigma: Tensor, x: Tensor) -> Tensor:
        sv = self._view(sigma, x)
        return (1 - sv) ** 2 * self.s**2 + sv**2

    def x0_mean(self, x: Tensor, sigma: Tensor) -> Tensor:
        """E[x0 | x_sigma = x] (differentiable in x)."""
        sv = self._view(sigma, x)
        return self.mu + (1 - sv) * self.s**2 / self.variance(sigma, x) * (x - (1 - sv) * self.mu)

    def velocity(self, x, sigma, cond, *, cfg_scale=None):
        sv = self._view(sigma, x)
        xf = x.float()
        v = (sv - (1 - sv) * self.s**2) / self.variance(sigma, x) * (xf - (1 - sv) * self.mu) - self.mu
        return v.to(x.dtype)

    def initial_noise(self, batch_size, *, generator=None):
        return torch.randn((batch_size,) + tuple(self.mu.shape), generator=generator)

    def sigmas(self, num_steps):
        t = torch.linspace(1.0, 0.0, num_steps + 1)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def decode(self, x):
        return x.float()

    @property
    def trainable(self):
        return self._trainable


class TinyNet(nn.Module):
    """v(x, sigma, c) = MLP([flatten(x), emb(c), sigma])."""

    def __init__(self, latent_shape=(2, 4, 4), vocab=64, emb=8, hidden=32):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        d = 1
        for n in latent_shape:
            d *= n
        self.embed = nn.Embedding(vocab, emb)
        self.net = nn.Sequential(nn.Linear(d + emb + 1, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x, sigma, ids):
        h = torch.cat([x.flatten(1), self.embed(ids).to(x.dtype), sigma.to(x.dtype)[:, None]], dim=1)
        return self.net(h).reshape(x.shape)


class TinyNNPipeline:
    """A random MLP flow model on latents [B, 2, 4, 4]; prompts hashed to ids; id 0 is the empty prompt (CFG)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, shift: float = 3.0):
        torch.manual_seed(seed)
        self.net = TinyNet().to(dtype)
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.shift = shift
        self.calls = 0

    def encode_prompts(self, prompts, *, cfg=False):
        ids = torch.tensor([1 + sum(map(ord, p)) % 63 for p in prompts], dtype=torch.long)
        return {"ids": ids, "neg_ids": torch.zeros_like(ids)} if cfg else {"ids": ids}

    def velocity(self, x, sigma, cond, *, cfg_scale: Optional[float] = None):
        self.calls += 1
        if cfg_scale is None:
            return self.net(x, sigma, cond["ids"])
        if "neg_ids" not in cond:
            raise ValueError("cfg_scale needs a cond encoded with cfg=True")
        both = self.net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond["neg_ids"], cond["ids"]]))
        v_u, v_c = both.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    def initial_noise(self, batch_size, *, generator=None):
        return torch.randn((batch_size,) + self.net.latent_shape, generator=generator).to(self.dtype)

    def sigmas(self, num_steps):
        t = torch.linspace(1.0, 0.0, num_steps + 1)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def decode(self, x):
        return ((x.float().clamp(-1, 1) + 1) / 2)

    @property
    def trainable(self):
        return self.net
