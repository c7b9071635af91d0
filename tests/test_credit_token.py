"""Token-level credit (flowrl.core.estimators.token: prime, implicit_prm_loss, empg) against slow loop references
from the papers' formulas.

Every reference loops over samples, steps and tokens in plain Python (float64) on random batches with ragged
masks (holes), trajectories of different step counts, singleton / all-equal / mixed groups, invalid samples and
an empty row; plus hand-worked cases. Batches and helpers: tests/credit_reference.py.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import pytest
import torch

from flowrl.core import TrajectoryBatch, compute_advantages, implicit_prm_loss
from tests.credit_reference import SEEDS, assert_close, discount, grpo_ref, make_batch, mean, to_actions, valid_of

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path


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
    import flowrl.core.kernels.prime as prime_kernels

    monkeypatch.setattr(prime_kernels, "_ONE_PASS_MIN_KEEP", 2.0)  # always "lost": always the fallback
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


def prime_code_ref(d, acc, mask, n, rm_coef=5.0, gt_coef=5.0, beta=0.05):
    """PRIME's released code for granularity "token", prime_norm "batch_norm", transcribed loop for loop: right-padded
    rows, groups of ``n`` consecutive rows. Token score beta * d on the valid tokens (beta cancels in the norm), divided
    by (max |reverse cumsum| + 1e-6) over the batch (reference: PRIME-RL/PRIME training/verl/workers/actor/
    dp_prime.py, ``prime_norm``); RLOO per source over its reward positions, each source times its coefficient
    (reward_dpo_coef / reward_gt_coef), summed, reverse cumsum, masked_whiten (unbiased var, + 1e-8) (reference:
    volcengine/verl recipe/prime/prime_core_algos.py, ``compute_rloo_advantage_return``)."""
    d, mask = d.double(), mask.bool()
    scores = torch.where(mask, beta * d, torch.zeros_like(d))
    rc = scores.flip(dims=[1]).cumsum(dim=-1).flip(dims=[1])
    scores = scores / (rc.abs().max() + 1e-6)

    def masked_rloo(r0, m):
        r = r0.clone()
        r[~m] = 0
        for start in range(0, r.shape[0], n):
            means = torch.cat([r[pos:pos + 1][m[pos:pos + 1]].mean(dim=0, keepdim=True) for pos in range(start, start + n)])
            base = means.sum() / (n - 1)
            blk, mb = r[start:start + n], m[start:start + n]
            blk[mb] = blk[mb] * (n / (n - 1)) - base
        return r

    lengths = mask.sum(-1)
    gt, gt_mask = torch.zeros_like(d), torch.zeros_like(mask)
    rows = torch.arange(d.shape[0])
    gt_mask[rows, lengths - 1] = True
    gt[rows, lengths - 1] = acc.double()
    final = masked_rloo(scores, mask) * rm_coef + masked_rloo(gt, gt_mask) * gt_coef
    returns = (final * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    vals = returns[mask]
    white = (returns - vals.mean()) * torch.rsqrt(vals.var(unbiased=True) + 1e-8)
    return torch.where(mask, white, torch.zeros_like(white))


def test_prime_batch_norm_hand_worked_and_as_primes_code():
    """prime_norm = batch_norm (PRIME's default, configs/arith/prime.yaml): the hand-worked batch of
    ``test_prime_hand_worked`` (d = [2, 0], [0, 0]; outcomes [0, 1]; K = 2). q = beta d = [0.1, 0]; max |reverse
    cumsum| = 0.1, so the process rewards become [1, 0], [0, 0] (beta cancels); times rm_coef 5, RLOO: [7.5, -2.5],
    [-2.5, -2.5]; returns [5, -2.5], [-5, -2.5] (without the norm: [0.5, -0.25], [-0.5, -0.25], a tenth of the
    outcome's +-5). Plus the outcome's [-5, -5], [5, 5]: [0, -7.5], [0, 2.5]; mean -1.25, unbiased var 18.75.
    Then random right-padded batches against the transcription of PRIME's code (``prime_code_ref``)."""
    ref = torch.tensor([[-1.0, -0.5], [-0.7, -0.2]])
    hand = TrajectoryBatch(group=torch.tensor([0, 0]), mask=torch.ones(2, 2, dtype=torch.bool),
                           step=torch.zeros(2, 2, dtype=torch.long), old_logp=ref.clone(), ref_logp=ref,
                           outcome=torch.tensor([0.0, 1.0]))
    d = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    ret = torch.tensor([[0.0, -7.5], [0.0, 2.5]], dtype=torch.float64)
    want = (ret + 1.25) / math.sqrt(18.75 + 1e-8)
    got = compute_advantages("prime", hand, prm_logp=ref + d, beta=0.05, rm_coef=5.0, outcome_coef=5.0, batch_norm=True)
    assert_close(got, want, atol=1e-5)
    assert_close(prime_code_ref(d, hand.outcome, hand.mask, 2), want, atol=1e-5)
    g = torch.Generator().manual_seed(7)
    for n, B, T in ((2, 6, 5), (4, 12, 9)):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        lp_ref = -torch.rand(B, T, generator=g) * 3
        d = torch.randn(B, T, generator=g)
        acc = (torch.rand(B, generator=g) > 0.5).float()
        b = TrajectoryBatch(group=torch.arange(B) // n, mask=mask, step=torch.zeros(B, T, dtype=torch.long),
                            old_logp=lp_ref.clone(), ref_logp=lp_ref, outcome=acc)
        got = compute_advantages("prime", b, prm_logp=lp_ref + d, rm_coef=5.0, outcome_coef=5.0, batch_norm=True)
        assert_close(got, prime_code_ref(d, acc, mask, n), atol=1e-4)


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
