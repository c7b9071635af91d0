"""The reference implementations' forms of three flow-training details, each against a slow reference written in
the test from the reference's own formula (yifan123/flow_grpo, YunzeTong/TurningPoint-GRPO):

- the gradient through classifier-free guidance (``flow.cfg_grad``: both branches, or the unconditional one
  detached);
- the KL to the reference policy (``flow.kl_form``: the true KL of the step kernels, or Flow-GRPO's
  train_sd3.py form ||mu - mu_ref||^2 / (2 std_dev_t^2) with std_dev_t = g, no Delta);
- the cps log-prob (``flow.logp_form``: the true density, or Flow-GRPO's and TP-GRPO's -(x' - mu)^2).

Each is checked on the pure function and through the trainer's update (``ppo_backward``) on a toy adapter.
"""
from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flowrl.flow.sampler import rollout
from flowrl.flow.sde import gaussian_log_prob, kernel_kl, log_prob_in_form, sde_step
from flowrl.pipelines.base import FlowAdapterBase, cfg_velocity, check_cond
from flowrl.train.algorithms.flow_ppo import ppo_backward

W = 4.5  # the CFG scale of Flow-GRPO's SD3 recipes


class Net(nn.Module):
    """v(x, sigma, c) = MLP([flatten(x), emb(c), sigma]) on latents [B, 2, 3, 3]."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(8, 4)
        self.l1, self.l2 = nn.Linear(18 + 4 + 1, 16), nn.Linear(16, 18)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x, sigma, ids):
        h = torch.cat([x.flatten(1), self.embed(ids), sigma.float()[:, None]], dim=1)
        return self.l2(torch.tanh(self.l1(h))).reshape(x.shape)


class ToyAdapter(FlowAdapterBase):
    """A FlowAdapterBase adapter around :class:`Net` (its CFG goes through ``cfg_velocity`` as SD3's does)."""

    cond_keys = ("ids",)

    def __init__(self, seed: int = 0):
        self.transformer = Net(seed)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def _forward(self, x, sigma, c):
        return self.denoiser(x, sigma, c["ids"])

    def encode_prompts(self, prompts, *, cfg=False):
        ids = torch.tensor([1 + len(p) % 7 for p in prompts])
        return {"ids": ids, "negative_ids": torch.zeros_like(ids)} if cfg else {"ids": ids}

    def velocity(self, x, sigma, cond, *, cfg_scale=None):
        check_cond(cond, self.cond_keys, x.shape[0], cfg_scale=cfg_scale)
        return cfg_velocity(self._forward, x, sigma, cond, self.cond_keys, cfg_scale, self.cfg_grad)

    def initial_noise(self, batch_size, *, generator=None):
        return torch.randn((batch_size, 2, 3, 3), generator=generator)

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def decode(self, x):
        return x


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_grads_close(a, b, **tol):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n, **tol)


# ---------------------------------------------------------------------------------------------- the CFG gradient
def test_cfg_velocity_gradient_is_w_times_the_conditional_one_when_the_unconditional_branch_is_detached():
    net = Net(0)
    x = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.5, 0.2])
    cond = {"ids": torch.tensor([1, 2, 3]), "negative_ids": torch.zeros(3, dtype=torch.long)}
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    forward = lambda xx, ss, c: net(xx, ss, c["ids"])

    def grad_of(fn):
        net.zero_grad()
        (fn() * probe).sum().backward()
        return grads(net)

    # the references: autograd on each branch alone, in its own forward call
    g_c = grad_of(lambda: net(x, sigma, cond["ids"]))
    g_u = grad_of(lambda: net(x, sigma, cond["negative_ids"]))
    for mode, want in (("cond_only", {n: W * g_c[n] for n in g_c}),
                       ("both", {n: W * g_c[n] - (W - 1) * g_u[n] for n in g_c})):
        got = grad_of(lambda: cfg_velocity(forward, x, sigma, cond, ("ids",), W, mode))
        assert_grads_close(got, want, atol=1e-5, rtol=1e-5)
    # the value does not depend on the mode
    with torch.no_grad():
        v_both = cfg_velocity(forward, x, sigma, cond, ("ids",), W, "both")
        v_cond = cfg_velocity(forward, x, sigma, cond, ("ids",), W, "cond_only")
        v_ref = net(x, sigma, cond["negative_ids"]) + W * (net(x, sigma, cond["ids"]) - net(x, sigma, cond["negative_ids"]))
    assert torch.equal(v_both, v_cond)
    torch.testing.assert_close(v_both, v_ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cfg_grad='uncond'; valid values are"):
        cfg_velocity(forward, x, sigma, cond, ("ids",), W, "uncond")


def test_the_adapter_context_sets_the_cfg_gradient_and_restores_it():
    pipe = ToyAdapter()
    assert pipe.cfg_grad == "both"
    with pytest.raises(RuntimeError, match="boom"), pipe.cfg_gradient("cond_only"):
        assert pipe.cfg_grad == "cond_only"
        raise RuntimeError("boom")
    assert pipe.cfg_grad == "both"
    with pytest.raises(ValueError, match="valid values are"), pipe.cfg_gradient("cond"):
        pass


# ---------------------------------------------------------------------------------------------- slow references
def flow_grpo_sde_ref(v, x, sigma, sigma_prev, sigma_max, a):
    """Flow-GRPO's sde_step_with_logprob, sde branch, one sample (dt = sigma_prev - sigma < 0): (mean, std_dev_t)."""
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t


def flow_grpo_cps_ref(v, x, prev, sigma, sigma_prev, a):
    """Flow-GRPO's / TP-GRPO's sde_step_with_logprob, cps branch, one sample: (log_prob, mean, std_dev_t)."""
    std_dev_t = sigma_prev * math.sin(a * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * math.sqrt(sigma_prev**2 - std_dev_t**2)
    log_prob = -((prev - mean) ** 2)  # "remove all constants"
    return log_prob.mean(), mean, std_dev_t


# ---------------------------------------------------------------------------------------------- the KL form
def test_kernel_kl_against_flow_grpo_formula_and_the_gaussian_kl():
    # by hand: sigma 0.5 -> 0.4, a 0.7: g = 0.7, Delta = 0.1, std^2 = 0.049; mu - mu_ref = (0.1, -0.2), mean 0.025
    mean, ref = torch.tensor([[0.3, -0.1]]), torch.tensor([[0.2, 0.1]])
    std, delta = torch.tensor([0.7 * math.sqrt(0.1)]), torch.tensor([0.1])
    assert kernel_kl(mean, ref, std, delta, kind="flow_sde", form="flow_grpo_sd3").item() == pytest.approx(0.025 / 0.98, rel=1e-6)
    assert kernel_kl(mean, ref, std, delta, kind="flow_sde").item() == pytest.approx(0.025 / 0.098, rel=1e-6)

    gen = torch.Generator().manual_seed(0)
    sig = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0])
    a = 0.7
    for kind in ("flow_sde", "dance_sde", "cps"):
        k = torch.tensor([0, 1, 2, 3] if kind == "cps" else [0, 1, 2, 3, 4])  # cps has no density at sigma 0
        x = torch.randn(len(k), 2, 3, 3, generator=gen)
        v, v_ref = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
        s, sn = sig[k], sig[k + 1]
        out, out_ref = sde_step(kind, x, v, s, sn, noise_level=a), sde_step(kind, x, v_ref, s, sn, noise_level=a)
        got = {f: kernel_kl(out.mean, out_ref.mean, out.std, s - sn, kind=kind, form=f) for f in ("true_kl", "flow_grpo_sd3")}
        for i in range(len(k)):
            si, sni = float(s[i]), float(sn[i])
            if kind == "flow_sde":  # mean and std_dev_t from Flow-GRPO's own formula
                mu, g = flow_grpo_sde_ref(v[i].double(), x[i].double(), si, sni, float(sig[1]), a)
                mu_ref, _ = flow_grpo_sde_ref(v_ref[i].double(), x[i].double(), si, sni, float(sig[1]), a)
                std_dev_t = g
            elif kind == "cps":  # std_dev_t is the kernel std there
                _, mu, std_dev_t = flow_grpo_cps_ref(v[i].double(), x[i].double(), x[i].double(), si, sni, a)
                _, mu_ref, _ = flow_grpo_cps_ref(v_ref[i].double(), x[i].double(), x[i].double(), si, sni, a)
            else:  # DanceGRPO's constant g = eta, with the same mean
                mu, mu_ref, std_dev_t = out.mean[i].double(), out_ref.mean[i].double(), a
            want = ((mu - mu_ref) ** 2).mean() / (2 * std_dev_t**2)  # train_sd3.py: mean over (C, H, W), / 2 std_dev_t^2
            assert got["flow_grpo_sd3"][i].item() == pytest.approx(want.item(), rel=2e-5), (kind, i)
            p = torch.distributions.Normal(out.mean[i].double(), out.std[i].double())
            q = torch.distributions.Normal(out_ref.mean[i].double(), out.std[i].double())
            true = torch.distributions.kl_divergence(p, q).mean()
            assert got["true_kl"][i].item() == pytest.approx(true.item(), rel=2e-5), (kind, i)
            ratio = 1.0 if kind == "cps" else si - sni
            assert got["flow_grpo_sd3"][i].item() == pytest.approx(ratio * true.item(), rel=2e-5)
        # the default form is, bit for bit, the expression flowrl used before the form was named
        dims = tuple(range(1, out.mean.dim()))
        assert torch.equal(got["true_kl"], ((out.mean - out_ref.mean) ** 2).mean(dim=dims) / (2 * out.std**2))
    with pytest.raises(ValueError, match="kl_form='kl'; valid values are"):
        kernel_kl(mean, ref, std, delta, kind="flow_sde", form="kl")
    with pytest.raises(ValueError, match="kind='ode' has no kernel density"):
        kernel_kl(mean, ref, std, delta, kind="ode")


# ---------------------------------------------------------------------------------------------- the cps log-prob
def test_cps_log_prob_reference_form_against_the_reference_code():
    gen = torch.Generator().manual_seed(3)
    a, sig = 0.7, torch.tensor([1.0, 0.7, 0.4, 0.15, 0.0])
    k = torch.tensor([0, 1, 2, 2, 1, 0])  # sigma_next > 0: cps has no density at sigma 0
    s, sn = sig[k], sig[k + 1]
    x = torch.randn(len(k), 2, 3, 3, generator=gen)
    v = torch.randn(x.shape, generator=gen).requires_grad_(True)
    prev = sde_step("cps", x, v.detach(), s, sn, noise_level=a, generator=gen).prev_sample
    direct = sde_step("cps", x, v, s, sn, noise_level=a, prev_sample=prev, logp_form="flow_grpo_cps")
    density = sde_step("cps", x, v, s, sn, noise_level=a, prev_sample=prev)
    converted = log_prob_in_form(density.log_prob, density.std, 18, form="flow_grpo_cps")
    ref = torch.stack([flow_grpo_cps_ref(v[i], x[i], prev[i], float(s[i]), float(sn[i]), a)[0] for i in range(len(k))])
    torch.testing.assert_close(direct.log_prob, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(converted, ref, atol=1e-6, rtol=1e-5)
    # the gradient (what training sees) is the reference's: d/dv of -mean (x' - mu)^2
    (g_ref,) = torch.autograd.grad(ref.sum(), v, retain_graph=True)
    (g_conv,) = torch.autograd.grad(converted.sum(), v)
    torch.testing.assert_close(g_conv, g_ref, atol=1e-6, rtol=1e-4)
    # sum over the elements instead of the mean
    dsum = sde_step("cps", x, v.detach(), s, sn, noise_level=a, prev_sample=prev, logp_reduce="sum")
    torch.testing.assert_close(log_prob_in_form(dsum.log_prob, dsum.std, 18, reduce="sum", form="flow_grpo_cps"),
                               ref.detach() * 18, atol=1e-5, rtol=1e-5)
    # the density form is the true Gaussian log-density, unchanged
    assert torch.equal(log_prob_in_form(density.log_prob, density.std, 18), density.log_prob)
    assert torch.equal(gaussian_log_prob(prev, density.mean, density.std), density.log_prob)
    with pytest.raises(ValueError, match="kind='flow_sde' takes logp_form='density'"):
        sde_step("flow_sde", x, v, s, sn, prev_sample=prev, logp_form="flow_grpo_cps")
    with pytest.raises(ValueError, match="logp_form='cps'; valid values are"):
        log_prob_in_form(density.log_prob, density.std, 18, form="cps")


# ---------------------------------------------------------------------------------------------- through ppo_backward
def ppo_setup(*, kind="flow_sde", cfg_scale=None, kl_beta=0.0, **flow):
    """A rollout of the toy adapter and the pieces ``ppo_backward`` reads from a task (the trainer's own call)."""
    pipe, ref = ToyAdapter(0), ToyAdapter(5)
    traj = rollout(pipe, ["ab", "abc"], num_steps=4, kind=kind, noise_level=0.7, cfg_scale=cfg_scale,
                   samples_per_prompt=3, seed=0, decode=False)
    steps = traj.sde_steps
    b, T = traj.batch_size, len(steps)
    fc = dict(steps_per_backward=0, micro_batch=0, cfg_grad="both", logp_form="density", kl_form="true_kl",
              kl_weight={"name": "uniform"})
    fc.update(flow)
    cfg = SimpleNamespace(flow=SimpleNamespace(**fc), loss=SimpleNamespace(
        name="ppo_clip", agg="token_mean", params={"eps_low": 1e-4, "adv_clip": 5.0}, kl_beta=kl_beta))
    task = SimpleNamespace(cfg=cfg, pipe=pipe, ref=ref, reference=lambda: contextlib.nullcontext(ref),
                           grad_sync=lambda last: contextlib.nullcontext(),
                           acc=SimpleNamespace(backward=lambda loss: loss.backward()))
    batch = SimpleNamespace(mask=torch.ones(b, T, dtype=torch.bool), old_logp=traj.log_probs[:, steps])
    adv = torch.linspace(-1.0, 1.0, b * T).reshape(b, T)
    return task, SimpleNamespace(side={"traj": traj, "steps": steps}), batch, adv


def test_ppo_backward_gradient_through_cfg_follows_flow_cfg_grad():
    got = {}
    for mode in ("cond_only", "both"):
        task, roll, batch, adv = ppo_setup(cfg_scale=W, cfg_grad=mode)
        pipe, traj, steps = task.pipe, roll.side["traj"], roll.side["steps"]
        metrics = ppo_backward(task, roll, torch.arange(traj.batch_size), batch, adv)
        assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and pipe.cfg_grad == "both"
        got[mode] = grads(pipe.transformer)
        # reference: on-policy the PPO-clip gradient is -mean(A d logp); v from separate branch calls
        pipe.transformer.zero_grad()
        net, loss = pipe.transformer, 0.0
        for t, kk in enumerate(steps.tolist()):
            x, prev = traj.latents[:, kk], traj.latents[:, kk + 1]
            s, sn = traj.sigmas[kk].expand(len(x)), traj.sigmas[kk + 1].expand(len(x))
            v_c, v_u = net(x, s, traj.cond["ids"]), net(x, s, traj.cond["negative_ids"])
            if mode == "cond_only":
                v_u = v_u.detach()
            lp = sde_step("flow_sde", x, v_u + W * (v_c - v_u), s, sn, noise_level=0.7, prev_sample=prev).log_prob
            loss = loss - (adv[:, t] * lp).sum() / adv.numel()
        loss.backward()
        assert_grads_close(got[mode], grads(net), atol=1e-6, rtol=1e-4)
    # the two modes really differ (by (w - 1) dv_u)
    assert not torch.allclose(got["cond_only"]["l2.weight"], got["both"]["l2.weight"], rtol=0.05)
    task, roll, batch, adv = ppo_setup(cfg_scale=W, cfg_grad="cond_only")
    task.pipe = SimpleNamespace(**{k: getattr(task.pipe, k) for k in ("velocity", "device", "dtype")})
    with pytest.raises(ValueError, match="flow.cfg_grad='cond_only': the model adapter SimpleNamespace has no cfg_gradient"):
        ppo_backward(task, roll, torch.arange(6), batch, adv)


@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
def test_ppo_backward_kl_metric_is_the_named_form(kind):
    """policy/kl against a slow reference from Flow-GRPO's train_sd3.py formula on the stored rollout; with
    flow.kl_weight each step's term is weighted at its starting noise level, w = 0.5 + 3 sigma^2."""
    out = {}
    weighted = {"name": "sigma_power", "power": 2, "scale": 3.0, "floor": 0.5}
    for form, kw in (("true_kl", {"name": "uniform"}), ("flow_grpo_sd3", {"name": "uniform"}), ("weighted", weighted)):
        task, roll, batch, adv = ppo_setup(kind=kind, kl_beta=0.04, kl_form=form if form != "weighted" else
                                           "flow_grpo_sd3", kl_weight=kw)
        traj, steps = roll.side["traj"], roll.side["steps"]
        out[form] = ppo_backward(task, roll, torch.arange(traj.batch_size), batch, adv)["policy/kl"]
    want, want_w, sig = 0.0, 0.0, traj.sigmas
    with torch.no_grad():
        for kk in steps.tolist():
            for i in range(traj.batch_size):
                x, prev = traj.latents[i, kk].double(), traj.latents[i, kk + 1].double()
                c = {"ids": traj.cond["ids"][i:i + 1]}
                v = task.pipe.velocity(x[None].float(), sig[kk:kk + 1], c)[0].double()
                v_ref = task.ref.velocity(x[None].float(), sig[kk:kk + 1], c)[0].double()
                si, sni = float(sig[kk]), float(sig[kk + 1])
                if kind == "flow_sde":
                    (mu, sd), (mu_ref, _) = (flow_grpo_sde_ref(vv, x, si, sni, float(sig[1]), 0.7) for vv in (v, v_ref))
                else:
                    (_, mu, sd), (_, mu_ref, _) = (flow_grpo_cps_ref(vv, x, prev, si, sni, 0.7) for vv in (v, v_ref))
                want += float(((mu - mu_ref) ** 2).mean() / (2 * sd**2))
                want_w += (0.5 + 3.0 * si**2) * float(((mu - mu_ref) ** 2).mean() / (2 * sd**2))
    want /= traj.batch_size * len(steps)
    want_w /= traj.batch_size * len(steps)
    assert out["flow_grpo_sd3"] == pytest.approx(want, rel=1e-4)
    assert out["weighted"] == pytest.approx(want_w, rel=1e-4) and abs(want_w - want) > 0.1 * want
    if kind == "cps":  # Flow-GRPO's cps std_dev_t is the kernel std: the two forms agree
        assert out["true_kl"] == pytest.approx(want, rel=1e-4)
    else:  # true KL = each step's term / Delta; Delta = 0.25 on this schedule
        assert out["true_kl"] == pytest.approx(want / 0.25, rel=1e-4)


def test_ppo_backward_with_the_cps_reference_log_prob():
    """Ratio exactly 1 on-policy, and the gradient is the reference's -mean(A d/dtheta (-mean (x' - mu)^2))."""
    task, roll, batch, adv = ppo_setup(kind="cps", logp_form="flow_grpo_cps")
    traj, steps, net = roll.side["traj"], roll.side["steps"], task.pipe.transformer
    metrics = ppo_backward(task, roll, torch.arange(traj.batch_size), batch, adv)
    assert metrics["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    got = grads(net)
    net.zero_grad()
    loss = 0.0
    for t, kk in enumerate(steps.tolist()):
        for i in range(traj.batch_size):
            x, prev = traj.latents[i, kk], traj.latents[i, kk + 1]
            v = net(x[None], traj.sigmas[kk:kk + 1], traj.cond["ids"][i:i + 1])[0]
            lp, _, _ = flow_grpo_cps_ref(v, x, prev, float(traj.sigmas[kk]), float(traj.sigmas[kk + 1]), 0.7)
            loss = loss - adv[i, t] * lp / adv.numel()
    loss.backward()
    assert_grads_close(got, grads(net), atol=1e-7, rtol=1e-4)
    # against the density form the policy gradient differs (each step's term is scaled by 1 / (2 std^2))
    task, roll, batch, adv = ppo_setup(kind="cps")
    ppo_backward(task, roll, torch.arange(traj.batch_size), batch, adv)
    assert not torch.allclose(grads(task.pipe.transformer)["l2.weight"], got["l2.weight"], rtol=0.1)


def test_config_refuses_a_form_that_cannot_apply():
    from flowrl.config import ConfigError, load
    from flowrl.train.config import TrainConfig

    cases = [(["flow.cfg_grad=cond_only"], "flow.cfg_grad='cond_only' has no effect without cfg_scale"),
             (["flow.cfg_grad=uncond", "flow.cfg_scale=4.5"], "flow.cfg_grad: 'uncond' is not one of"),
             (["flow.logp_form=flow_grpo_cps"], "kind='flow_sde' takes 'density'"),
             (["flow.kl_form=flow_grpo_sd3"], "flow.kl_form='flow_grpo_sd3' has no effect with loss.kl_beta=0.0")]
    for overrides, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
            load(TrainConfig, None, overrides)
    cfg = load(TrainConfig, None, ["flow.cfg_grad=cond_only", "flow.cfg_scale=4.5", "flow.kind=cps",
                                   "flow.logp_form=flow_grpo_cps", "flow.kl_form=flow_grpo_sd3", "loss.kl_beta=0.01"])
    assert (cfg.flow.cfg_grad, cfg.flow.logp_form, cfg.flow.kl_form) == ("cond_only", "flow_grpo_cps", "flow_grpo_sd3")
    for f in ("sd3/flow_grpo_pickscore.yaml", "wan/flow_grpo.yaml"):
        from pathlib import Path
        cfg = load(TrainConfig, Path(__file__).resolve().parents[1] / "configs" / f)
        assert cfg.flow.kl_form == ("flow_grpo_sd3" if f.startswith("sd3") else "true_kl"), f
