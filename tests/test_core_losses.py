"""Policy losses, KL estimators, aggregation and importance weights against loop references."""
from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from flowrl.core import AGG_MODES, LOSSES, aggregate, compute_policy_loss, importance_weights, kl_estimate
from flowrl.core.losses import gspo, ppo_clip, register_loss


_inputs = ref.loss_inputs


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_reference(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    _, _, values, mask = _inputs(gen)
    values[~mask] = float("nan")  # whatever sits in padding must not leak in
    got = aggregate(values, mask, mode)
    assert got.item() == pytest.approx(ref.aggregate(values, mask, mode), rel=1e-5)
    if mode == "seq_mean_token_sum_norm":
        got = aggregate(values, mask, mode, max_len=40)
        assert got.item() == pytest.approx(ref.aggregate(values, mask, mode, max_len=40), rel=1e-5)


def test_aggregate_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # the empty row counts for nothing
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq_mean_token_mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate(values, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq_mean_token_sum_norm").item() == pytest.approx(10 / (2 * 3))
    assert aggregate(values, mask, "seq_mean_token_sum_norm", max_len=5).item() == pytest.approx(10 / (2 * 5))


# ----------------------------------------------------------------------------- KL
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_reference(kind, gen):
    logp, refp, _, _ = _inputs(gen, spread=1.0)
    torch.testing.assert_close(kl_estimate(logp, refp, kind).double(), _t(ref.kl(logp, refp, kind)), rtol=1e-5, atol=1e-6)


def test_kl_estimate_by_hand():
    logp, refp = torch.zeros(1, 1), torch.full((1, 1), math.log(2.0))  # d = ln 2
    assert kl_estimate(logp, refp, "k1").item() == pytest.approx(-math.log(2))
    assert kl_estimate(logp, refp, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, refp, "k3").item() == pytest.approx(2 - math.log(2) - 1)
    assert kl_estimate(logp, logp, "k3").item() == 0.0


# ----------------------------------------------------------------------------- importance weights
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_importance_weights_match_reference(level, mode, gen):
    trainer, sampler, _, mask = _inputs(gen, spread=0.5 if level == "token" else 0.15)
    kw = dict(level=level, mode=mode, c_max=1.5, c_min=0.7)
    w, metrics = importance_weights(trainer, sampler, mask, **kw)
    want = _t(ref.importance_weights(trainer, sampler, mask, **kw))
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-6)
    changed = [(x == 1.5) if mode == "truncate" else (x == 0.0) for x, m in zip(want.flatten().tolist(), mask.flatten().tolist()) if m]
    frac = metrics[f"is/{mode}d_frac"].item()
    assert 0 < frac < 1 and frac == pytest.approx(sum(changed) / len(changed))
    assert not w.requires_grad


def test_importance_weights_by_hand():
    lr = torch.log(torch.tensor([[3.0, 0.5, 1.5]]))
    mask = torch.ones(1, 3, dtype=torch.bool)
    z = torch.zeros(1, 3)
    w, _ = importance_weights(lr, z, mask, level="token", mode="truncate", c_max=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.5]]))
    w, _ = importance_weights(lr, z, mask, level="token", mode="mask", c_min=0.6, c_max=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.5]]))
    # sequence weight: 3 * 0.5 * 1.5 = 2.25
    w, _ = importance_weights(lr, z, mask, level="sequence", mode="truncate", c_max=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 2.0]]))
    w, _ = importance_weights(lr, z, mask, level="sequence", mode="mask", c_max=2.0)
    torch.testing.assert_close(w, torch.zeros(1, 3))
    w, _ = importance_weights(lr, z, mask, level="sequence", mode="mask", c_max=3.0)
    torch.testing.assert_close(w, torch.full((1, 3), 2.25))


# ----------------------------------------------------------------------------- PPO clip
PPO_PARAMS = [
    {},
    {"eps_high": 0.28},
    {"eps_low": 0.1, "eps_high": 0.3, "dual_clip": 1.5},
    {"dual_clip": 1.5},
    {"adv_clip": 0.5},
    {"is_weights": True},
    {"eps_high": 0.28, "dual_clip": 1.4, "adv_clip": 1.0, "is_weights": True},
]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("params", PPO_PARAMS, ids=lambda p: "-".join(sorted(p)) or "default")
def test_ppo_clip_matches_reference(params, agg, gen):
    logp, old, adv, mask = _inputs(gen, spread=0.6)
    params = dict(params)
    if params.get("is_weights"):
        params["is_weights"] = torch.rand(mask.shape, generator=gen) * 2
    loss, metrics = compute_policy_loss("ppo_clip", logp, old, adv, mask, agg=agg, **params)
    tokens = ref.ppo_clip_tokens(logp, old, adv, **params)
    want = ref.aggregate(_t(tokens), mask, agg)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # metrics against the obvious per-token definitions
    lr = [(a - b) for a, b, m in zip(logp.flatten().tolist(), old.flatten().tolist(), mask.flatten().tolist()) if m]
    ratios = [math.exp(x) for x in lr]
    assert metrics["policy/ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios), rel=1e-5)
    assert metrics["policy/ratio_min"].item() == pytest.approx(min(ratios), rel=1e-5)
    assert metrics["policy/ratio_max"].item() == pytest.approx(max(ratios), rel=1e-5)
    assert metrics["policy/approx_kl"].item() == pytest.approx(sum(math.exp(-x) - 1 + x for x in lr) / len(lr), rel=1e-4)
    assert 0 < metrics["policy/clip_frac"].item() < 1
    if "dual_clip" in params:  # share of valid tokens where -A * c is below the clipped loss (A < 0)
        c, ac = params["dual_clip"], params.get("adv_clip", float("inf"))
        el = params.get("eps_low", 0.2)
        dual = [a < 0 and -max(a, -ac) * c < -max(a, -ac) * max(r, 1 - el)  # max(l1, l2) = -A max(rho, 1 - eps_low)
                for a, r in zip([x for x, m in zip(adv.flatten().tolist(), mask.flatten().tolist()) if m], ratios)]
        assert any(dual)
        assert metrics["policy/dual_clip_frac"].item() == pytest.approx(sum(dual) / len(dual))


def test_ppo_clip_by_hand():
    # tokens (A, rho): (1, 1.5) clipped to 1.2 -> -1.2; (-1, 0.5) clipped to 0.8 -> 0.8;
    # (1, 0.9) inside -> -0.9; (-2, 4) -> max(8, 2.4) = 8, dual-clip c=3 -> min(8, 6) = 6.
    A = torch.tensor([[1.0, -1.0, 1.0, -2.0]])
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.9, 4.0]]))
    old, mask = torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool)
    loss, m = ppo_clip(logp, old, A, mask)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.9 + 8) / 4)
    assert m["policy/clip_frac"].item() == pytest.approx(0.5)  # tokens 1 and 2
    loss, m = ppo_clip(logp, old, A, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.9 + 6) / 4)
    assert m["policy/dual_clip_frac"].item() == pytest.approx(0.25)
    loss, _ = ppo_clip(logp, old, A, mask, eps_high=0.28)  # clip-higher: token 1 -> -1.28
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.9 + 8) / 4)
    loss, _ = ppo_clip(logp, old, A, mask, adv_clip=0.5)  # A -> .5, -.5, .5, -.5
    assert loss.item() == pytest.approx((-0.6 + 0.4 - 0.45 + 2.0) / 4)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ppo_clip_gradient_is_zero_on_clipped_tokens(dual_clip, gen):
    logp, old, adv, mask = _inputs(gen, spread=0.4)
    logp = logp.double().requires_grad_(True)
    loss, _ = ppo_clip(logp, old.double(), adv.double(), mask, dual_clip=dual_clip)
    (grad,) = torch.autograd.grad(loss, logp)
    n = int(mask.sum())
    n_clipped = 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                assert grad[i, t] == 0
                continue
            a, rho = float(adv[i, t]), math.exp(float(logp[i, t].detach()) - float(old[i, t]))
            clipped = (a > 0 and rho > 1.2) or (a < 0 and rho < 0.8)
            if dual_clip is not None and a < 0 and -a * rho > -a * dual_clip:
                clipped = True
            n_clipped += clipped
            want = 0.0 if clipped else -a * rho / n  # d(-A rho)/d logp = -A rho; token_mean divides by n
            assert float(grad[i, t]) == pytest.approx(want, rel=1e-6, abs=1e-12), (i, t)  # the core works in float32
    assert 0 < n_clipped < n


def test_losses_ignore_padding_garbage(gen):
    """Padding may hold -inf/NaN log-probs (masked logits); loss and gradient must not see them."""
    logp, old, adv, mask = _inputs(gen, spread=0.02, seq_adv=True)
    dirty = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    dirty_old = torch.where(mask, old, torch.full_like(old, float("-inf")))
    for name, kw in [("ppo_clip", {}), ("gspo", {}), ("gspo", {"eps_low": 0.2, "eps_high": 0.2})]:
        a = logp.clone().requires_grad_(True)
        b = dirty.clone().requires_grad_(True)
        clean, _ = compute_policy_loss(name, a, old, adv, mask, **kw)
        messy, _ = compute_policy_loss(name, b, dirty_old, adv, mask, **kw)
        clean.backward()
        messy.backward()
        assert torch.isfinite(messy) and messy.item() == pytest.approx(clean.item(), rel=1e-6), name
        assert bool(torch.isfinite(b.grad).all()), f"{name}: NaN gradient leaked from padding"
        torch.testing.assert_close(b.grad, a.grad)
        assert bool((b.grad[~mask] == 0).all())


# ----------------------------------------------------------------------------- GSPO
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.1)])
def test_gspo_matches_reference(eps, agg, gen):
    logp, old, adv, mask = _inputs(gen, spread=0.1, seq_adv=True)
    w = torch.rand(mask.shape, generator=gen) + 0.5
    loss, metrics = compute_policy_loss("gspo", logp, old, adv, mask, agg=agg, eps_low=eps[0], eps_high=eps[1], is_weights=w)
    tokens = ref.gspo_tokens(logp, old, adv, mask, eps_low=eps[0], eps_high=eps[1])
    want = ref.aggregate(_t(tokens) * w.double(), mask, agg)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    # the reported ratios are the sequence ratios s_i
    s = [math.exp(sum(float(logp[i, t] - old[i, t]) for t in range(mask.shape[1]) if mask[i, t]) / int(mask[i].sum()))
         for i in range(mask.shape[0]) if mask[i].any()]
    assert metrics["policy/ratio_max"].item() == pytest.approx(max(s), rel=1e-5)
    assert metrics["policy/ratio_min"].item() == pytest.approx(min(s), rel=1e-5)


def test_gspo_by_hand():
    # log-ratios 0.1, -0.3 -> s = exp(-0.1) = 0.904837; eps_low 3e-4 puts the clip floor at 0.9997.
    logp, old = torch.tensor([[0.1, -0.3]]), torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    s = math.exp(-0.1)
    loss, _ = gspo(logp, old, torch.ones(1, 2), mask)  # A > 0 with s below the range: not clipped, -s
    assert loss.item() == pytest.approx(-s)
    loss, m = gspo(logp, old, -torch.ones(1, 2), mask)  # A < 0: clipped, -A * 0.9997
    assert loss.item() == pytest.approx(0.9997)
    assert m["policy/clip_frac"].item() == 1.0


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.05), (0.5, 0.5)])
def test_gspo_gradient_equals_sequence_level_formula(eps, gen):
    """GSPO-token with a per-sequence advantage has the gradient of the sequence objective
    J = (1/N) sum_i max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean_t (logp - old_logp))."""
    logp, old, adv, mask = _inputs(gen, spread=0.1, seq_adv=True)
    lp = logp.double().requires_grad_(True)
    loss, _ = gspo(lp, old.double(), adv.double(), mask, eps_low=eps[0], eps_high=eps[1])
    (g_core,) = torch.autograd.grad(loss, lp)

    lp2 = logp.double().requires_grad_(True)
    terms = []
    for i in range(mask.shape[0]):  # the sequence-level objective, one sequence at a time
        idx = [t for t in range(mask.shape[1]) if mask[i, t]]
        if not idx:
            continue
        s = torch.exp((lp2[i, idx] - old[i, idx].double()).mean())
        A = float(adv[i, 0])
        terms.append(torch.maximum(-A * s, -A * s.clamp(1 - eps[0], 1 + eps[1])))
    j = torch.stack(terms).mean()
    (g_seq,) = torch.autograd.grad(j, lp2)
    assert loss.item() == pytest.approx(j.item(), rel=1e-6)  # the core works in float32
    torch.testing.assert_close(g_core, g_seq, rtol=1e-5, atol=1e-9)
    assert bool((g_core[~mask] == 0).all())


# ----------------------------------------------------------------------------- bad input
def test_loss_bad_input(gen):
    logp, old, adv, mask = _inputs(gen)
    with pytest.raises(KeyError, match=r"unknown policy loss 'ppo'; valid: \[.*'gspo'.*'ppo_clip'.*\]"):
        compute_policy_loss("ppo", logp, old, adv, mask)
    with pytest.raises(ValueError, match=r"unknown aggregation 'token-mean'; valid: \('token_mean'"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, agg="token-mean")
    with pytest.raises(ValueError, match=r"unknown aggregation 'sum'"):
        aggregate(adv, mask, "sum")
    with pytest.raises(TypeError, match=r"policy loss 'ppo_clip': unknown parameter\(s\) \['clip_ratio'\]; valid: \['agg', 'eps_low'"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, clip_ratio=0.2)
    with pytest.raises(ValueError, match=r"adv has shape \(9, 12\); expected \[B, T\] = \(9, 13\)"):
        compute_policy_loss("ppo_clip", logp, old, adv[:, :-1], mask)
    with pytest.raises(ValueError, match=r"is_weights has shape \(9,\); expected \[B, T\]"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, is_weights=torch.ones(9))
    with pytest.raises(ValueError, match=r"mask must be bool \[B, T\]; got torch.float32"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask.float())
    with pytest.raises(ValueError, match=r"empty batch"):
        compute_policy_loss("ppo_clip", logp[:0], old[:0], adv[:0], mask[:0])
    with pytest.raises(ValueError, match=r"dual_clip=0.5 must be > 1"):
        compute_policy_loss("ppo_clip", logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid: \('k1', 'k2', 'k3'\)"):
        kl_estimate(logp, old, "k4")
    with pytest.raises(ValueError, match=r"ref_logp has shape \(9, 12\); expected \(9, 13\)"):
        kl_estimate(logp, old[:, 1:], "k3")
    with pytest.raises(ValueError, match=r"level='seq'; valid"):
        importance_weights(logp, old, mask, level="seq")
    with pytest.raises(ValueError, match=r"mode='clip'; valid"):
        importance_weights(logp, old, mask, mode="clip")
    with pytest.raises(ValueError, match=r"'ppo_clip' is already registered"):
        register_loss("ppo_clip")(lambda *a, **k: None)
    assert set(LOSSES) >= {"ppo_clip", "gspo"}
