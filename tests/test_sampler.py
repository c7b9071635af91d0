"""flowrl.flow.sampler: rollout fields, ratio 1 through the sampler, SDE window, shared noise, ODE completion."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from flow_testing import GaussianPipeline, TinyNNPipeline  # noqa: E402

import flowrl  # noqa: E402
from flowrl.flow import Guidance, complete_with_ode, ode_complete, recompute_log_prob, rollout  # noqa: E402
from flowrl.flow.sde import sde_step  # noqa: E402

torch.set_num_threads(1)
STOCHASTIC = ("flow_sde", "dance_sde", "cps")


def test_rollout_fields():
    pipe = TinyNNPipeline()
    traj = rollout(pipe, ["a cat", "a dog"], num_steps=6, samples_per_prompt=3, cfg_scale=2.0, seed=0)
    assert traj.latents.shape == (6, 7, 2, 4, 4)
    assert traj.log_probs.shape == (6, 6) and traj.log_probs.dtype == torch.float32
    assert traj.sde_mask.tolist() == [True] * 5 + [False]  # the last step, to sigma 0, by the ODE
    assert torch.isfinite(traj.log_probs[:, :5]).all() and torch.isnan(traj.log_probs[:, 5]).all()
    assert traj.sigmas.shape == (7,) and traj.sigmas[0] == 1 and traj.sigmas[-1] == 0
    assert traj.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert traj.prompts == ["a cat"] * 3 + ["a dog"] * 3
    assert traj.cond["ids"].shape == (6,) and "neg_ids" in traj.cond
    assert torch.equal(traj.cond["ids"][:3], pipe.encode_prompts(["a cat"] * 3)["ids"])
    assert traj.samples.shape == (6, 2, 4, 4) and traj.samples.min() >= 0 and traj.samples.max() <= 1
    assert torch.equal(traj.samples, pipe.decode(traj.final_latents))
    assert traj.sde_steps.tolist() == [0, 1, 2, 3, 4]
    assert traj.process_rewards is None and traj.drifts is None and not traj.guided_mask.any()


def test_rollout_steps_follow_sde_step():
    """Replaying the stored latents through sde_step (same noise) reproduces every log-prob and next latent."""
    pipe = TinyNNPipeline()
    traj = rollout(pipe, ["x"], num_steps=4, samples_per_prompt=2, kind="dance_sde", noise_level=0.5, seed=1)
    for k in range(4):
        x = traj.latents[:, k]
        s, sn = traj.sigmas[k].expand(2), traj.sigmas[k + 1].expand(2)
        v = pipe.velocity(x, s, traj.cond)
        if traj.sde_mask[k]:
            out = sde_step("dance_sde", x, v, s, sn, noise_level=0.5)
            noise = (traj.latents[:, k + 1] - out.mean) / out.std[:, None, None, None]
            replay = sde_step("dance_sde", x, v, s, sn, noise_level=0.5, noise=noise)
            assert torch.allclose(replay.prev_sample, traj.latents[:, k + 1], atol=1e-5)
            assert torch.allclose(replay.log_prob, traj.log_probs[:, k], atol=1e-5)
        else:
            assert torch.allclose(traj.latents[:, k + 1], x - (s - sn)[:, None, None, None] * v, atol=1e-6)


@pytest.mark.parametrize("kind", STOCHASTIC)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_ratio_is_one_through_sampler(kind, dtype):
    pipe = TinyNNPipeline(dtype=dtype)
    traj = rollout(pipe, ["a", "bb"], num_steps=5, samples_per_prompt=2, kind=kind, noise_level=0.8,
                   cfg_scale=3.0, seed=3)
    for k in traj.sde_steps.tolist():
        with torch.no_grad():
            lp = recompute_log_prob(pipe, traj, k).log_prob
        assert torch.allclose(torch.exp(lp - traj.log_probs[:, k]), torch.ones(4), atol=1e-5, rtol=0)
    # a minibatch of rows, each at its own step
    rows = torch.tensor([3, 0, 2])
    steps = torch.tensor([0, 3, 1])
    with torch.no_grad():
        lp = recompute_log_prob(pipe, traj, steps, index=rows).log_prob
    assert torch.allclose(torch.exp(lp - traj.log_probs[rows, steps]), torch.ones(3), atol=1e-5, rtol=0)


def test_recompute_changes_with_weights_and_carries_gradients():
    pipe = TinyNNPipeline()
    traj = rollout(pipe, ["a", "b"], num_steps=4, samples_per_prompt=2, seed=0)
    out = recompute_log_prob(pipe, traj, 1)
    out.log_prob.sum().backward()
    grads = [p.grad for p in pipe.trainable.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for p in pipe.trainable.parameters():
            p.add_(0.05 * torch.randn_like(p))
        lp = recompute_log_prob(pipe, traj, 1).log_prob
    assert (lp - traj.log_probs[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("logprob_mean", ["unguided", "guided"])
def test_recompute_ratio_is_one_with_guidance(logprob_mean):
    pipe = TinyNNPipeline()

    def prm(x, sigma, cond):
        return -(x.float() - 0.5).pow(2).mean(dim=(1, 2, 3)) * (1 + sigma)

    guide = Guidance(prm, scale=2.0, window=(1, 3), logprob_mean=logprob_mean)
    traj = rollout(pipe, ["a"], num_steps=5, samples_per_prompt=3, guidance=guide, seed=5)
    assert traj.guided_mask.tolist() == [False, True, True, False, False]
    assert torch.isfinite(traj.process_rewards[:, 1:3]).all()
    assert torch.isnan(traj.process_rewards[:, [0, 3, 4]]).all()
    assert (traj.drifts is not None) == (logprob_mean == "guided")
    for k in traj.sde_steps.tolist():
        with torch.no_grad():
            lp = recompute_log_prob(pipe, traj, k).log_prob
        assert torch.allclose(torch.exp(lp - traj.log_probs[:, k]), torch.ones(3), atol=1e-5, rtol=0)
    # on a guided step the stored log-prob is the density under the chosen mean, and the choices differ
    x, s, sn = traj.latents[:, 1], traj.sigmas[1].expand(3), traj.sigmas[2].expand(3)
    with torch.no_grad():
        v = pipe.velocity(x, s, traj.cond)
        grad = torch.autograd.functional.jacobian(lambda z: prm(z, s, None).sum(), x)
        drift = 2.0 * (s - sn)[:, None, None, None] * grad  # lambda Delta grad r
        unguided = sde_step("flow_sde", x, v, s, sn, prev_sample=traj.latents[:, 2]).log_prob
        guided = sde_step("flow_sde", x, v, s, sn, prev_sample=traj.latents[:, 2], drift=drift).log_prob
    assert (unguided - guided).abs().min() > 1e-4
    expected = unguided if logprob_mean == "unguided" else guided
    assert torch.allclose(traj.log_probs[:, 1], expected, atol=1e-5)
    if logprob_mean == "guided":
        assert torch.allclose(traj.drifts[:, 1], drift, atol=1e-6)
        assert torch.equal(traj.drifts[:, 0], torch.zeros_like(drift))


def test_sde_window():
    pipe = TinyNNPipeline()
    traj = rollout(pipe, ["a"], num_steps=6, samples_per_prompt=2, sde_window=(2, 4), seed=0)
    assert traj.sde_mask.tolist() == [False, False, True, True, False, False]
    assert torch.isnan(traj.log_probs[:, [0, 1, 4, 5]]).all() and torch.isfinite(traj.log_probs[:, 2:4]).all()
    # ODE steps are deterministic: both samples (different noise) follow x - Delta v exactly
    for k in (0, 1, 4, 5):
        x = traj.latents[:, k]
        v = pipe.velocity(x, traj.sigmas[k].expand(2), traj.cond)
        d = traj.sigmas[k] - traj.sigmas[k + 1]
        assert torch.allclose(traj.latents[:, k + 1], x - d * v, atol=1e-6)
    with pytest.raises(ValueError, match=r"steps \[1\] were ODE steps.*SDE steps are \[2, 3\]"):
        recompute_log_prob(pipe, traj, 1)
    mask = torch.tensor([True, False, True, False, True, False])
    traj2 = rollout(pipe, ["a"], num_steps=6, sde_window=mask, kind="cps", seed=0)
    assert traj2.sde_mask.tolist() == mask.tolist()
    # flow_sde may also take the last step stochastically when asked
    traj3 = rollout(pipe, ["a"], num_steps=3, sde_window=(0, 3), seed=0)
    assert torch.isfinite(traj3.log_probs).all()


def test_same_noise_per_prompt():
    pipe = TinyNNPipeline()
    traj = rollout(pipe, ["a", "b"], num_steps=4, samples_per_prompt=3, same_noise_per_prompt=True, seed=0)
    x0 = traj.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[0], x0[2]) and torch.equal(x0[3], x0[5])
    assert not torch.equal(x0[0], x0[3])
    assert not torch.equal(traj.final_latents[0], traj.final_latents[1])  # SDE noise differs
    traj = rollout(pipe, ["a", "b"], num_steps=4, samples_per_prompt=3, seed=0)
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])


def test_seed_determinism_and_flowrl_sample():
    pipe = TinyNNPipeline()
    a = flowrl.sample(pipe, ["a", "b"], num_steps=4, seed=7, samples_per_prompt=2)
    b = flowrl.sample(pipe, ["a", "b"], num_steps=4, seed=7, samples_per_prompt=2)
    c = flowrl.sample(pipe, ["a", "b"], num_steps=4, seed=8, samples_per_prompt=2)
    assert a.shape == (4, 2, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    samples, traj = flowrl.sample(pipe, "a", num_steps=3, kind="cps", noise_level=0.8, seed=1,
                                  return_trajectory=True, progress=True)
    assert torch.equal(samples, traj.samples) and traj.kind == "cps" and traj.latents.shape[:2] == (1, 4)
    ode = flowrl.sample(pipe, ["a"], num_steps=4, kind="ode", seed=1)
    assert ode.shape == (1, 2, 4, 4)


def test_cfg_changes_velocity():
    pipe = TinyNNPipeline()
    plain = rollout(pipe, ["a"], num_steps=3, kind="ode", seed=0)
    cfg1 = rollout(pipe, ["a"], num_steps=3, kind="ode", seed=0, cfg_scale=1.0)
    cfg4 = rollout(pipe, ["a"], num_steps=3, kind="ode", seed=0, cfg_scale=4.0)
    assert torch.allclose(plain.final_latents, cfg1.final_latents, atol=1e-5)  # v_u + 1 (v_c - v_u) = v_c
    assert (plain.final_latents - cfg4.final_latents).abs().max() > 1e-3


def test_ode_completion():
    pipe = TinyNNPipeline()
    ode = rollout(pipe, ["a", "b"], num_steps=5, kind="ode", cfg_scale=2.0, seed=0, decode=False)
    for k in range(6):  # an ODE run completed from any of its states ends where it ended
        out = complete_with_ode(pipe, ode, k, decode=False)
        assert torch.allclose(out, ode.final_latents, atol=1e-6)
    sde = rollout(pipe, ["a", "b"], num_steps=5, seed=1)
    k = 2
    x = sde.latents[:, k]
    for j in range(k, 5):  # by hand: Euler steps from sigma_k to 0
        v = pipe.velocity(x, sde.sigmas[j].expand(2), sde.cond)
        x = x - (sde.sigmas[j] - sde.sigmas[j + 1]) * v
    assert torch.allclose(complete_with_ode(pipe, sde, k, decode=False), x, atol=1e-6)
    assert torch.allclose(complete_with_ode(pipe, sde, k), pipe.decode(x), atol=1e-6)
    rows = torch.tensor([1])
    assert torch.allclose(complete_with_ode(pipe, sde, k, index=rows, decode=False), x[1:], atol=1e-6)
    with pytest.raises(ValueError, match=r"start must be in \[0, K=5\]"):
        ode_complete(pipe, x, sde.sigmas, sde.cond, start=6)


def test_point_mass_ode_sample_is_exact():
    mu = torch.tensor([0.7, -1.2])
    out = flowrl.sample(GaussianPipeline(mu, 0.0), ["p"], num_steps=7, kind="ode", seed=0, samples_per_prompt=5)
    assert torch.allclose(out, mu.expand(5, 2), atol=1e-5)


def test_bad_inputs():
    pipe = TinyNNPipeline()
    with pytest.raises(ValueError, match="prompts is empty"):
        rollout(pipe, [], num_steps=3)
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1"):
        rollout(pipe, ["a"], num_steps=3, samples_per_prompt=0)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        rollout(pipe, ["a"], num_steps=0)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        rollout(pipe, ["a"], num_steps=3, kind="euler")
    with pytest.raises(ValueError, match=r"0 <= start < stop <= num_steps=3"):
        rollout(pipe, ["a"], num_steps=3, sde_window=(2, 5))
    with pytest.raises(ValueError, match="bool mask of length num_steps=3"):
        rollout(pipe, ["a"], num_steps=3, sde_window=[True, False])
    with pytest.raises(ValueError, match="sde_window was given with kind='ode'"):
        rollout(pipe, ["a"], num_steps=3, kind="ode", sde_window=(0, 2))
    with pytest.raises(ValueError, match="cps.*sigma_next == 0"):
        rollout(pipe, ["a"], num_steps=3, kind="cps", sde_window=(0, 3))
    with pytest.raises(ValueError, match="seed or generator, not both"):
        rollout(pipe, ["a"], num_steps=3, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(pipe, ["a"], num_steps=3, sigmas=torch.tensor([1.0, 0.5, 0.6, 0.0]))
    with pytest.raises(ValueError, match=r"shape \[num_steps \+ 1\]"):
        rollout(pipe, ["a"], num_steps=3, sigmas=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="noise_level=1.5 is invalid for kind='cps'"):
        rollout(pipe, ["a"], num_steps=3, kind="cps", noise_level=1.5)
    with pytest.raises(ValueError, match="KL-mode guidance.*ODE steps \\[2\\]"):
        rollout(pipe, ["a"], num_steps=3, guidance=Guidance(lambda x, s, c: x.sum((1, 2, 3)), kl_beta=0.1))
    traj = rollout(pipe, ["a"], num_steps=3, seed=0)
    with pytest.raises(ValueError, match=r"step_index must be in \[0, K=3\)"):
        recompute_log_prob(pipe, traj, 3)
    with pytest.raises(ValueError, match="one step per row"):
        recompute_log_prob(pipe, traj, torch.tensor([0, 1]))
