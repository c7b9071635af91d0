"""Step-level credit (flowrl.core.estimators.step: tp_grpo, step_returns, dual_level, igpo, spae) against slow
loop references from the papers' formulas, and the checks every credit estimator shares.

Every reference loops over samples, steps and tokens in plain Python (float64) on random batches with ragged
masks (holes), trajectories of different step counts, singleton / all-equal / mixed groups, invalid samples and
an empty row; plus hand-worked cases. Batches and helpers: tests/credit_reference.py.
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from flowrl.core import ADVANTAGES, TrajectoryBatch, compute_advantages, turning_point_rewards
from tests.credit_reference import (
    NAN, SEEDS, assert_close, discount, grpo_ref, make_batch, present_steps, to_actions, valid_of, zscore,
)

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path


# ----------------------------------------------------------------------------- turning points
def tp_reference(R, eta=1.0, balance=False):
    B, n1 = len(R), len(R[0])
    n = n1 - 1
    sgn = lambda x: (x > 0) - (x < 0)  # noqa: E731
    rewards, turning = [], []
    for row in R:
        d = [row[t + 1] - row[t] for t in range(n)]
        s = [sgn(d[t]) * sgn(row[n] - row[0]) for t in range(n)]
        tr = []
        for t in range(n):
            keeps = sgn(d[t]) * sgn(row[n] - row[t + 1]) > 0
            tr.append(keeps if t == 0 else (s[t - 1] < 0 and s[t] > 0 and keeps))
        turning.append(tr)
        rewards.append([eta * (row[n] - row[t]) if tr[t] else d[t] for t in range(n)])
    if balance:  # the reference's use_balanced_bonus: rank by |R_n - R_0|; one sign absent -> keep all
        pts = [(i, t, rewards[i][t]) for i in range(B) for t in range(n) if turning[i][t]]
        key = lambda p: -abs(R[p[0]][n] - R[p[0]][0])  # noqa: E731  (stable sort: flat order on ties)
        posl = sorted([p for p in pts if p[2] > 0], key=key)
        negl = sorted([p for p in pts if p[2] < 0], key=key)
        k = min(len(posl), len(negl)) if posl and negl else len(pts)
        kept = {(i, t) for i, t, _ in posl[:k] + negl[:k]}
        for i in range(B):
            for t in range(n):
                if turning[i][t] and (i, t) not in kept:
                    turning[i][t] = False
                    rewards[i][t] = R[i][t + 1] - R[i][t]
    return torch.tensor(rewards, dtype=torch.float64), torch.tensor(turning)


def test_turning_points_hand_worked():
    R = torch.tensor([[0.0, 1.0, 2.0, 3.0],     # steady rise: step 0 already on the trend -> turning, 3 - 0
                      [0.0, -1.0, 1.0, 2.0],    # dips, then turns up at step 1 and keeps rising: bonus 2 - (-1)
                      [1.0, 2.0, 0.0, -1.0]])   # rises against a falling trend, turns down at step 1: -1 - 2
    r, tp = turning_point_rewards(R)
    assert tp.tolist() == [[True, False, False], [False, True, False], [False, True, False]]
    assert r.tolist() == [[3.0, 1.0, 1.0], [-1.0, 3.0, 1.0], [1.0, -3.0, -1.0]]
    r2, _ = turning_point_rewards(R, eta=0.5)
    assert r2.tolist() == [[1.5, 1.0, 1.0], [-1.0, 1.5, 1.0], [1.0, -1.5, -1.0]]
    # balance: two +3 bonuses, one -3: keep one of each (tie: the first in flat order), the other falls back to d
    rb, tpb = turning_point_rewards(R, balance=True)
    assert tpb.tolist() == [[True, False, False], [False, False, False], [False, True, False]]
    assert rb.tolist() == [[3.0, 1.0, 1.0], [-1.0, 2.0, 1.0], [1.0, -3.0, -1.0]]
    # balance ranks by the trajectory's |R_n - R_0| (the reference's key), not by the bonus: rows A and C turn up at
    # step 1 with bonuses 3 (key 2) and 2.75 (key 2.5), row D turns down (bonus -6): C is kept, A falls back to d;
    # with one sign only (A and C alone) every bonus is kept
    Rk = torch.tensor([[0.0, -1.0, 1.0, 2.0], [0.0, -0.25, 2.25, 2.5], [1.0, 2.0, -3.0, -4.0]])
    _, tpk = turning_point_rewards(Rk)
    assert tpk.tolist() == [[False, True, False]] * 3
    rk, tpk_b = turning_point_rewards(Rk, balance=True)
    assert tpk_b.tolist() == [[False, False, False], [False, True, False], [False, True, False]]
    assert rk.tolist() == [[-1.0, 2.0, 1.0], [-0.25, 2.75, 0.25], [1.0, -6.0, -1.0]]
    _, tp1 = turning_point_rewards(Rk[:2], balance=True)
    assert tp1.tolist() == [[False, True, False]] * 2
    # a flip whose direction the rest of the trajectory undoes is not a turning point
    r4, tp4 = turning_point_rewards(torch.tensor([[0.0, 1.0, -1.0, 2.0, 1.0]]))
    assert not tp4.any() and r4.tolist() == [[1.0, -2.0, 3.0, -1.0]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("balance", [False, True])
def test_turning_points_random(seed, balance):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(40, 7, generator=g)
    R[::5] = R[::5].round()  # ties and zero differences
    r, tp = turning_point_rewards(R, eta=0.7, balance=balance)
    rr, tpr = tp_reference(R.double().tolist(), eta=0.7, balance=balance)
    assert tp.tolist() == tpr.tolist()
    assert_close(r, rr)
    if balance:
        bonus = r[tp]
        assert int((bonus > 0).sum()) == int((bonus < 0).sum()) > 0


def test_turning_points_errors():
    with pytest.raises(ValueError, match="n \\+ 1"):
        turning_point_rewards(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        turning_point_rewards(torch.tensor([[0.0, NAN, 1.0]]))


def tp_grpo_ref(b, eta=1.0, balance=False, eps=1e-4):
    valid = valid_of(b)
    S = b.step_reward.shape[1]
    rows = [i for i in range(b.batch_size) if valid[i]]
    R = [b.step_reward[i].double().tolist() + [float(b.outcome[i])] for i in rows]
    r, _ = tp_reference(R, eta, balance)
    per = {i: r[j].tolist() for j, i in enumerate(rows)}
    g = b.group.tolist()
    out = {}
    for i in rows:
        for k in range(S):
            cell = [per[j][k] for j in rows if g[j] == g[i]]
            out[(i, k)] = zscore(per[i][k], cell, eps)
    return to_actions(b, out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("balance", [False, True])
def test_tp_grpo(seed, balance):
    b = make_batch(torch.Generator().manual_seed(seed), nan_frac=0.0)
    got = compute_advantages("tp_grpo", b, eta=1.3, balance=balance)
    assert_close(got, tp_grpo_ref(b, 1.3, balance))


def test_tp_grpo_rejects_missing_probe():
    b = make_batch(torch.Generator().manual_seed(0), nan_frac=0.3, invalid=False)
    with pytest.raises(ValueError, match="ODE-completion"):
        compute_advantages("tp_grpo", b)


# ----------------------------------------------------------------------------- step returns
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma,coef", [(1.0, 0.0), (0.8, 1.5)])
def test_step_returns(seed, gamma, coef):
    b = make_batch(torch.Generator().manual_seed(seed))
    out = {}
    for i in range(b.batch_size):
        ks = present_steps(b, i)
        rs = [0.0 if math.isnan(float(b.step_reward[i, k])) else float(b.step_reward[i, k]) for k in ks]
        if ks:
            rs[-1] += coef * float(b.outcome[i])
        for k, G in zip(ks, discount(rs, gamma)):
            out[(i, k)] = G
    assert_close(compute_advantages("step_returns", b, gamma=gamma, outcome_coef=coef), to_actions(b, out))


# ----------------------------------------------------------------------------- dual level
def dual_ref(b, mode, beta, coef, gamma, eps=1e-4):
    valid = valid_of(b)
    g = b.group.tolist()
    a_o = grpo_ref(b, eps)
    step_a = {}
    if mode == "per_step":
        G = {}
        for i in range(b.batch_size):
            ks = present_steps(b, i)
            rs = [0.0 if math.isnan(float(b.step_reward[i, k])) else float(b.step_reward[i, k]) for k in ks]
            for k, v in zip(ks, discount(rs, gamma)):
                G[(i, k)] = v
        for (i, k), v in G.items():
            cell = [G[(j, k)] for j in range(b.batch_size) if g[j] == g[i] and (j, k) in G]
            step_a[(i, k)] = zscore(v, cell, eps)
    else:
        tok = defaultdict(list)  # group -> step reward of every valid action with a reward
        for i in range(b.batch_size):
            if not valid[i]:
                continue
            for t in range(b.num_actions):
                if bool(b.mask[i, t]):
                    v = float(b.step_reward[i, int(b.step[i, t])])
                    if not math.isnan(v):
                        tok[g[i]].append(v)
        for i in range(b.batch_size):
            for k in present_steps(b, i):
                v = float(b.step_reward[i, k])
                if not math.isnan(v):
                    step_a[(i, k)] = zscore(v, tok[g[i]], eps)
    out = torch.zeros(b.batch_size, b.num_actions, dtype=torch.float64)
    for i in range(b.batch_size):
        for t in range(b.num_actions):
            if valid[i] and bool(b.mask[i, t]):
                out[i, t] = coef * a_o[i] + beta * step_a.get((i, int(b.step[i, t])), 0.0)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["per_step", "group_tokens"])
def test_dual_level(seed, mode):
    b = make_batch(torch.Generator().manual_seed(seed))
    got = compute_advantages("dual_level", b, mode=mode)
    want = dual_ref(b, mode, 0.5, 0.5 if mode == "per_step" else 1.0, 0.9)
    assert_close(got, want)
    got2 = compute_advantages("dual_level", b, mode=mode, beta=0.3, outcome_coef=2.0, gamma=0.7)
    assert_close(got2, dual_ref(b, mode, 0.3, 2.0, 0.7))


def test_dual_level_bad_mode():
    b = make_batch(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="per_step"):
        compute_advantages("dual_level", b, mode="tokens")


# ----------------------------------------------------------------------------- IGPO
def igpo_ref(b, gamma, eps=1e-4):
    g = b.group.tolist()
    r = {}
    for i in range(b.batch_size):
        ks = present_steps(b, i)
        for k in ks:
            r[(i, k)] = float(b.outcome[i]) if k == ks[-1] else float(b.step_reward[i, k + 1]) - float(b.step_reward[i, k])
    pooled = defaultdict(list)
    for (i, k), v in r.items():
        pooled[g[i]].append(v)
    z = {(i, k): zscore(v, pooled[g[i]], eps) for (i, k), v in r.items()}
    out = {}
    for i in range(b.batch_size):
        ks = present_steps(b, i)
        for k, G in zip(ks, discount([z[(i, k)] for k in ks], gamma)):
            out[(i, k)] = G
    return to_actions(b, out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_igpo(seed, gamma):
    b = make_batch(torch.Generator().manual_seed(seed), nan_frac=0.0)
    b.step_reward = b.step_reward.sigmoid()  # probabilities
    assert_close(compute_advantages("igpo", b, gamma=gamma), igpo_ref(b, gamma))


def test_igpo_rejects_missing_probe():
    b = make_batch(torch.Generator().manual_seed(0), nan_frac=0.5, invalid=False)
    with pytest.raises(ValueError, match="present step"):
        compute_advantages("igpo", b)


# ----------------------------------------------------------------------------- SPAE
def spae_ref(b, xi, thr, pen, eps=1e-4):
    a = grpo_ref(b, eps)
    out = {}
    for i in range(b.batch_size):
        ks = present_steps(b, i)
        hi = -math.inf
        for k in ks:
            phi = float(b.step_reward[i, k])
            hi = max(hi, phi)
            delta = float(b.step_reward[i, k + 1]) - phi if k < ks[-1] else 0.0
            out[(i, k)] = a[i] + xi * delta - pen * (1.0 if hi > thr else 0.0)
    return to_actions(b, out)


@pytest.mark.parametrize("seed", SEEDS)
def test_spae(seed):
    b = make_batch(torch.Generator().manual_seed(seed), nan_frac=0.0)
    b.step_reward = torch.tanh(b.step_reward * 2)  # potentials in [-1, 1], some above 0.9
    assert_close(compute_advantages("spae", b), spae_ref(b, 0.5, 0.9, 0.2))
    assert_close(compute_advantages("spae", b, xi=2.0, sat_threshold=0.5, sat_penalty=1.0), spae_ref(b, 2.0, 0.5, 1.0))


def test_spae_hand_worked():
    # one trajectory per step: potentials 0.2 -> 0.95 -> 0.5; the third step starts saturated
    b = TrajectoryBatch(group=torch.tensor([0, 0]), mask=torch.ones(2, 3, dtype=torch.bool),
                        step=torch.tensor([[0, 1, 2]] * 2), old_logp=torch.zeros(2, 3), outcome=torch.tensor([1.0, 0.0]),
                        step_reward=torch.tensor([[0.2, 0.95, 0.5], [0.0, 0.0, 0.0]]))
    A = compute_advantages("spae", b, xi=1.0, sat_penalty=0.5, eps=0.0)
    a = 0.5 / math.sqrt(0.5)  # (1 - 0.5) / std([1, 0]), unbiased std = sqrt(1/2)
    want = torch.tensor([[a + 0.75, a - 0.45 - 0.5, a - 0.5], [-a, -a, -a]], dtype=torch.float64)
    assert_close(A, want)


# ----------------------------------------------------------------------------- registry-level checks
NEW = ["tp_grpo", "step_returns", "prime", "dual_level", "tree_mc", "salt", "igpo", "spae", "empg"]


@pytest.mark.parametrize("name", NEW)
def test_registered_and_documented(name):
    fn = ADVANTAGES[name]
    assert fn.__module__.startswith("flowrl.core.estimators.")
    doc = fn.__doc__ or ""
    assert "arXiv" in doc or "(" in doc.splitlines()[0]
    assert "Returns float [B, T]" in doc or "Returns float [B, T]." in doc


@pytest.mark.parametrize("name", NEW)
def test_all_equal_singleton_groups_give_finite_zero_outcome_part(name):
    """On a batch of singletons and all-equal groups nothing is NaN, and padding stays exactly 0."""
    b = make_batch(torch.Generator().manual_seed(5), sizes=(1, 1, 3, 3), outcome_kind="equal", nan_frac=0.0)
    b.step_reward = b.step_reward.sigmoid()
    A = compute_advantages(name, b)
    assert torch.isfinite(A).all()
    assert float(A[~b.mask].abs().max()) == 0.0


@pytest.mark.parametrize("name", ["tree_mc", "salt"])
def test_missing_node_is_a_clear_error(name):
    b = make_batch(torch.Generator().manual_seed(0))
    b.node = None
    with pytest.raises(ValueError, match="node"):
        compute_advantages(name, b)
