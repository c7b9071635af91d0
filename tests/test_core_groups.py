"""Group statistics (scatter ops) against dict-of-groups loops, plus hand-worked cases."""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

import reference as ref
from flowrl.core import group_advantages, group_stats, group_step_stats, masked_whiten, segment_stats
from flowrl.core.groups import batch_std, group_index

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path


def _rewards(gen, sizes=(1, 2, 3, 1, 5, 8, 16, 4, 2)):
    """Shuffled groups of mixed sizes: singletons, all-equal groups, binary and continuous rewards."""
    b = ref.make_batch(gen, sizes=sizes, invalid_frac=0.15)
    return b.outcome, b.group, b.sample_valid


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_reference(baseline, scale, seed):
    r, g, v = _rewards(torch.Generator().manual_seed(seed))
    got = group_advantages(r, g, baseline=baseline, scale=scale, valid=v)
    want = ref.group_advantages(r.tolist(), g.tolist(), v.tolist(), baseline=baseline, scale=scale)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_group_advantages_by_hand():
    # group 10: 1, 2, 3 (mean 2, std 1); group 20: singleton; group 30: equal; group 40: 0, 4 (std 2*sqrt 2)
    r = torch.tensor([1.0, 2.0, 3.0, 7.0, 5.0, 5.0, 0.0, 4.0])
    g = torch.tensor([10, 10, 10, 20, 30, 30, 40, 40])
    a = group_advantages(r, g, eps=0.0)
    s = 2 * math.sqrt(2)
    assert a.tolist() == pytest.approx([-1, 0, 1, 0, 0, 0, -2 / s, 2 / s])
    a = group_advantages(r, g, baseline="loo", scale="none")
    assert a.tolist() == pytest.approx([-1.5, 0, 1.5, 0, 0, 0, -4, 4])
    # a sample marked invalid leaves its group: group 10 becomes 1, 3 (mean 2, std sqrt 2)
    v = torch.tensor([True, False, True, True, True, True, True, True])
    a = group_advantages(r, g, valid=v, eps=0.0)
    assert a[:3].tolist() == pytest.approx([-1 / math.sqrt(2), 0, 1 / math.sqrt(2)])


def test_singleton_and_equal_groups_are_zero_never_nan():
    r = torch.tensor([3.0, 1.0, 1.0, 1.0])
    g = torch.tensor([0, 1, 1, 1])
    for baseline in ("mean", "loo"):
        for scale in ("group", "batch", "none"):
            a = group_advantages(r, g, baseline=baseline, scale=scale, eps=0.0)
            assert a.tolist() == [0.0] * 4, (baseline, scale)


def test_group_stats_match_reference(gen):
    r, g, v = _rewards(gen)
    st = group_stats(r, g, valid=v)
    members = defaultdict(list)
    for x, k, ok in zip(r.tolist(), g.tolist(), v.tolist()):
        if ok:
            members[k].append(x)
    for i, (x, k, ok) in enumerate(zip(r.tolist(), g.tolist(), v.tolist())):
        xs = members[k]
        assert st.count[i].item() == len(xs)
        if not xs:
            continue
        assert st.mean[i].item() == pytest.approx(sum(xs) / len(xs), abs=1e-6)
        assert st.std[i].item() == pytest.approx(ref._std(xs), abs=1e-5)
        assert bool(st.constant[i]) == (max(xs) == min(xs))
        if ok:
            loo = (sum(xs) - x) / (len(xs) - 1) if len(xs) > 1 else 0.0
            assert st.loo_mean[i].item() == pytest.approx(loo, abs=1e-6)
    torch.testing.assert_close(st.std[v], torch.tensor([torch.tensor(members[k]).std(unbiased=True).item() if len(members[k]) > 1 else 0.0 for k in g[v].tolist()]))


def test_segment_stats_by_hand_and_accuracy():
    s = segment_stats(torch.tensor([4.0, 1.0, 2.0, 9.0]), torch.tensor([0, 1, 1, 0]), 3,
                      torch.tensor([True, True, True, False]))
    assert s.count.tolist() == [1, 2, 0]
    assert s.mean.tolist() == [4.0, 1.5, 0.0]
    assert s.std[:2].tolist() == pytest.approx([0.0, math.sqrt(0.5)])
    assert s.min[:2].tolist() == [4.0, 1.0] and s.max[:2].tolist() == [4.0, 2.0]
    # a large common offset: the two-pass variance keeps the std exact
    s = segment_stats(torch.tensor([1e4 + 1, 1e4 + 2, 1e4 + 3]), torch.zeros(3, dtype=torch.long), 1)
    assert s.std.item() == pytest.approx(1.0, rel=1e-3)


def test_group_index_dense_ids():
    inv, G = group_index(torch.tensor([10**12, 5, 10**12, -3]))
    assert G == 3 and inv.tolist() == [2, 1, 2, 0]


def test_group_step_stats_match_reference(gen):
    b = ref.make_batch(gen, invalid_frac=0.15)
    valid = b.sample_valid[:, None] & ~torch.isnan(b.step_reward)
    count, mean, std, constant = group_step_stats(b.step_reward, b.group, valid=valid)
    cells = defaultdict(list)
    sr, grp = b.step_reward.tolist(), b.group.tolist()
    for i in range(b.batch_size):
        for s in range(b.num_steps):
            if valid[i, s]:
                cells[(grp[i], s)].append(sr[i][s])
    for i in range(b.batch_size):
        for s in range(b.num_steps):
            xs = cells.get((grp[i], s), [])
            assert count[i, s].item() == len(xs)
            if xs:
                assert mean[i, s].item() == pytest.approx(sum(xs) / len(xs), abs=1e-6)
                assert std[i, s].item() == pytest.approx(ref._std(xs), abs=1e-5)
                assert bool(constant[i, s]) == (max(xs) == min(xs))


def test_masked_whiten_and_batch_std(gen):
    x = torch.randn(6, 5, generator=gen) * 3 + 2
    m = torch.rand(6, 5, generator=gen) > 0.3
    vals = [v for v, k in zip(x.flatten().tolist(), m.flatten().tolist()) if k]
    mu, inv = ref.whiten_list(vals, 1e-8)
    want = torch.where(m, (x.double() - mu) * inv, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(masked_whiten(x, m).double(), want, rtol=1e-5, atol=1e-6)
    assert batch_std(x.flatten(), m.flatten()).item() == pytest.approx(ref._std(vals), rel=1e-5)
    # by hand: 1, 2, 3 -> mean 2, unbiased var 1 -> -1, 0, 1
    w = masked_whiten(torch.tensor([1.0, 2.0, 3.0, 99.0]), torch.tensor([True, True, True, False]), eps=0.0)
    assert w.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])


def test_group_bad_input():
    r, g = torch.tensor([1.0, 2.0]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"baseline='median'; valid values are \('mean', 'loo'\)"):
        group_advantages(r, g, baseline="median")
    with pytest.raises(ValueError, match=r"scale='std'; valid values are \('group', 'batch', 'none'\)"):
        group_advantages(r, g, scale="std")
    with pytest.raises(ValueError, match=r"group has shape \(3,\); expected long \[B\] = \(2,\)"):
        group_advantages(r, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"rewards has shape \(2, 1\); expected float \[B\]"):
        group_advantages(r[:, None], g)
    with pytest.raises(ValueError, match=r"group has dtype torch.float32; expected an integer tensor"):
        group_advantages(r, g.float())
    with pytest.raises(ValueError, match=r"valid has shape \(3,\); expected bool \[B\] = \(2,\)"):
        group_advantages(r, g, valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rewards contain NaN or inf on valid samples"):
        group_advantages(torch.tensor([1.0, float("nan")]), g)
    with pytest.raises(ValueError, match=r"rewards is empty"):
        group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values has shape \(2,\); expected float \[B, S\]"):
        group_step_stats(r, g)
    with pytest.raises(RuntimeError, match=r"distributed=True but torch.distributed is not initialised"):
        group_stats(r, g, distributed=True)
    # NaN on an invalid sample is fine: it takes no part
    a = group_advantages(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([0, 0, 0]),
                         valid=torch.tensor([True, False, True]), scale="none")
    assert a.tolist() == [-1.0, 0.0, 1.0]
