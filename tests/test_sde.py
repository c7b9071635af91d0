"""flowrl.flow.sde: kernels against hand-written per-element references, ratio 1, dtypes, marginals, errors."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from flow_testing import GaussianPipeline  # noqa: E402

from flowrl.flow.sde import KINDS, gaussian_log_prob, kernel_std, noise_scale, sde_step  # noqa: E402

torch.set_num_threads(1)
STOCHASTIC = ("flow_sde", "dance_sde", "cps")


def ref_step(kind, x, v, sigma, sigma_next, a, noise, drift):
    """Per-element loops over the formulas of flow_anchors.md; returns (sample, mean, std, logp_mean, logp_sum)."""
    B = x.shape[0]
    xs, vs, ns, ds = (t.reshape(B, -1).tolist() for t in (x, v, noise, drift))
    out = []
    for b in range(B):
        s, sn = float(sigma[b]), float(sigma_next[b])
        d = s - sn
        if kind == "flow_sde":
            s_den = sn if s == 1.0 else s  # sigma == 1: Flow-GRPO uses the next sigma in the denominator
            g = a * math.sqrt(s / (1 - s_den))
            std = g * math.sqrt(d)
        elif kind == "dance_sde":
            g = a
            std = g * math.sqrt(d)
        else:
            std = sn * math.sin(a * math.pi / 2)
        samp, means, lps = [], [], []
        for i in range(len(xs[b])):
            xi, vi = xs[b][i], vs[b][i]
            x1 = xi + (1 - s) * vi
            if kind in ("flow_sde", "dance_sde"):
                m = xi - d * vi - d * g * g / (2 * s) * x1
            else:
                x0 = xi - s * vi
                m = (1 - sn) * x0 + math.sqrt(sn * sn - std * std) * x1
            m += ds[b][i]
            y = m + std * ns[b][i]
            samp.append(y)
            means.append(m)
            lps.append(-((y - m) ** 2) / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi))
        out.append((samp, means, std, sum(lps) / len(lps), sum(lps)))
    return out


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_matches_hand_density(kind, reduce):
    g = torch.Generator().manual_seed(1)
    B, shape = 4, (2, 3, 2)
    x = torch.randn((B,) + shape, generator=g, dtype=torch.float64).float()
    v = torch.randn((B,) + shape, generator=g).float()
    noise = torch.randn((B,) + shape, generator=g)
    drift = 0.1 * torch.randn((B,) + shape, generator=g)
    sigma = torch.tensor([1.0, 0.8, 0.41, 0.1])  # includes the first step from sigma = 1
    sigma_next = torch.tensor([0.93, 0.5, 0.4, 0.02])
    a = 0.7
    out = sde_step(kind, x, v, sigma, sigma_next, noise_level=a, noise=noise, drift=drift, logp_reduce=reduce)
    ref = ref_step(kind, x, v, sigma, sigma_next, a, noise, drift)
    for b in range(B):
        samp, means, std, lp_mean, lp_sum = ref[b]
        assert torch.allclose(out.prev_sample[b].flatten().double(), torch.tensor(samp, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(out.mean[b].flatten().double(), torch.tensor(means, dtype=torch.float64), atol=1e-5)
        assert out.std[b].item() == pytest.approx(std, rel=1e-5)
        expected = lp_mean if reduce == "mean" else lp_sum
        assert out.log_prob[b].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (B,)


def test_hand_worked_dance_step():
    # x = 0.5, v = 1, sigma 0.5 -> 0.25, a = 0.5: g = 0.5, Delta = 0.25, x1_hat = 0.5 + 0.5 * 1 = 1,
    # mean = 0.5 - 0.25 - 0.25 * 0.25 / (2 * 0.5) * 1 = 0.1875, std = 0.5 * 0.5 = 0.25,
    # noise 2 -> sample 0.6875, log p = -0.5^2 / (2 * 0.0625) - log 0.25 - log(2 pi) / 2 = -1.5326441.
    out = sde_step("dance_sde", torch.tensor([[0.5]]), torch.tensor([[1.0]]), 0.5, 0.25, noise_level=0.5,
                   noise=torch.tensor([[2.0]]))
    assert out.mean.item() == pytest.approx(0.1875)
    assert out.std.item() == pytest.approx(0.25)
    assert out.prev_sample.item() == pytest.approx(0.6875)
    assert out.log_prob.item() == pytest.approx(-2.0 + math.log(4.0) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_ode_step_and_drift():
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    drift = torch.randn(3, 5)
    out = sde_step("ode", x, v, 0.6, 0.45, drift=drift)
    assert out.log_prob is None
    assert torch.allclose(out.prev_sample, x - 0.15 * v + drift, atol=1e-6)
    assert torch.equal(out.std, torch.zeros(3))


def test_flow_sde_at_sigma_one_uses_next_sigma_and_is_finite():
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    out = sde_step("flow_sde", x, v, 1.0, 0.9, noise_level=0.7)
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.prev_sample).all()
    assert out.std[0].item() == pytest.approx(0.7 * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1), rel=1e-5)
    assert noise_scale("flow_sde", torch.tensor([1.0]), torch.tensor([0.9]), 0.7).item() == pytest.approx(
        0.7 * math.sqrt(10), rel=1e-5)
    assert kernel_std("cps", torch.tensor([0.5]), torch.tensor([0.4]), 0.8).item() == pytest.approx(
        0.4 * math.sin(0.4 * math.pi), rel=1e-6)


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_recompute_with_prev_sample_gives_ratio_one(kind, reduce):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 3, 8, 8, generator=g)
    sigma = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1])
    sigma_next = sigma - 0.05
    drawn = sde_step(kind, x, v, sigma, sigma_next, generator=g, logp_reduce=reduce)
    again = sde_step(kind, x, v, sigma, sigma_next, prev_sample=drawn.prev_sample, logp_reduce=reduce)
    ratio = torch.exp(again.log_prob - drawn.log_prob)
    assert torch.allclose(ratio, torch.ones(6), atol=1e-5, rtol=0)
    # a different sample has a different log-prob (the test is not vacuous)
    other = sde_step(kind, x, v, sigma, sigma_next, prev_sample=drawn.prev_sample + 0.3, logp_reduce=reduce)
    assert (other.log_prob < drawn.log_prob).all()


@pytest.mark.parametrize("kind", STOCHASTIC)
def test_bf16_inputs_give_float32_log_probs(kind):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, generator=g).bfloat16()
    v = torch.randn(4, 16, generator=g).bfloat16()
    out = sde_step(kind, x, v, 0.7, 0.6, generator=g)
    assert out.prev_sample.dtype == torch.bfloat16
    assert out.log_prob.dtype == torch.float32 and out.mean.dtype == torch.float32
    # it is the float32 density of the bf16 sample actually returned
    ref = sde_step(kind, x.float(), v.float(), 0.7, 0.6, prev_sample=out.prev_sample.float())
    assert torch.allclose(out.log_prob, ref.log_prob, atol=1e-6)
    again = sde_step(kind, x, v, 0.7, 0.6, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


def test_gaussian_log_prob_matches_torch_distribution():
    y, m = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    std = torch.tensor([0.3, 1.0, 2.0])
    ref = torch.distributions.Normal(m, std[:, None, None]).log_prob(y)
    assert torch.allclose(gaussian_log_prob(y, m, std, "sum"), ref.sum((1, 2)), atol=1e-4)
    assert torch.allclose(gaussian_log_prob(y, m, std, "mean"), ref.mean((1, 2)), atol=1e-5)


def _run_gaussian(kind, num_steps, *, n=100_000, a=0.7, seed=0):
    pipe = GaussianPipeline(torch.tensor([1.5, -0.8]), 0.5)
    g = torch.Generator().manual_seed(seed)
    x = pipe.initial_noise(n, generator=g)
    sig = pipe.sigmas(num_steps)
    for k in range(num_steps):
        s, sn = sig[k].expand(n), sig[k + 1].expand(n)
        step_kind = kind if k < num_steps - 1 else "ode"  # the last step, to sigma 0, by the ODE
        x = sde_step(step_kind, x, pipe.velocity(x, s, {}), s, sn, noise_level=a, generator=g).prev_sample
    return pipe, x


@pytest.mark.parametrize("kind", ["flow_sde", "dance_sde"])
def test_sde_keeps_gaussian_marginals(kind):
    pipe, x = _run_gaussian(kind, 100)
    rel_mean = ((x.mean(0) - pipe.mu) / pipe.mu).abs()
    rel_var = ((x.var(0) - pipe.s**2) / pipe.s**2).abs()
    assert (rel_mean < 0.03).all(), rel_mean
    assert (rel_var < 0.03).all(), rel_var


def test_ode_at_10_steps_is_far_worse():
    pipe, x = _run_gaussian("ode", 10)
    rel_var = ((x.var(0) - pipe.s**2) / pipe.s**2).abs()
    # Euler discretisation at 10 steps shrinks the variance by about a quarter, 5x the 3% that the SDEs meet
    # at 100 steps (test_sde_keeps_gaussian_marginals): that gap is the step count, not the kernel.
    assert (rel_var > 0.15).all(), rel_var
    assert (x.var(0) < pipe.s**2).all()


@pytest.mark.parametrize("a", [0.5, 0.8, 1.0])
def test_cps_keeps_forward_marginal_of_point_mass(a):
    mu = torch.tensor([2.0, -1.0, 0.5])
    pipe = GaussianPipeline(mu, 0.0)  # point mass: x - sigma v = mu exactly
    n, K = 40_000, 12
    g = torch.Generator().manual_seed(4)
    x = pipe.initial_noise(n, generator=g)
    sig = pipe.sigmas(K)
    for k in range(K - 1):  # the last step to sigma 0 has std 0 for cps (checked in test_bad_inputs)
        s, sn = sig[k].expand(n), sig[k + 1].expand(n)
        x = sde_step("cps", x, pipe.velocity(x, s, {}), s, sn, noise_level=a, generator=g).prev_sample
        # forward marginal (1 - sigma') mu + sigma' eps: mean (1 - sigma') mu, std sigma' per coordinate
        se = float(sn[0]) / math.sqrt(n)
        assert ((x.mean(0) - (1 - sn[0]) * mu).abs() < 5 * se).all()
        assert ((x.std(0) / sn[0] - 1).abs() < 0.02).all()


def test_bad_inputs():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown kernel kind 'ddim'"):
        sde_step("ddim", x, v, 0.5, 0.4)
    with pytest.raises(ValueError, match="v must have the shape of x"):
        sde_step("flow_sde", x, torch.randn(2, 4), 0.5, 0.4)
    with pytest.raises(ValueError, match="drift must have the shape"):
        sde_step("flow_sde", x, v, 0.5, 0.4, drift=torch.randn(3, 3))
    with pytest.raises(ValueError, match="prev_sample must have the shape"):
        sde_step("cps", x, v, 0.5, 0.4, prev_sample=torch.randn(2))
    with pytest.raises(ValueError, match="noise must have the shape"):
        sde_step("cps", x, v, 0.5, 0.4, noise=torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match=r"0 <= sigma_next < sigma <= 1.*sigma=1.5"):
        sde_step("flow_sde", x, v, 1.5, 0.4)
    with pytest.raises(ValueError, match="0 <= sigma_next < sigma <= 1"):
        sde_step("flow_sde", x, v, 0.5, -0.1)
    with pytest.raises(ValueError, match=r"row 1 has sigma=0.4.*sigma_next=0.4"):
        sde_step("dance_sde", x, v, torch.tensor([0.5, 0.4]), torch.tensor([0.4, 0.4]))
    with pytest.raises(ValueError, match="0 <= sigma_next < sigma <= 1"):
        sde_step("ode", x, v, 0.3, 0.5)
    with pytest.raises(ValueError, match=r"shape \[\] or \[B\]"):
        sde_step("flow_sde", x, v, torch.tensor([0.5, 0.5, 0.5]), 0.4)
    with pytest.raises(ValueError, match="noise_level=0.0 is invalid for kind='flow_sde'.*use kind='ode'"):
        sde_step("flow_sde", x, v, 0.5, 0.4, noise_level=0.0)
    with pytest.raises(ValueError, match="noise_level=-0.3 is invalid for kind='dance_sde'"):
        sde_step("dance_sde", x, v, 0.5, 0.4, noise_level=-0.3)
    with pytest.raises(ValueError, match=r"kind='cps': valid range is 0 < noise_level <= 1"):
        sde_step("cps", x, v, 0.5, 0.4, noise_level=1.2)
    with pytest.raises(ValueError, match="sigma_next == 0"):
        sde_step("cps", x, v, 0.1, 0.0)
    with pytest.raises(ValueError, match="logp_reduce='max'; valid values"):
        sde_step("flow_sde", x, v, 0.5, 0.4, logp_reduce="max")
    with pytest.raises(ValueError, match="not both"):
        sde_step("flow_sde", x, v, 0.5, 0.4, prev_sample=x, noise=x)
    assert set(KINDS) == {"ode", "flow_sde", "dance_sde", "cps"}
