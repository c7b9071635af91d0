"""The core's native CPU kernels (flowrl/core/kernels/native_kernels.c) against loop references written from their
formulas (on their AVX2 and their portable code), and the torch path (what CUDA runs) against them on every
registered estimator. The build's failure modes: tests/test_core_native_build.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flowrl.core import ADVANTAGES, compute_advantages, native
from flowrl.core.groups import whiten_zeroed_
from tests.reference import make_batch


def cpu_has_avx2_fma() -> bool:
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@pytest.fixture(autouse=True, params=["simd", "portable"])
def _native_on(request):
    """Every test on the kernels' AVX2 code (where the CPU has it; the dispatch itself is checked) and on the
    portable C code. A failed build is a failure here, never a skip."""
    with native.enabled(True):
        if request.param == "simd":
            assert native.simd() == cpu_has_avx2_fma()
        else:
            assert native.simd(False) is False
        try:
            yield
        finally:
            native.simd(True)


def random_mask(gen, B, T, kind):
    """bool [B, T]: "holes" (ragged prefixes with 20% holes), "runs" (right padding), "left" (left padding);
    row 0 always empty."""
    n = torch.randint(0, T + 1, (B,), generator=gen)
    pos = torch.arange(T)[None, :]
    if kind == "left":
        m = pos >= (T - n)[:, None]
    else:
        m = pos < n[:, None]
    if kind == "holes":
        m &= torch.rand(B, T, generator=gen) > 0.2
    m[0] = False
    return m


def scan_loop(mask, a=None, b=None, coef=None, bias=None, end=None, value=None, gamma=1.0, c=1.0, scale=1.0):
    """The kernel's formula, one row and one action at a time (float64)."""
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        delta = {}
        for j, t in enumerate(valid):
            r = float(bias[i]) if bias is not None else 0.0
            if a is not None:
                ci = float(coef[i]) if coef is not None else 1.0
                r += ci * (float(a[i, t]) - (float(b[i, t]) if b is not None else 0.0))
            if end is not None and j == len(valid) - 1:
                r += float(end[i])
            if value is not None:
                v_next = float(value[i, valid[j + 1]]) if j + 1 < len(valid) else 0.0
                r += gamma * v_next - float(value[i, t])
            delta[t] = r
        y = 0.0
        for t in reversed(valid):
            y = delta[t] + c * y
            out[i, t] = scale * y
    return out


@pytest.mark.parametrize("kind", ["holes", "runs", "left"])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 3), (16, 3), (9, 13), (37, 64)])
def test_scan_matches_the_recurrence(gen, kind, B, T):
    mask = random_mask(gen, B, T, kind) if B > 1 else torch.zeros(B, T, dtype=torch.bool)
    a, b, V = (torch.randn(B, T, generator=gen) for _ in range(3))
    coef, bias, end = (torch.randn(B, generator=gen) for _ in range(3))
    a[~mask] = float("nan")  # masked actions are never read into a result
    cases = [
        dict(a=a, b=b, coef=coef, bias=bias, end=end, value=V, gamma=0.99, c=0.9, scale=-1.5),
        dict(value=V, end=end, gamma=1.0, c=0.95),  # GAE
        dict(a=a, b=b, coef=coef, end=end, c=1.0),  # REINFORCE++ with in-reward KL
        dict(end=end, c=0.99),  # returns of an outcome
        dict(a=a, c=0.0),  # c = 0: each action its own reward
        dict(a=a, bias=bias, c=1.0, scale=2.0),
    ]
    for kw in cases:
        got, rs, rq = native.scan(mask, stats=True, **kw)
        want = scan_loop(mask, **kw)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rs, want.sum(1), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(rq, (want ** 2).sum(1), rtol=1e-5, atol=1e-4)
        assert not torch.isnan(got).any()


def test_scan_hand_worked():
    # one row, actions 0, 2, 3 valid (1 is a hole): x = 1, 2, 4; c = 0.5 -> y3 = 4, y2 = 2 + 2 = 4, y0 = 1 + 2 = 3
    mask = torch.tensor([[True, False, True, True]])
    x = torch.tensor([[1.0, 100.0, 2.0, 4.0]])
    y = native.scan(mask, a=x, c=0.5)[0]
    assert y.tolist() == [[3.0, 0.0, 4.0, 4.0]]
    # GAE, gamma = 1, lambda = 1, outcome 1 at the end, V = 0.5 on each: delta = 0, 0, 0.5 -> A = 0.5 each
    V = torch.full((1, 4), 0.5)
    y = native.scan(mask, value=V, end=torch.tensor([1.0]), gamma=1.0, c=1.0)[0]
    assert y.tolist() == [[0.5, 0.0, 0.5, 0.5]]


def test_scan_writes_in_place_and_splits_rows_over_threads(gen):
    B, T = 1031, 40  # not a multiple of the kernel's 4-row blocks; enough rows for two threads
    mask = random_mask(gen, B, T, "holes")
    x = torch.randn(B, T, generator=gen)
    want = native.scan(mask, a=x, c=0.9)[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = native.scan(mask, a=x, c=0.9)[0]
        own = x.clone()
        out = native.scan(mask, a=own, c=0.9, out=own)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two, want)
    assert out.data_ptr() == own.data_ptr() and torch.equal(out, want)


def test_row_sums_affine_and_masking(gen):
    B, T = 23, 29
    mask = random_mask(gen, B, T, "holes")
    x, y = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    d = torch.where(mask, x - y, 0.0).double()
    s, q = native.row_sums(mask, x, y, squares=True)
    torch.testing.assert_close(s, d.sum(1))
    torch.testing.assert_close(q, (d * d).sum(1))
    s1, none = native.row_sums(mask, x)
    assert none is None
    torch.testing.assert_close(s1, torch.where(mask, x, 0.0).double().sum(1))

    z = x.clone()
    native.affine_masked_(z, mask, 0.25, 3.0)
    torch.testing.assert_close(z, torch.where(mask, (x - 0.25) * 3.0, 0.0))

    w = x.clone()
    w[~mask] = float("nan")  # off the mask: zeroed, not counted
    assert native.zero_off_mask_count_nonfinite_(w, mask) == 0
    assert torch.equal(w, torch.where(mask, x, 0.0))
    on = mask.nonzero()[:3]
    w[on[:, 0], on[:, 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    assert native.zero_off_mask_count_nonfinite_(w, mask) == 3
    with pytest.raises(ValueError, match="contiguous float32"):
        native.affine_masked_(x.t(), mask.t(), 0.0, 1.0)


def test_broadcast_rows(gen):
    B, T = 21, 19
    mask = random_mask(gen, B, T, "holes")
    v = torch.randn(B, generator=gen)
    want = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                want[i, t] = v[i]
    assert torch.equal(native.broadcast_rows(v, mask), want)
    assert torch.equal(native.broadcast_rows(v.double(), mask), want)  # any float dtype in, float32 out


@pytest.mark.parametrize("T,S", [(31, 5), (203, 4)])  # short runs (no 8-block inside one), long runs
def test_gather_and_sum_steps(gen, T, S):
    B = 17
    mask = random_mask(gen, B, T, "holes")
    step = (torch.arange(T) * S // T).expand(B, T).clone()
    step[:, -3:] = torch.tensor([-2, S, S + 7])  # out-of-range ids (padding may hold any) are clamped
    step[1, 40:60] = 0 if T > 60 else step[1, 40:60]  # a row whose steps go back: any order is summed right
    step[2, : T // 2] = -5 if T > 60 else step[2, : T // 2]  # a long run of an out-of-range id
    per = torch.randn(B, S, generator=gen)
    vals = torch.randn(B, T, generator=gen)
    got = native.gather_steps(per, step, mask)
    cnt, tot = native.step_sums(step, mask, vals, S)
    want = torch.zeros(B, T)
    wc, wt = torch.zeros(B, S), torch.zeros(B, S)
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                k = min(max(int(step[i, t]), 0), S - 1)
                want[i, t] = per[i, k]
                wc[i, k] += 1
                wt[i, k] += vals[i, t]
    assert torch.equal(got, want)
    assert torch.equal(cnt, wc)
    torch.testing.assert_close(tot, wt)


def test_whitening_survives_a_large_mean(gen, monkeypatch):
    # mean 1e4, std 1e-2: the float64 sum of squares keeps only ~6 digits of the variance, so the kernel path
    # takes the variance again around the mean (two passes: two affine calls); unit variance to 1e-3
    B, T = 64, 50
    mask = random_mask(gen, B, T, "runs")
    x = torch.where(mask, 1e4 + 1e-2 * torch.randn(B, T, generator=gen), 0.0)
    ref = x[mask].double()
    want = ((ref - ref.mean()) / ref.std()).float()
    calls = []
    affine = native.affine_masked_
    monkeypatch.setattr(native, "affine_masked_", lambda *a: calls.append(a[2:]) or affine(*a))
    got = whiten_zeroed_(x.clone(), mask)
    assert len(calls) == 2 and calls[0][1] == 1.0  # centred first, then scaled
    assert (got[mask] - want).abs().max().item() < 1e-3
    assert (got[~mask] == 0).all()
    calls.clear()
    y = torch.where(mask, torch.randn(B, T, generator=gen), 0.0)  # an ordinary batch: one pass
    whiten_zeroed_(y, mask)
    assert len(calls) == 1


NEEDS_FINITE_STEPS = {"igpo", "spae", "tp_grpo"}
ESTIMATOR_PARAMS = {
    "reinforce_pp": [{}, {"kl_coef": 0.05}, {"gamma": 0.9, "kl_coef": 0.1}],
    "gae": [{}, {"gamma": 0.99, "lam": 0.9, "kl_coef": 0.05}, {"whiten": False}],
    "prime": [{}, {"batch_norm": True}, {"gamma": 0.9}, {"granularity": "step"}],
    "empg": [{}, {"whiten": False}],
}


@pytest.mark.parametrize("layout", ["holes", "runs", "left"])
@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_estimator_equal_on_both_paths(gen, name, layout):
    batch = make_batch(gen, sizes=(1, 2, 3, 4, 5, 7, 8, 16, 16), T=37, S=5, invalid_frac=0.1, layout=layout)
    if name in NEEDS_FINITE_STEPS:  # probes (TP-GRPO, IGPO, SPAE) must be finite on every present step
        batch = dataclasses.replace(batch, step_reward=torch.nan_to_num(batch.step_reward, nan=0.25)).validate()
    for params in ESTIMATOR_PARAMS.get(name, [{}]):
        fast = compute_advantages(name, batch, **params)
        with native.enabled(False):
            slow = compute_advantages(name, batch, **params)
        torch.testing.assert_close(fast, slow, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name} {params}: {m}")


def test_a_forked_child_gets_its_own_threads(gen):
    """A pool made before a fork (e.g. before DataLoader workers start) has no threads in the child: the child
    must make its own instead of waiting forever on the parent's."""
    import multiprocessing as mp

    mask = random_mask(gen, 1024, 16, "holes")
    x = torch.randn(1024, 16, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = native.scan(mask, a=x, c=0.5)[0]  # creates the pool in this process
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_scan_in_child, args=(mask, x, q))
        p.start()
        got = q.get(timeout=60)
        p.join(timeout=60)
    finally:
        torch.set_num_threads(threads)
    assert p.exitcode == 0 and torch.equal(torch.tensor(got), want)


def _scan_in_child(mask, x, q):
    torch.set_num_threads(2)
    q.put(native.scan(mask, a=x, c=0.5)[0].tolist())  # plain data: the child exits after
