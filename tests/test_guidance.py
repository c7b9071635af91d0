"""flowrl.flow.guidance: Euphonium drift by hand, KL mode, normalisation, SPSA, reward rise on the analytic model."""
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from flow_testing import GaussianPipeline  # noqa: E402

from flowrl.flow import Guidance, rollout, spsa_gradient  # noqa: E402
from flowrl.flow.sde import noise_scale  # noqa: E402

torch.set_num_threads(1)
TARGET = torch.tensor([1.5, 1.0, -0.5, 0.0])


def quad_reward(x, sigma, cond):
    """r(x) = -sum_i w_i (x_i - t_i)^2 with gradient -2 w (x - t)."""
    w = torch.arange(1, x.shape[1] + 1, dtype=torch.float32)
    return -(w * (x.float() - TARGET[: x.shape[1]]) ** 2).sum(dim=1)


def test_drift_matches_hand_formula_fixed_and_kl_mode():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    s, sn = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.1])
    true_grad = -2 * torch.arange(1, 5).float() * (x - TARGET)
    gk = noise_scale("dance_sde", s, sn, 0.7)
    drift, r = Guidance(quad_reward, scale=0.05).drift(x, v, s, sn, {}, g=gk)
    for b in range(3):
        d = float(s[b] - sn[b])
        assert torch.allclose(drift[b], 0.05 * d * true_grad[b], atol=1e-6)
    assert torch.allclose(r, quad_reward(x, s, {}))
    drift, _ = Guidance(quad_reward, kl_beta=0.2).drift(x, v, s, sn, {}, g=gk)
    for b in range(3):  # lambda = g^2 / (2 beta) = 0.49 / 0.4
        assert torch.allclose(drift[b], 0.49 / 0.4 * float(s[b] - sn[b]) * true_grad[b], atol=1e-6)
    drift, _ = Guidance(quad_reward, scale=0.05, normalize=True).drift(x, v, s, sn, {}, g=gk)
    rms = drift.pow(2).mean(1).sqrt()
    assert torch.allclose(rms, 0.05 * (s - sn), atol=1e-7)
    assert torch.allclose(drift / drift.norm(dim=1, keepdim=True), true_grad / true_grad.norm(dim=1, keepdim=True),
                          atol=1e-6)


def test_spsa_matches_its_formula_and_correlates_with_true_gradient():
    g = torch.Generator().manual_seed(1)
    B, D = 64, 4
    x0 = torch.randn(B, D, generator=g)
    sigma = torch.full((B,), 0.5)
    n = 200
    est, r_est = spsa_gradient(quad_reward, x0, sigma, {}, num_directions=n, scale=1.0,
                               generator=torch.Generator().manual_seed(9))
    # the formula by hand, with the same directions (drawn in the same order from the same seed)
    gen = torch.Generator().manual_seed(9)
    rows = 6  # the slow reference on a few rows (directions are still drawn for the whole batch)
    ref = torch.zeros(rows, D)
    for _ in range(n):
        u = torch.randn(B, D, generator=gen)
        for b in range(rows):
            c = 0.5
            rp = quad_reward((x0[b] + c * u[b])[None], None, None)[0]
            rm = quad_reward((x0[b] - c * u[b])[None], None, None)[0]
            ref[b] += (rp - rm) / (2 * c) * u[b] / n
    assert torch.allclose(est[:rows], ref, atol=1e-4)
    true = -2 * torch.arange(1, D + 1).float() * (x0 - TARGET)
    cos = torch.nn.functional.cosine_similarity(est, true, dim=1)
    assert cos.mean() > 0.9 and cos.min() > 0.6, cos
    # few directions: noisier but still positively correlated on average
    est4, _ = spsa_gradient(quad_reward, x0, sigma, {}, num_directions=4, generator=torch.Generator().manual_seed(2))
    cos4 = torch.nn.functional.cosine_similarity(est4, true, dim=1)
    assert 0.3 < cos4.mean() < cos.mean()
    # the reward estimate is the average of (r(+) + r(-)) / 2 = r(x0) - c^2 u^T W u, whose mean over
    # u ~ N(0, I) is r(x0) - c^2 sum(w) = r(x0) - 0.25 * 10 (sd of the 200-direction average ~ 0.14)
    assert torch.allclose(r_est, quad_reward(x0, None, None) - 2.5, atol=0.6)


def _final_reward(x):
    return quad_reward(x, None, None)


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde"])
def test_guidance_raises_reward_over_unguided_from_same_noise(kind):
    pipe = GaussianPipeline(torch.zeros(4), 1.0)  # data N(0, I); the reward pulls toward TARGET

    def prm(x, sigma, cond):  # differentiable process reward on the noisy latent: reward of E[x0 | x]
        return quad_reward(pipe.x0_mean(x, sigma), sigma, cond)

    kw = dict(num_steps=20, kind=kind, noise_level=0.7, samples_per_prompt=2000, seed=11, decode=False)
    base = rollout(pipe, ["p"], **kw)
    guided = rollout(pipe, ["p"], guidance=Guidance(prm, scale=0.1), **kw)
    assert torch.equal(base.latents[:, 0], guided.latents[:, 0])  # the same initial noise
    r0, r1 = _final_reward(base.final_latents).mean(), _final_reward(guided.final_latents).mean()
    assert r1 > r0 + 0.25 * abs(r0), (r0, r1)
    # KL mode on the SDE window and a late window raise it too
    kl = rollout(pipe, ["p"], guidance=Guidance(prm, kl_beta=2.0, window=(10, 19)), **kw)
    assert _final_reward(kl.final_latents).mean() > r0 + 0.05 * abs(r0)
    assert kl.guided_mask.tolist() == [False] * 10 + [True] * 9 + [False]


def test_spsa_guidance_raises_non_differentiable_reward():
    pipe = GaussianPipeline(torch.zeros(4), 1.0)

    def black_box(x, sigma, cond):  # numpy, no autograd: -sum |x - t|
        arr = x.detach().cpu().numpy()
        return torch.from_numpy(-np.abs(arr - TARGET.numpy()).sum(axis=1).astype(np.float32))

    kw = dict(num_steps=10, noise_level=0.7, samples_per_prompt=1000, seed=3, decode=False)
    base = rollout(pipe, ["p"], **kw)
    guide = Guidance(black_box, scale=0.3, estimator="spsa", spsa_directions=8, logprob_mean="guided")
    guided = rollout(pipe, ["p"], guidance=guide, **kw)
    # SPSA draws its directions from a generator of its own, so the guided run draws the unguided run's noise:
    # at step 0 (same start, same velocity) the two samples differ by exactly the stored drift
    assert torch.equal(base.latents[:, 0], guided.latents[:, 0])
    assert torch.allclose(guided.latents[:, 1] - base.latents[:, 1], guided.drifts[:, 0], atol=1e-5)
    assert guided.drifts[:, 0].abs().max() > 1e-3
    r0 = black_box(base.final_latents, None, None).mean()
    r1 = black_box(guided.final_latents, None, None).mean()
    assert r1 > r0 + 0.1 * abs(r0), (r0, r1)
    assert torch.isfinite(guided.process_rewards[:, :]).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="estimator='finite'; valid values"):
        Guidance(quad_reward, estimator="finite")
    with pytest.raises(ValueError, match="logprob_mean='both'; valid values"):
        Guidance(quad_reward, logprob_mean="both")
    with pytest.raises(ValueError, match="kl_beta must be > 0"):
        Guidance(quad_reward, kl_beta=0.0)
    with pytest.raises(ValueError, match=r"window must be \(start, stop\)"):
        Guidance(quad_reward, window=(3, 3))
    with pytest.raises(TypeError, match="must be a callable"):
        Guidance(reward=3.0)
    with pytest.raises(ValueError, match="num_directions must be >= 1"):
        spsa_gradient(quad_reward, torch.zeros(2, 4), torch.ones(2), {}, num_directions=0)
    x, s = torch.randn(2, 4), torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match=r"shape \[B\]=\[2\]"):
        Guidance(lambda x, s, c: x.sum()).drift(x, x, s, s - 0.1, {}, g=s)
    with pytest.raises(ValueError, match="non-finite"):
        Guidance(lambda x, s, c: x.sum(1) * math.nan).drift(x, x, s, s - 0.1, {}, g=s)
    with pytest.raises(TypeError, match="guidance must be a flowrl.flow.guidance.Guidance"):
        rollout(GaussianPipeline(torch.zeros(2), 1.0), ["p"], num_steps=2, guidance=quad_reward)
