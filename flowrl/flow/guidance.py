"""Reward-gradient guidance of the SDE kernel (Euphonium, 2026).

The guided kernel shifts the mean of a step by the gradient of a process reward r(x_k, sigma_k, c):

    mean~ = mean + lambda * Delta * grad_x r(x_k, sigma_k, c),      Delta = sigma_k - sigma_{k+1}.

lambda is fixed (Euphonium's default 0.01) or, in "KL mode", lambda = g_k^2 / (2 beta) with g_k the
kernel's diffusion coefficient at that step (std = g_k sqrt(Delta)): the first-order sampler of the tilted
optimum p*(x) ~ p_ref(x) exp(r(x) / beta), whose score adds grad r / beta to the reverse SDE's score term
(g^2 / 2) grad log p. The gradient comes from autograd (a differentiable process reward model on the
noisy latent) or from an SPSA estimate for a reward that is not differentiable, taken around the
clean-sample estimate x0_hat = x - sigma v:

    grad ~= (1/n) sum_j (r(x0_hat + c u_j) - r(x0_hat - c u_j)) / (2 c) * u_j,   u_j ~ N(0, I), c = scale * sigma.

The sampler draws the action from the guided kernel; its log-prob is taken under the unguided mean by
default (Euphonium's USE_REWARD_GUIDED_MEAN_FOR_LOGPROB=false), so training moves the policy toward the
guided samples and distils the guidance into the model; ``logprob_mean="guided"`` scores the action
under the guided mean instead (the sampler then stores the drift so the trainer recomputes the same
log-prob).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from flowrl.flow.pipeline import Cond

# r(x, sigma, cond) -> float [B]; x [B, ...] a (noisy or clean) latent, sigma float [B].
ProcessReward = Callable[[Tensor, Tensor, Cond], Tensor]

ESTIMATORS = ("autograd", "spsa")
LOGPROB_MEANS = ("unguided", "guided")


def _check_reward(r: Tensor, batch: int, where: str) -> Tensor:
    if not isinstance(r, Tensor) or tuple(r.shape) != (batch,):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(f"guidance: the process reward must return a tensor of shape [B]=[{batch}] ({where}); got {shape}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"guidance: the process reward returned a non-finite value ({where})")
    return r


def reward_gradient(reward: ProcessReward, x: Tensor, sigma: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
    """grad_x r(x, sigma, cond) by autograd, for a differentiable process reward (Euphonium's latent PRM).

    Each sample's reward depends only on its own row, so grad of sum_b r_b gives every row's gradient in
    one backward pass. x: [B, ...]; sigma: float [B]. Returns (gradient float32 like x, reward float32 [B]).
    Gradients reach only ``x`` (the reward model's parameters accumulate nothing).
    """
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        r = _check_reward(reward(xg, sigma, cond), x.shape[0], "autograd")
        (grad,) = torch.autograd.grad(r.sum(), xg)
    return grad.float(), r.detach().float()


def spsa_gradient(
    reward: ProcessReward,
    x0_hat: Tensor,
    sigma: Tensor,
    cond: Cond,
    *,
    num_directions: int = 8,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """SPSA estimate of the reward gradient around the clean-sample estimate (Euphonium's pixel-space option).

    grad ~= (1/n) sum_{j=1..n} (r(x0_hat + c u_j) - r(x0_hat - c u_j)) / (2 c) * u_j, u_j ~ N(0, I),
    c = scale * sigma per sample; unbiased up to the reward's curvature since E[u u^T] = I (exact in
    expectation for a quadratic reward). The reward sees clean-sample estimates, so it is called with
    sigma = 0. One call per direction on a batch of 2B (a loop over the n directions, not over samples).

    x0_hat: [B, ...]; sigma: float [B] (> 0). Returns (gradient float32 like x0_hat,
    reward estimate float32 [B] = mean_j (r(+) + r(-)) / 2).
    """
    if num_directions < 1:
        raise ValueError(f"spsa_gradient: num_directions must be >= 1; got {num_directions}")
    if not scale > 0:
        raise ValueError(f"spsa_gradient: scale must be > 0; got {scale}")
    B = x0_hat.shape[0]
    view = (-1,) + (1,) * (x0_hat.dim() - 1)
    c = (scale * sigma.float()).reshape(view)
    base = x0_hat.detach().float()
    cond2 = {k: torch.cat([t, t], dim=0) for k, t in cond.items()}
    zeros = torch.zeros(2 * B, device=x0_hat.device, dtype=torch.float32)
    grad = torch.zeros_like(base)
    rsum = torch.zeros(B, device=x0_hat.device, dtype=torch.float32)
    with torch.no_grad():
        for _ in range(num_directions):  # a loop over random directions, not over samples
            u = torch.randn(base.shape, generator=generator, device=base.device, dtype=torch.float32)
            y = torch.cat([base + c * u, base - c * u], dim=0).to(x0_hat.dtype)
            r = _check_reward(reward(y, zeros, cond2), 2 * B, "spsa").float()
            rp, rm = r[:B], r[B:]
            grad += ((rp - rm).reshape(view) / (2.0 * c)) * u
            rsum += 0.5 * (rp + rm)
    return grad / num_directions, rsum / num_directions


@dataclass
class Guidance:
    """Euphonium's reward-gradient drift: drift = lambda * Delta * grad r(x_k, sigma_k, cond).

    reward: the process reward r(x, sigma, cond) -> float [B] (x: latent [B, ...], sigma: float [B]).
        With ``estimator="autograd"`` it must be differentiable in x (it sees the noisy latent x_k);
        with ``"spsa"`` it is only evaluated, on clean-sample estimates x0_hat +- c u (sigma = 0).
    scale: lambda, fixed (Euphonium's default 0.01). Ignored in KL mode.
    kl_beta: if set, KL mode: lambda_k = g_k^2 / (2 * kl_beta) with g_k the kernel's diffusion coefficient
        at step k (``flowrl.flow.sde.noise_scale``); guidance on an ODE step is then an error (g = 0).
    normalize: divide the gradient of each sample by its root-mean-square over the latent's elements, so
        lambda is a per-element step size whatever the latent's size.
    window: steps (start, stop), stop exclusive, where guidance applies; None = every step (Euphonium
        guides steps 12-15 of 16: window=(12, 16)).
    estimator: "autograd" or "spsa". spsa_directions: n; spsa_scale: c = spsa_scale * sigma_k.
    logprob_mean: "unguided" (default: the action is drawn from the guided kernel but scored under the
        unguided mean, so training distils the guidance) or "guided".
    """

    reward: ProcessReward
    scale: float = 0.01
    kl_beta: Optional[float] = None
    normalize: bool = False
    window: Optional[tuple[int, int]] = None
    estimator: str = "autograd"
    spsa_directions: int = 8
    spsa_scale: float = 1.0
    logprob_mean: str = "unguided"

    def __post_init__(self) -> None:
        if not callable(self.reward):
            raise TypeError("Guidance.reward must be a callable (x, sigma, cond) -> float [B]")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Guidance.estimator={self.estimator!r}; valid values are {ESTIMATORS}")
        if self.logprob_mean not in LOGPROB_MEANS:
            raise ValueError(f"Guidance.logprob_mean={self.logprob_mean!r}; valid values are {LOGPROB_MEANS}")
        if self.kl_beta is not None and not self.kl_beta > 0:
            raise ValueError(f"Guidance.kl_beta must be > 0 (KL mode) or None (fixed scale); got {self.kl_beta}")
        if self.window is not None:
            if len(self.window) != 2 or not (0 <= int(self.window[0]) < int(self.window[1])):
                raise ValueError(f"Guidance.window must be (start, stop) with 0 <= start < stop; got {self.window}")
        if self.spsa_directions < 1:
            raise ValueError(f"Guidance.spsa_directions must be >= 1; got {self.spsa_directions}")
        if not self.spsa_scale > 0:
            raise ValueError(f"Guidance.spsa_scale must be > 0; got {self.spsa_scale}")

    def applies(self, step: int) -> bool:
        """Whether guidance runs at step ``step`` (0-based)."""
        return self.window is None or int(self.window[0]) <= step < int(self.window[1])

    def gradient(
        self, x: Tensor, v: Tensor, sigma: Tensor, cond: Cond, *, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, Tensor]:
        """(grad r estimate float32 like x, reward float32 [B]) at x_k; sigma float [B]; v the velocity at x_k."""
        if self.estimator == "autograd":
            return reward_gradient(self.reward, x, sigma, cond)
        view = (-1,) + (1,) * (x.dim() - 1)
        x0_hat = x.float() - sigma.float().reshape(view) * v.float()
        return spsa_gradient(
            self.reward, x0_hat, sigma, cond,
            num_directions=self.spsa_directions, scale=self.spsa_scale, generator=generator,
        )

    def drift(
        self,
        x: Tensor,
        v: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        cond: Cond,
        *,
        g: Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[Tensor, Tensor]:
        """drift = lambda * Delta * grad (grad RMS-normalised per sample if ``normalize``).

        x, v: [B, ...]; sigma, sigma_next, g: float [B] (g the kernel's diffusion coefficient, used in KL mode:
        lambda = g^2 / (2 beta)). Returns (drift float32 like x, reward float32 [B]).
        """
        grad, r = self.gradient(x, v, sigma, cond, generator=generator)
        view = (-1,) + (1,) * (x.dim() - 1)
        if self.normalize:
            dims = tuple(range(1, grad.dim()))
            rms = grad.pow(2).mean(dim=dims, keepdim=True).sqrt() if dims else grad.abs()
            grad = grad / rms.clamp_min(1e-12)
        if self.kl_beta is not None:
            lam = g.float() ** 2 / (2.0 * self.kl_beta)
        else:
            lam = torch.full_like(sigma.float(), float(self.scale))
        delta = sigma.float() - sigma_next.float()
        return (lam * delta).reshape(view) * grad, r
