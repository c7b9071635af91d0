"""OREAL, PACS and ETR losses (flowrl.core.losses) against loop references from the papers' formulas."""
from __future__ import annotations

import math

import pytest
import torch

from flowrl.core import LOSSES, compute_policy_loss
from flowrl.core import oreal_token_rm_loss, oreal_token_weights
from reference import loss_inputs

SEEDS = [0, 1, 2]
AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]


def inputs(gen, B=10, T=9, spread=0.4):
    logp, old, adv, mask = loss_inputs(gen, B=B, T=T, spread=spread, seq_adv=True)
    adv[1] = 0.0
    return logp, old, adv, mask


def agg_ref(vals, mask, mode, T):
    """vals: dict (i, t) -> per-action loss on the selected actions; mask: the selection (list of lists)."""
    B = len(mask)
    rows = [i for i in range(B) if any(mask[i])]
    if mode == "token_mean":
        n = sum(sum(m) for m in mask)
        return sum(vals.values()) / max(n, 1e-12) if n else 0.0
    per = []
    for i in rows:
        s = sum(vals[(i, t)] for t in range(T) if mask[i][t])
        if mode == "seq_mean_token_mean":
            s /= sum(mask[i])
        per.append(s)
    if not per:
        return 0.0
    den = len(per) * (T if mode == "seq_mean_token_sum_norm" else 1)
    return sum(per) / den


# ----------------------------------------------------------------------------- OREAL
def oreal_ref(logp, old, adv, mask, agg, wp, wn, pos_coef, neg_coef, mult):
    B, T = mask.shape
    pos_vals, neg_vals = {}, {}
    pm = [[bool(mask[i, t]) and float(adv[i, t]) > 0 for t in range(T)] for i in range(B)]
    nm = [[bool(mask[i, t]) and float(adv[i, t]) < 0 for t in range(T)] for i in range(B)]
    for i in range(B):
        for t in range(T):
            a = float(adv[i, t])
            if pm[i][t]:
                pos_vals[(i, t)] = -float(logp[i, t]) * float(wp[i, t]) * (a if mult else 1.0)
            if nm[i][t]:
                neg_vals[(i, t)] = -math.exp(float(logp[i, t]) - float(old[i, t])) * a * float(wn[i, t])
    return pos_coef * agg_ref(pos_vals, pm, agg, T) + neg_coef * agg_ref(neg_vals, nm, agg, T)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", AGGS)
def test_oreal(seed, agg):
    g = torch.Generator().manual_seed(seed)
    logp, old, adv, mask = inputs(g)
    wp, wn = oreal_token_weights(torch.randn(mask.shape, generator=g), mask)
    loss, m = compute_policy_loss("oreal", logp, old, adv, mask, agg=agg, pos_weight=wp, neg_weight=wn)
    want = oreal_ref(logp, old, adv, mask, agg, wp, wn, 1.0, 0.5, False)
    assert abs(float(loss) - want) < 1e-5
    loss2, _ = compute_policy_loss("oreal", logp, old, adv, mask, agg=agg, pos_coef=2.0, neg_coef=0.3,
                                   pos_mult_adv=True)
    ones = torch.ones_like(adv)
    assert abs(float(loss2) - oreal_ref(logp, old, adv, mask, agg, ones, ones, 2.0, 0.3, True)) < 1e-5
    assert set(m) >= {"oreal/pos_loss", "oreal/neg_loss", "oreal/pos_frac"}


def test_oreal_gradients_push_the_right_way():
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, _ = compute_policy_loss("oreal", logp, old, adv, mask)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises positives, lowers negatives
    # token mean per part: each positive token gets -1/2, each negative 0.5 * 1 * 1 / 2
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]]))


def test_oreal_token_weights_hand_worked():
    w = torch.tensor([[2.0, -2.0, -4.0]])
    mask = torch.tensor([[True, True, True]])
    wp, wn = oreal_token_weights(w, mask)
    c = [1 / (1 + math.exp(-x)) for x in (2.0, 0.0, -4.0 / 3)]
    torch.testing.assert_close(wp, torch.tensor([[max(min((ci - 0.5) / 0.5, 1), 0) for ci in c]]))
    torch.testing.assert_close(wn, torch.tensor([[max(min((0.5 - ci) / 0.5, 1), 0) for ci in c]]))
    logits = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    m2 = torch.tensor([[True, True, False], [False, False, False]])
    loss, _ = oreal_token_rm_loss(logits, m2, torch.tensor([1.0, 0.0]))
    assert abs(float(loss.detach()) - math.log(1 + math.exp(-2.0))) < 1e-6


# ----------------------------------------------------------------------------- PACS
def pacs_ref(logp, old, mask, group, labels, agg, beta, baseline, balance):
    B, T = mask.shape
    has = [bool(mask[i].any()) for i in range(B)]
    psi = [beta * sum(float(logp[i, t]) - float(old[i, t]) for t in range(T) if mask[i, t]) for i in range(B)]
    score = []
    for i in range(B):
        mem = [j for j in range(B) if int(group[j]) == int(group[i]) and has[j]]
        n = len(mem)
        if baseline == "loo" and n > 1:
            base = (sum(psi[j] for j in mem) - psi[i]) / (n - 1)
        elif baseline == "mean" and n > 1:
            base = sum(psi[j] for j in mem) / n
        else:
            base = 0.0
        score.append(psi[i] - base)
    vals = {}
    for i in range(B):
        y = float(labels[i])
        p = 1 / (1 + math.exp(-score[i]))
        l = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        if balance:
            mem = [j for j in range(B) if int(group[j]) == int(group[i]) and has[j]]
            n_same = sum(1 for j in mem if float(labels[j]) == y)
            classes = len({float(labels[j]) for j in mem})
            l *= len(mem) / max(classes * n_same, 1)
        for t in range(T):
            if mask[i, t]:
                vals[(i, t)] = l
    return agg_ref(vals, mask.tolist(), agg, T)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("baseline,balance", [("loo", False), ("mean", True), ("none", False)])
def test_pacs(seed, agg, baseline, balance):
    g = torch.Generator().manual_seed(seed)
    logp, old, adv, mask = inputs(g)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # singleton, mixed sizes, the empty row in group 1
    labels = (torch.rand(10, generator=g) > 0.5).float()
    loss, m = compute_policy_loss("pacs", logp, old, adv, mask, agg=agg, group=group, labels=labels, beta=1.5,
                                  baseline=baseline, class_balance=balance)
    want = pacs_ref(logp, old, mask, group, labels, agg, 1.5, baseline, balance)
    assert abs(float(loss) - want) < 1e-5
    assert "pacs/bce" in m


def test_pacs_needs_group_and_labels_and_has_gradient():
    g = torch.Generator().manual_seed(0)
    logp, old, adv, mask = inputs(g)
    with pytest.raises(ValueError, match="group"):
        compute_policy_loss("pacs", logp, old, adv, mask, labels=torch.ones(10))
    with pytest.raises(ValueError, match="0 or 1"):
        compute_policy_loss("pacs", logp, old, adv, mask, group=torch.zeros(10, dtype=torch.long),
                            labels=torch.full((10,), 0.5))
    lp = logp.clone().requires_grad_()
    loss, _ = compute_policy_loss("pacs", lp, old, adv, mask, group=torch.zeros(10, dtype=torch.long),
                                  labels=(torch.arange(10) % 2).float())
    loss.backward()
    assert torch.isfinite(lp.grad).all() and float(lp.grad[~mask].abs().max()) == 0.0
    assert float(lp.grad[mask].abs().max()) > 0


# ----------------------------------------------------------------------------- ETR
def etr_ref(logp, old, adv, mask, agg, eps_low, eps_high, lam, kappa, gv, eps_max):
    B, T = mask.shape
    vals = {}
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            a = float(adv[i, t])
            s = (1 + lam * abs(a)) * (1 + kappa * (float(gv[i]) if gv is not None else 0.0))
            lo, hi = eps_low * s, eps_high * s
            if eps_max is not None:
                lo, hi = min(lo, eps_max), min(hi, eps_max)
            lo = min(lo, 1.0)
            rho = math.exp(float(logp[i, t]) - float(old[i, t]))
            vals[(i, t)] = max(-a * rho, -a * min(max(rho, 1 - lo), 1 + hi))
    return agg_ref(vals, mask.tolist(), agg, T)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("agg", AGGS)
def test_etr(seed, agg):
    g = torch.Generator().manual_seed(seed)
    logp, old, adv, mask = inputs(g)
    gv = torch.rand(10, generator=g) * 0.25
    loss, m = compute_policy_loss("etr", logp, old, adv, mask, agg=agg, eps_low=0.1, eps_high=0.15, lam=0.7,
                                  kappa=2.0, group_var=gv, eps_max=0.3)
    assert abs(float(loss) - etr_ref(logp, old, adv, mask, agg, 0.1, 0.15, 0.7, 2.0, gv, 0.3)) < 1e-5
    assert {"policy/clip_frac", "etr/eps_low_mean", "etr/eps_high_mean"} <= set(m)


@pytest.mark.parametrize("seed", SEEDS)
def test_etr_reduces_to_ppo_clip(seed):
    g = torch.Generator().manual_seed(seed)
    logp, old, adv, mask = inputs(g)
    a, _ = compute_policy_loss("etr", logp, old, adv, mask, eps_low=0.2, eps_high=0.28, lam=0.0)
    b, _ = compute_policy_loss("ppo_clip", logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert abs(float(a) - float(b)) < 1e-6


def test_etr_widens_with_advantage():
    logp = torch.log(torch.tensor([[1.5, 1.5]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    # ratio 1.5: clipped at 1.2 with A = 1 and lam = 0, at 1 + 0.2 * (1 + 1 * 2) = 1.6 (not clipped) with |A| = 2
    small, _ = compute_policy_loss("etr", logp, old, torch.ones(1, 2), mask, lam=0.0)
    big, _ = compute_policy_loss("etr", logp, old, torch.full((1, 2), 2.0), mask, lam=1.0)
    assert abs(float(small) + 1.2) < 1e-6 and abs(float(big) + 3.0) < 1e-6
    with pytest.raises(ValueError, match="group_var"):
        compute_policy_loss("etr", logp, old, torch.ones(1, 2), mask, group_var=torch.tensor([-1.0]))


def test_registered():
    for name in ("oreal", "pacs", "etr"):
        assert LOSSES[name].__module__ == "flowrl.core.losses"
