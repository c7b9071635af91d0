"""Process shapers, gates, filters and schedules (flowrl.core.shaping, flowrl.core.schedules) against loop references."""
from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
import torch

from flowrl.core import schedules, shaping
from flowrl.core.schedules import SCHEDULES, cosine_schedule, exponential_schedule, linear_schedule, schedule, warmup_gate
from flowrl.core.shaping import (
    clip_delta, gated_accumulation, oreal_pairs, partial_credit, posterior_gate, prof_filter, rank_in_segment, renorm,
    rubric_gate, trust_weight, weighted_tests,
)

NAN = float("nan")
SEEDS = [0, 1, 2]


def groups_of(gen, sizes=(1, 2, 3, 4, 6)):
    g = torch.cat([torch.full((n,), 100 + 7 * k) for k, n in enumerate(sizes)])
    return g[torch.randperm(g.shape[0], generator=gen)]


def steps_with_nan(gen, B, S=5, frac=0.3):
    r = torch.randn(B, S, generator=gen)
    return torch.where(torch.rand(B, S, generator=gen) < frac, torch.full_like(r, NAN), r)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a.double(), torch.as_tensor(b, dtype=torch.float64), atol=atol, rtol=1e-5, equal_nan=True)


# ----------------------------------------------------------------------------- clip / delta
def clip_delta_ref(r, mode, eta):
    out = []
    for row in r.tolist():
        row = [x if math.isnan(x) else (min(x - eta, 0.0) if mode != "delta" else x) for x in row]
        if mode == "clip":
            out.append(row)
            continue
        idx = [k for k, x in enumerate(row) if not math.isnan(x)]
        new = [NAN] * len(row)
        for j, k in enumerate(idx):
            new[k] = row[k] - row[idx[j + 1]] if j + 1 < len(idx) else row[k]
        out.append(new)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["clip", "delta", "clip_delta"])
def test_clip_delta(seed, mode):
    g = torch.Generator().manual_seed(seed)
    r = steps_with_nan(g, 12)
    r[3] = NAN  # a row with no step reward
    close(clip_delta(r, mode=mode, eta=0.3), clip_delta_ref(r, mode, 0.3))


def test_clip_delta_hand_worked_and_bounds():
    r = torch.tensor([[0.9, 0.8, NAN, 0.7]])
    close(clip_delta(r, mode="delta"), [[0.1, 0.8 - 0.7, NAN, 0.7]])
    close(clip_delta(r, mode="clip", eta=0.85), [[0.0, -0.05, NAN, -0.15]])
    g = torch.Generator().manual_seed(0)
    x = steps_with_nan(g, 50)
    first = torch.tensor([[v for v in row if not math.isnan(v)][:1] or [0.0] for row in x.tolist()]).squeeze(1)
    close(torch.nansum(clip_delta(x, mode="delta"), 1), first, atol=1e-5)  # telescopes to r_1
    assert float(torch.nan_to_num(clip_delta(x, mode="clip", eta=0.0), nan=-1.0).max()) <= 0.0
    with pytest.raises(ValueError, match="mode"):
        clip_delta(x, mode="both")
    with pytest.raises(ValueError, match="inf"):
        clip_delta(torch.tensor([[float("inf")]]))


# ----------------------------------------------------------------------------- ReNorm, gates
def test_renorm():
    p = torch.tensor([[0.2, 0.9, NAN], [0.5, 0.0, 1.0]])
    o = torch.tensor([0.0, 1.0])
    close(renorm(p, o), [[-0.8, -0.1, NAN], [0.5, 0.0, 1.0]])
    close(renorm(torch.tensor([0.3, 0.3]), o), [-0.7, 0.3])
    assert float(renorm(torch.rand(100, 4), torch.zeros(100)).max()) <= 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_posterior_gate(seed):
    g = torch.Generator().manual_seed(seed)
    o, p = torch.randn(20, generator=g), torch.randn(20, generator=g)
    c = torch.rand(20, generator=g) > 0.5
    close(posterior_gate(o, p, c, coef=0.7), [o[i] + (0.7 * p[i] if c[i] else 0.0) for i in range(20)])
    close(posterior_gate(o, p, torch.ones(20, dtype=torch.bool)), o + p)  # all correct: the ungated sum


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_rubric_gate(seed, normalize):
    g = torch.Generator().manual_seed(seed)
    grp = groups_of(g)
    B = grp.shape[0]
    o = (torch.rand(B, generator=g) > 0.4).float() * torch.rand(B, generator=g).round(decimals=1)
    rr = torch.rand(B, generator=g)
    rr[0] = 0.0
    mx = defaultdict(float)
    for i in range(B):
        mx[int(grp[i])] = max(mx[int(grp[i])], float(rr[i]))
    want = []
    for i in range(B):
        s = float(rr[i])
        if normalize:
            s = s / mx[int(grp[i])] if mx[int(grp[i])] > 0 else 0.0
        want.append(0.0 if float(o[i]) == 0 else 0.7 * float(o[i]) + 0.3 * s)
    close(rubric_gate(o, rr, grp, alpha=0.3, normalize=normalize), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_gated_accumulation(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(15, generator=g)
    r = steps_with_nan(g, 15)
    want = [float(h[i]) + (sum(x for x in r[i].tolist() if not math.isnan(x)) if float(h[i]) >= 0.2 else 0.0)
            for i in range(15)]
    close(gated_accumulation(h, r, tau=0.2), want, atol=1e-5)
    # every trajectory above the threshold: the ungated sum
    close(gated_accumulation(h.abs() + 1, r, tau=0.5), h.abs() + 1 + torch.nansum(r, 1), atol=1e-5)


# ----------------------------------------------------------------------------- Trust-GRPO
def trust_ref(correct, think, group, step, alpha, T, low, high):
    members = defaultdict(list)
    for i in range(len(group)):
        members[group[i]].append(i)
    out = []
    for i in range(len(group)):
        m = members[group[i]]
        acc = sum(correct[j] for j in m) / len(m)
        if acc <= low or acc >= high:
            out.append(0.0)
            continue
        mc = sum(think[j] for j in m if correct[j]) / sum(1 for j in m if correct[j])
        mw = sum(think[j] for j in m if not correct[j]) / sum(1 for j in m if not correct[j])
        gam = 1.0 if mc >= mw else math.exp(mc - mw)
        out.append(gam * alpha * math.exp(-step / T))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_trust_weight(seed):
    g = torch.Generator().manual_seed(seed)
    grp = groups_of(g, (1, 3, 4, 5, 8, 8))
    B = grp.shape[0]
    c = torch.rand(B, generator=g) > 0.5
    th = torch.rand(B, generator=g)
    got = trust_weight(c, th, grp, step=250, alpha=0.3, anneal_steps=500)
    close(got, trust_ref(c.tolist(), th.tolist(), grp.tolist(), 250, 0.3, 500, 0.1, 0.9))
    with pytest.raises(ValueError, match="low"):
        trust_weight(c, th, grp, low=0.9, high=0.1)


def test_trust_weight_hand_worked():
    grp = torch.tensor([1, 1, 1, 1, 2, 2])
    c = torch.tensor([True, True, False, False, True, True])  # group 2 all correct: off
    th = torch.tensor([0.2, 0.4, 0.8, 0.6, 0.9, 0.9])  # mu_c = 0.3 < mu_w = 0.7 -> gamma = e^{-0.4}
    close(trust_weight(c, th, grp, step=0), [0.3 * math.exp(-0.4)] * 4 + [0.0, 0.0])
    close(trust_weight(c, th, grp, step=500), [0.3 * math.exp(-0.4) * math.exp(-1)] * 4 + [0.0, 0.0])


# ----------------------------------------------------------------------------- E-GRPO, VeRPO
@pytest.mark.parametrize("seed", SEEDS)
def test_partial_credit(seed):
    g = torch.Generator().manual_seed(seed)
    grp = groups_of(g)
    B = grp.shape[0]
    c = torch.rand(B, generator=g) > 0.6
    m = torch.rand(B, generator=g)
    m[:2] = 0.0
    fmt = torch.rand(B, generator=g) > 0.1
    mx = defaultdict(float)
    for i in range(B):
        mx[int(grp[i])] = max(mx[int(grp[i])], float(m[i]))
    want = []
    for i in range(B):
        if not fmt[i]:
            want.append(-0.5)
        elif c[i]:
            want.append(1.0)
        else:
            want.append(0.2 * (float(m[i]) / mx[int(grp[i])] if mx[int(grp[i])] > 0 else 0.0))
    close(partial_credit(c, m, grp, alpha=0.2, format_ok=fmt, format_penalty=0.5), want)
    with pytest.raises(ValueError, match="match_rate"):
        partial_credit(c, m + 2, grp)


@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_tests(seed):
    g = torch.Generator().manual_seed(seed)
    grp = groups_of(g)
    B, U = grp.shape[0], 5
    passes = torch.rand(B, U, generator=g) > 0.4
    tm = torch.rand(B, U, generator=g) > 0.2
    # the tests of one prompt are the same for its rollouts
    for gid in grp.unique():
        rows = (grp == gid).nonzero().flatten()
        tm[rows] = tm[rows[0]].clone()
    want = []
    for i in range(B):
        rows = [j for j in range(B) if grp[j] == grp[i]]
        tests = [u for u in range(U) if tm[i, u]]
        rho = {u: sum(bool(passes[j, u]) for j in rows) / len(rows) for u in tests}
        hard = {u: 1 - rho[u] for u in tests}
        tot = sum(hard.values())
        w = {u: (hard[u] / tot if tot > 0 else 1 / len(tests)) for u in tests}
        dense = sum(w[u] * float(passes[i, u]) for u in tests)
        allp = bool(tests) and all(bool(passes[i, u]) for u in tests)
        want.append(1.0 * allp + 0.5 * dense)
    close(weighted_tests(passes, grp, test_mask=tm), want, atol=1e-5)
    # every rollout passes every test: all-pass + dense = 1.5 for all
    close(weighted_tests(torch.ones(B, U, dtype=torch.bool), grp), torch.full((B,), 1.5))


# ----------------------------------------------------------------------------- filters
def test_rank_in_segment():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(30, generator=g).round(decimals=0)  # ties
    seg = torch.randint(0, 5, (30,), generator=g)
    rank = rank_in_segment(score, seg)
    for i in range(30):
        ahead = [j for j in range(30) if seg[j] == seg[i] and (score[j] > score[i] or (score[j] == score[i] and j < i))]
        assert int(rank[i]) == len(ahead)


def prof_ref(correct, r, group, keep, lam, h_lambda):
    B = len(group)
    score = []
    for i in range(B):
        xs = [x for x in r[i] if not math.isnan(x)]
        m = sum(xs) / len(xs)
        if h_lambda is not None and (len(xs) == 1 or len(xs) >= h_lambda):
            m -= lam
        score.append(m if correct[i] else -m)
    kept = [False] * B
    for gid in set(group):
        rows = [i for i in range(B) if group[i] == gid]
        cor = sorted([i for i in rows if correct[i]], key=lambda i: (-score[i], i))
        wro = sorted([i for i in rows if not correct[i]], key=lambda i: (-score[i], i))
        K = min(len(rows), keep)
        kc = min(len(cor), max(math.ceil(K / 2), K - len(wro)))
        for i in cor[:kc] + wro[:K - kc]:
            kept[i] = True
    return kept


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep,lam,h_lambda", [(4, 0.0, None), (3, 0.5, 4), (1, 0.0, None)])
def test_prof_filter(seed, keep, lam, h_lambda):
    g = torch.Generator().manual_seed(seed)
    grp = groups_of(g, (1, 2, 4, 6, 8, 8))
    B = grp.shape[0]
    c = torch.rand(B, generator=g) > 0.5
    r = steps_with_nan(g, B, S=6)
    r[:, 0] = torch.randn(B, generator=g)  # every rollout has a step reward
    got = prof_filter(c, r, grp, keep=keep, lam=lam, h_lambda=h_lambda)
    assert got.tolist() == prof_ref(c.tolist(), r.tolist(), grp.tolist(), keep, lam, h_lambda)


def test_prof_filter_hand_worked():
    grp = torch.tensor([0, 0, 0, 0, 0, 0])
    c = torch.tensor([True, True, True, True, False, False])
    r = torch.tensor([[0.9], [0.1], [0.5], [0.7], [0.2], [0.8]])
    # keep 4: two correct with the highest PRM (0.9, 0.7), two incorrect with the lowest (0.2, 0.8)
    assert prof_filter(c, r, grp, keep=4).tolist() == [True, False, False, True, True, True]
    # keep 2: one of each side
    assert prof_filter(c, r, grp, keep=2).tolist() == [True, False, False, False, True, False]
    keep_c = prof_filter(c, r, grp, keep=2, mode="correct", generator=torch.Generator().manual_seed(0))
    assert keep_c[:4].tolist() == [True, False, False, False] and int(keep_c[4:].sum()) == 1
    with pytest.raises(ValueError, match="no step reward"):
        prof_filter(c, torch.full((6, 1), NAN), grp, keep=2)


@pytest.mark.parametrize("seed", SEEDS)
def test_oreal_pairs(seed):
    g = torch.Generator().manual_seed(seed)
    grp = groups_of(g, (1, 2, 3, 5, 8, 8, 4))
    B = grp.shape[0]
    c = torch.rand(B, generator=g) > 0.5
    keep = oreal_pairs(c, grp, generator=torch.Generator().manual_seed(seed))
    for gid in grp.unique().tolist():
        rows = (grp == gid).nonzero().flatten().tolist()
        n_c = sum(bool(c[i]) for i in rows)
        kept = [i for i in rows if keep[i]]
        if n_c in (0, len(rows)):
            assert kept == []
        else:
            assert len(kept) == 2 and {bool(c[i]) for i in kept} == {True, False}


# ----------------------------------------------------------------------------- schedules
def test_schedules():
    assert linear_schedule(0, start=0.5, end=0.0, steps=100) == 0.5
    assert abs(linear_schedule(50, start=0.5, end=0.0, steps=100) - 0.25) < 1e-12
    assert linear_schedule(500, start=0.5, end=0.0, steps=100) == 0.0
    assert linear_schedule(10, start=1.0, end=0.0, steps=10, delay=10) == 1.0
    assert abs(cosine_schedule(50, start=1.0, end=0.0, steps=100) - 0.5) < 1e-12
    assert cosine_schedule(0, start=1.0, end=0.2, steps=100) == 1.0
    assert abs(cosine_schedule(100, start=1.0, end=0.2, steps=100) - 0.2) < 1e-12
    assert abs(exponential_schedule(500, start=0.3, tau=500) - 0.3 * math.exp(-1)) < 1e-12
    assert exponential_schedule(0, start=0.3, tau=500) == 0.3
    assert warmup_gate(9, warmup=10) == 0.0 and warmup_gate(10, warmup=10) == 1.0
    assert abs(warmup_gate(15, warmup=10, ramp=10) - 0.5) < 1e-12
    assert schedule("exponential", 500, start=0.3, tau=500) == exponential_schedule(500, start=0.3, tau=500)
    assert set(SCHEDULES) == {"linear", "cosine", "exponential", "warmup"}
    with pytest.raises(KeyError, match=r"unknown schedule 'step'; valid: \['cosine', 'exponential', 'linear', 'warmup'\]"):
        schedule("step", 0)
    with pytest.raises(TypeError, match="linear"):
        schedule("linear", 0, start=1.0)
    with pytest.raises(ValueError, match="tau"):
        exponential_schedule(0, start=1.0, tau=0)


def test_exported_from_core():
    import flowrl.core as core

    for name in ("clip_delta", "renorm", "posterior_gate", "rubric_gate", "gated_accumulation", "trust_weight",
                 "partial_credit", "weighted_tests", "prof_filter", "oreal_pairs", "schedule", "SCHEDULES",
                 "weighted_sum", "zero_variance_filter", "accuracy_band_filter", "soft_overlong_penalty"):
        assert getattr(core, name) is getattr(shaping, name, None) or getattr(core, name) is getattr(schedules, name)
