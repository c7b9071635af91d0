"""Step rewards and step-level credit (flowrl.core.credit) against slow loop references from the papers' formulas.

Every reference below loops over samples, steps and tokens in plain Python (float64) on random batches
with ragged masks (holes), trajectories of different step counts, singleton / all-equal / mixed groups,
invalid samples and an empty row; plus hand-worked cases and the property tests of issue 3.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import pytest
import torch

from flowrl.core import ADVANTAGES, TrajectoryBatch, compute_advantages
from flowrl.core.credit import implicit_prm_loss, turning_point_rewards

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path

NAN = float("nan")


# ----------------------------------------------------------------------------- random batches
def make_batch(gen, *, sizes=(1, 1, 2, 3, 4, 5, 7), T=12, S=4, invalid=True, empty_row=True, nan_frac=0.2,
               node_range=4, outcome_kind=None):
    group, outcome = [], []
    for k, n in enumerate(sizes):
        gid = 1_000_003 * (k + 3) + 11
        kind = outcome_kind or ("equal", "binary", "normal")[k % 3]
        group += [gid] * n
        if kind == "equal":
            outcome += [float(torch.randn(1, generator=gen))] * n
        elif kind == "binary":
            outcome += (torch.rand(n, generator=gen) < 0.5).float().tolist()
        else:
            outcome += torch.randn(n, generator=gen).tolist()
    B = len(group)
    perm = torch.randperm(B, generator=gen)
    group = torch.tensor(group)[perm]
    outcome = torch.tensor(outcome)[perm]
    pos = torch.arange(T)[None, :]
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (pos < lengths[:, None]) & (torch.rand(B, T, generator=gen) > 0.15)
    mask[:, 0] = True
    if empty_row:
        mask[B // 2] = False
    step = (pos * S // T).expand(B, T).clone()
    old_logp = -torch.rand(B, T, generator=gen) * 2
    ref_logp = old_logp + 0.3 * torch.randn(B, T, generator=gen)
    entropy = torch.rand(B, T, generator=gen) * 2
    step_reward = torch.randn(B, S, generator=gen)
    if nan_frac:
        step_reward = torch.where(torch.rand(B, S, generator=gen) < nan_frac, torch.full_like(step_reward, NAN), step_reward)
    node = torch.randint(0, node_range, (B, S), generator=gen)
    sample_valid = None
    if invalid:
        sample_valid = torch.rand(B, generator=gen) > 0.15
        sample_valid[0] = True
        outcome = torch.where(sample_valid, outcome, torch.full_like(outcome, NAN))
        mask = mask & sample_valid[:, None]
    return TrajectoryBatch(group=group, mask=mask, step=step, old_logp=old_logp, outcome=outcome, ref_logp=ref_logp,
                           step_reward=step_reward, entropy=entropy, node=node, sample_valid=sample_valid)


# ----------------------------------------------------------------------------- reference helpers
def valid_of(b):
    return [True] * b.batch_size if b.sample_valid is None else b.sample_valid.tolist()


def last_step(b, i):
    steps = [int(b.step[i, t]) for t in range(b.num_actions) if bool(b.mask[i, t])]
    return max(steps) if steps and valid_of(b)[i] else -1


def present_steps(b, i):
    return list(range(last_step(b, i) + 1))


def to_actions(b, per_step):
    """per_step: dict (i, k) -> value; every valid action of step k of a valid sample i gets it (0 if absent)."""
    out = torch.zeros(b.batch_size, b.num_actions, dtype=torch.float64)
    valid = valid_of(b)
    for i in range(b.batch_size):
        for t in range(b.num_actions):
            if valid[i] and bool(b.mask[i, t]):
                out[i, t] = per_step.get((i, int(b.step[i, t])), 0.0)
    return out


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def zscore(x, xs, eps):
    if len(xs) < 2 or max(xs) == min(xs):
        return 0.0
    return (x - mean(xs)) / (std(xs) + eps)


def grpo_ref(b, eps=1e-4, baseline="mean", scale="group"):
    valid = valid_of(b)
    g = b.group.tolist()
    r = b.outcome.tolist()
    members = defaultdict(list)
    for i in range(b.batch_size):
        if valid[i]:
            members[g[i]].append(r[i])
    out = []
    for i in range(b.batch_size):
        xs = members[g[i]]
        if not valid[i] or len(xs) < 2 or max(xs) == min(xs):
            out.append(0.0)
            continue
        base = mean(xs) if baseline == "mean" else (sum(xs) - r[i]) / (len(xs) - 1)
        a = r[i] - base
        if scale == "group":
            a /= std(xs) + eps
        out.append(a)
    return out


def discount(rs, gamma):
    out, g = [0.0] * len(rs), 0.0
    for k in range(len(rs) - 1, -1, -1):
        g = rs[k] + gamma * g
        out[k] = g
    return out


def assert_close(got, want, atol=1e-5):
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4)


SEEDS = [0, 1, 2]


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
    if balance:
        pts = [(i, t, rewards[i][t]) for i in range(B) for t in range(n) if turning[i][t]]
        posl = sorted([p for p in pts if p[2] > 0], key=lambda p: -abs(p[2]))  # stable: flat order on ties
        negl = sorted([p for p in pts if p[2] < 0], key=lambda p: -abs(p[2]))
        k = min(len(posl), len(negl))
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
        assert int((bonus > 0).sum()) == int((bonus < 0).sum())


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


# ----------------------------------------------------------------------------- PRIME
def whiten_ref(b, vals, eps):
    """vals: dict (i, t) -> value on the valid actions of valid samples; masked_whiten (unbiased var)."""
    xs = list(vals.values())
    m = mean(xs)
    var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
    out = torch.zeros(b.batch_size, b.num_actions, dtype=torch.float64)
    for (i, t), v in vals.items():
        out[i, t] = (v - m) / math.sqrt(var + eps)
    return out


def prime_ref(b, beta, rm_coef, granularity, gamma, batch_norm, eps=1e-8, outcome_coef=5.0):
    valid = valid_of(b)
    g = b.group.tolist()
    acts = {i: [t for t in range(b.num_actions) if bool(b.mask[i, t])] if valid[i] else [] for i in range(b.batch_size)}
    q = {i: {t: beta * (float(b.old_logp[i, t]) - float(b.ref_logp[i, t])) for t in acts[i]} for i in acts}
    rm = {}
    for i in acts:
        if granularity == "token":
            rm[i] = dict(q[i])
        elif granularity == "whole":
            rm[i] = {acts[i][-1]: sum(q[i].values())} if acts[i] else {}
        else:
            by_step = defaultdict(list)
            for t in acts[i]:
                by_step[int(b.step[i, t])].append(t)
            rm[i] = {ts[-1]: sum(q[i][t] for t in ts) for ts in by_step.values()}
    if batch_norm:
        mx = 0.0
        for i in acts:
            dense = [rm[i].get(t, 0.0) for t in range(b.num_actions)]
            for t in acts[i]:
                mx = max(mx, abs(sum(dense[t:])))
        if mx > 0:
            rm = {i: {t: v / mx for t, v in d.items()} for i, d in rm.items()}
    ver = {i: ({acts[i][-1]: outcome_coef * float(b.outcome[i])} if acts[i] else {}) for i in acts}

    def rloo(src):
        means = {i: mean(list(d.values())) for i, d in src.items() if d}
        out = {}
        for i, d in src.items():
            members = [j for j in means if g[j] == g[i]]
            K = len(members)
            out[i] = {t: (v * K / (K - 1) - sum(means[j] for j in members) / (K - 1)) if K > 1 else 0.0
                      for t, v in d.items()}
        return out

    rm2 = rloo({i: {t: rm_coef * v for t, v in d.items()} for i, d in rm.items()})
    ver2 = rloo(ver)
    vals = {}
    for i in acts:
        dense = [rm2[i].get(t, 0.0) + ver2[i].get(t, 0.0) for t in acts[i]]
        for t, G in zip(acts[i], discount(dense, gamma)):
            vals[(i, t)] = G
    return whiten_ref(b, vals, eps)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("granularity,gamma,batch_norm", [("token", 1.0, False), ("token", 1.0, True),
                                                          ("step", 0.9, False), ("whole", 1.0, True),
                                                          ("token", 0.95, True), ("token", 0.95, False)])
def test_prime(seed, granularity, gamma, batch_norm):
    b = make_batch(torch.Generator().manual_seed(seed))
    got = compute_advantages("prime", b, beta=0.05, rm_coef=5.0, granularity=granularity, gamma=gamma,
                             batch_norm=batch_norm)
    assert_close(got, prime_ref(b, 0.05, 5.0, granularity, gamma, batch_norm), atol=1e-4)
    got = compute_advantages("prime", b, beta=0.05, rm_coef=2.0, outcome_coef=0.5, granularity=granularity, gamma=gamma,
                             batch_norm=batch_norm)
    assert_close(got, prime_ref(b, 0.05, 2.0, granularity, gamma, batch_norm, outcome_coef=0.5), atol=1e-4)


@pytest.mark.parametrize("layout", ["right", "left"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_prime_token_on_masks_without_holes(layout, seed, batch_norm):
    """The closed-form path for one run of valid actions per row (statistics from row sums), right- and left-padded,
    with invalid samples, an empty row and T = 40, against the loop reference."""
    gen = torch.Generator().manual_seed(seed)
    b = make_batch(gen, T=40, S=5)
    lengths = torch.randint(1, 41, (b.batch_size,), generator=gen)
    lengths[b.batch_size // 2] = 0
    pos = torch.arange(40)[None, :]
    runs = pos < lengths[:, None] if layout == "right" else pos >= 40 - lengths[:, None]
    if b.sample_valid is not None:
        runs = runs & b.sample_valid[:, None]
    b = dataclasses.replace(b, mask=runs)
    for rm_coef, outcome_coef in ((5.0, 5.0), (2.0, 0.5)):
        got = compute_advantages("prime", b, beta=0.05, rm_coef=rm_coef, outcome_coef=outcome_coef,
                                 batch_norm=batch_norm)
        assert_close(got, prime_ref(b, 0.05, rm_coef, "token", 1.0, batch_norm, outcome_coef=outcome_coef), atol=1e-4)


def test_prime_token_runs_two_pass_fallback(monkeypatch):
    """The guard against a one-pass variance lost to cancellation: forced on, the two-pass whitening of the
    materialised returns gives the reference's numbers too."""
    import flowrl.core.credit as credit

    monkeypatch.setattr(credit, "_ONE_PASS_MIN_KEEP", 2.0)  # always "lost": always the fallback
    b = make_batch(torch.Generator().manual_seed(2))
    b = dataclasses.replace(b, mask=torch.ones_like(b.mask) & b.valid[:, None])
    got = compute_advantages("prime", b, rm_coef=5.0, outcome_coef=5.0)
    assert_close(got, prime_ref(b, 0.05, 5.0, "token", 1.0, False, outcome_coef=5.0), atol=1e-4)


@pytest.mark.parametrize("granularity,gamma", [("token", 1.0), ("whole", 1.0), ("token", 0.9)])
def test_prime_weighs_process_and_outcome_as_prime_does(granularity, gamma):
    """PRIME multiplies both sources by 5 (reward_dpo_coef = reward_gt_coef = 5): after whitening its defaults equal
    rm_coef = outcome_coef = 1, and differ from weighing the outcome by 1 against the process by 5 (the old port)."""
    b = make_batch(torch.Generator().manual_seed(5))
    one = compute_advantages("prime", b, rm_coef=1.0, outcome_coef=1.0, granularity=granularity, gamma=gamma)
    assert_close(compute_advantages("prime", b, granularity=granularity, gamma=gamma), one.double(), atol=1e-4)
    old = compute_advantages("prime", b, outcome_coef=1.0, granularity=granularity, gamma=gamma)
    assert float((old - one).abs().max()) > 1e-2


def test_prime_hand_worked():
    """One group of K = 2, two actions each; the PRM favours sample 0 (log pi_phi - log pi_ref = [2, 0] vs [0, 0]),
    the outcome sample 1 (outcomes [0, 1]). beta 0.05, rm_coef = outcome_coef = 5, token granularity, gamma 1.
    Process: r = 5 * 0.05 * d = [0.5, 0] and [0, 0]; sample means 0.25, 0; RLOO r * K/(K-1) - (0.25 + 0)/(K-1)
    = [0.75, -0.25] and [-0.25, -0.25]; returns (reverse cumsum) [0.5, -0.25] and [-0.5, -0.25].
    Outcome: 5 * [0, 1] at the last action, RLOO -5 and +5, returns [-5, -5] and [5, 5].
    Sum [-4.5, -5.25], [4.5, 4.75]; whitened with the mean and the unbiased variance of these four values."""
    ref = torch.tensor([[-1.0, -0.5], [-0.7, -0.2]])
    hand = TrajectoryBatch(group=torch.tensor([0, 0]), mask=torch.ones(2, 2, dtype=torch.bool),
                           step=torch.zeros(2, 2, dtype=torch.long), old_logp=ref.clone(), ref_logp=ref,
                           outcome=torch.tensor([0.0, 1.0]))
    prm = ref + torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    ret = torch.tensor([[-4.5, -5.25], [4.5, 4.75]])
    m = ret.mean()
    want = ((ret - m) / torch.sqrt(((ret - m) ** 2).sum() / 3 + 1e-8)).double()
    got = compute_advantages("prime", hand, prm_logp=prm, beta=0.05, rm_coef=5.0, outcome_coef=5.0)
    assert_close(got, want, atol=1e-5)
    assert_close(compute_advantages("prime", hand, prm_logp=prm, granularity="token", gamma=0.999999), want, atol=1e-4)


def test_prime_uses_given_prm_logp():
    b = make_batch(torch.Generator().manual_seed(3))
    prm = b.old_logp + 0.5
    got = compute_advantages("prime", b, prm_logp=prm)
    b2 = dataclasses.replace(b, old_logp=prm)
    assert_close(got, prime_ref(b2, 0.05, 5.0, "token", 1.0, False), atol=1e-4)


def test_implicit_prm_loss():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    prm = (-torch.rand(B, T, generator=g)).requires_grad_()
    ref = -torch.rand(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    loss, m = implicit_prm_loss(prm, ref, mask, labels, beta=0.5)
    terms = []
    for i in range(B):
        if not mask[i].any():
            continue
        z = 0.5 * sum(float(prm.detach()[i, t]) - float(ref[i, t]) for t in range(T) if mask[i, t])
        p = 1 / (1 + math.exp(-z))
        terms.append(-(labels[i] * math.log(p) + (1 - labels[i]) * math.log(1 - p)))
    assert abs(float(loss.detach()) - float(mean(terms))) < 1e-5
    loss.backward()
    assert prm.grad is not None and float(prm.grad[2].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="labels"):
        implicit_prm_loss(prm, ref, mask, torch.full((B,), 2.0))


# ----------------------------------------------------------------------------- dual level
def dual_ref(b, mode, beta, coef, gamma, eps=1e-4):
    valid = valid_of(b)
    g = b.group.tolist()
    a_o = grpo_ref(b, eps)
    S = b.step_reward.shape[1]
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


# ----------------------------------------------------------------------------- tree / graph
def tree_ref(b, cumulative=False):
    valid = valid_of(b)
    g = b.group.tolist()
    r = b.outcome.tolist()
    through = defaultdict(list)
    for i in range(b.batch_size):
        for k in present_steps(b, i):
            through[(g[i], int(b.node[i, k]))].append(r[i])
    root = defaultdict(list)
    for i in range(b.batch_size):
        if valid[i] and present_steps(b, i):
            root[g[i]].append(r[i])
    out = {}
    for i in range(b.batch_size):
        prev = mean(root[g[i]]) if root[g[i]] else 0.0
        for k in present_steps(b, i):
            v = mean(through[(g[i], int(b.node[i, k]))])
            out[(i, k)] = v - (mean(root[g[i]]) if cumulative else prev)
            prev = v
    return to_actions(b, out)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cumulative", [False, True])
def test_tree_mc(seed, cumulative):
    b = make_batch(torch.Generator().manual_seed(seed), node_range=3)
    assert_close(compute_advantages("tree_mc", b, cumulative=cumulative), tree_ref(b, cumulative))


def _own_branches(b):
    B, S = b.node.shape
    return dataclasses.replace(b, node=torch.arange(B * S).view(B, S))


@pytest.mark.parametrize("seed", SEEDS)
def test_tree_mc_own_branches_is_group_mean_baseline(seed):
    b = _own_branches(make_batch(torch.Generator().manual_seed(seed), empty_row=False))
    base = compute_advantages("dr_grpo", b)  # r_i - mean_g r
    assert_close(compute_advantages("tree_mc", b, cumulative=True), base.double())
    delta = compute_advantages("tree_mc", b)
    first = b.mask & (b.step == 0)
    assert_close(torch.where(first, delta, 0.0), torch.where(first, base, 0.0).double())
    assert float(torch.where(first, 0.0, delta).abs().max()) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_tree_mc_telescopes(seed):
    """Summed over a trajectory's steps, the step credits give r_i - mean_g r on any tree."""
    b = make_batch(torch.Generator().manual_seed(seed), node_range=3, empty_row=False)
    for i in range(b.batch_size):  # the last step of each trajectory reaches its own leaf
        if last_step(b, i) >= 0:
            b.node[i, last_step(b, i)] = 1000 + i
    A = compute_advantages("tree_mc", b)
    S = b.node.shape[1]
    inf = torch.full((b.batch_size, S), float("inf"))
    hi = (-inf).scatter_reduce(1, b.step, torch.where(b.mask, A, -float("inf")), "amax")
    lo = inf.scatter_reduce(1, b.step, torch.where(b.mask, A, float("inf")), "amin")
    has = torch.isfinite(hi)
    assert torch.equal(hi[has], lo[has])  # one value per step
    total = torch.where(has, hi, 0.0).sum(1)
    full = has.sum(1) == torch.tensor([last_step(b, i) + 1 for i in range(b.batch_size)])  # every step has actions
    full &= b.valid & b.mask.any(1)
    base = compute_advantages("dr_grpo", b)[:, 0]  # every non-empty row has an action at t = 0
    assert int(full.sum()) > 5
    assert_close(total[full], base[full].double())


def salt_ref(b, baseline="mean", scale="group"):
    g = b.group.tolist()
    a = grpo_ref(b, 1e-4, baseline, scale)
    through = defaultdict(list)
    for i in range(b.batch_size):
        for k in present_steps(b, i):
            through[(g[i], int(b.node[i, k]))].append(a[i])
    return to_actions(b, {(i, k): mean(through[(g[i], int(b.node[i, k]))])
                          for i in range(b.batch_size) for k in present_steps(b, i)})


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("baseline,scale", [("mean", "group"), ("loo", "none")])
def test_salt(seed, baseline, scale):
    b = make_batch(torch.Generator().manual_seed(seed), node_range=3)
    assert_close(compute_advantages("salt", b, baseline=baseline, scale=scale), salt_ref(b, baseline, scale))


@pytest.mark.parametrize("seed", SEEDS)
def test_salt_without_shared_steps_is_plain_advantage(seed):
    b = _own_branches(make_batch(torch.Generator().manual_seed(seed)))
    assert_close(compute_advantages("salt", b), compute_advantages("grpo", b).double())
    assert_close(compute_advantages("salt", b, baseline="loo", scale="none"), compute_advantages("rloo", b).double())


@pytest.mark.parametrize("name", ["tree_mc", "salt"])
def test_node_ids_spanning_int64_give_the_same_advantages(name):
    """Node ids are labels: any one-to-one relabelling gives the same advantages. Multiplying by an odd constant
    (mod 2^64) spreads them over all of int64, which sends _dense_ids down its two-unique path."""
    b = make_batch(torch.Generator().manual_seed(4))
    wide = dataclasses.replace(b, node=b.node * 4611686018427387903 + 12345)
    assert int(wide.node.max()) - int(wide.node.min()) > 2 ** 62
    assert_close(compute_advantages(name, wide), compute_advantages(name, b).double(), atol=1e-6)


def test_salt_hand_worked():
    # one group of 3; all share step 0 (node 7), two share step 1 (node 8), the third branches (node 9)
    b = TrajectoryBatch(
        group=torch.tensor([5, 5, 5]), mask=torch.ones(3, 2, dtype=torch.bool), step=torch.tensor([[0, 1]] * 3),
        old_logp=torch.zeros(3, 2), outcome=torch.tensor([1.0, 0.0, 0.0]), node=torch.tensor([[7, 8], [7, 8], [7, 9]]))
    a = compute_advantages("salt", b, scale="none")  # a = r - mean = [2/3, -1/3, -1/3]
    want = torch.tensor([[0.0, 1 / 6], [0.0, 1 / 6], [0.0, -1 / 3]], dtype=torch.float64)
    assert_close(a, want)
    t = compute_advantages("tree_mc", b)  # V(7) = 1/3 = root; V(8) = 1/2, V(9) = 0
    assert_close(t, torch.tensor([[0.0, 1 / 6], [0.0, 1 / 6], [0.0, -1 / 3]], dtype=torch.float64))


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


# ----------------------------------------------------------------------------- EMPG
def empg_ref(b, k, kf, zeta, whiten, eps=1e-4):
    valid = valid_of(b)
    a = grpo_ref(b, eps)
    H = {}
    for i in range(b.batch_size):
        if not valid[i]:
            continue
        by = defaultdict(list)
        for t in range(b.num_actions):
            if bool(b.mask[i, t]):
                by[int(b.step[i, t])].append(float(b.entropy[i, t]))
        for s, es in by.items():
            H[(i, s)] = mean(es)
    lo, hi = min(H.values()), max(H.values())
    Hn = {key: (h - lo) / (hi - lo + 1e-8) for key, h in H.items()}
    e = {key: math.exp(-k * v) for key, v in Hn.items()}
    me = mean(list(e.values()))
    out = {}
    for (i, s), v in e.items():
        nxt = math.exp(-kf * Hn[(i, s + 1)]) if (i, s + 1) in Hn else 0.0
        out[(i, s)] = v / me * a[i] + zeta * nxt
    A = to_actions(b, out)
    if not whiten:
        return A
    vals = {(i, t): float(A[i, t]) for i in range(b.batch_size) for t in range(b.num_actions)
            if valid[i] and bool(b.mask[i, t])}
    return whiten_ref(b, vals, 1e-8)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("whiten", [False, True])
def test_empg(seed, whiten):
    b = make_batch(torch.Generator().manual_seed(seed))
    got = compute_advantages("empg", b, k=1.5, k_f=0.7, zeta=0.2, whiten=whiten)
    assert_close(got, empg_ref(b, 1.5, 0.7, 0.2, whiten), atol=1e-4)


# ----------------------------------------------------------------------------- registry-level checks
NEW = ["tp_grpo", "step_returns", "prime", "dual_level", "tree_mc", "salt", "igpo", "spae", "empg"]


@pytest.mark.parametrize("name", NEW)
def test_registered_and_documented(name):
    fn = ADVANTAGES[name]
    assert fn.__module__ == "flowrl.core.credit"
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
