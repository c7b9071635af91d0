"""Property tests (hypothesis): zero-sum mean baselines, batch-order invariance, reward-scale invariance."""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from flowrl.core import compute_advantages, group_advantages
from flowrl.core.losses import AGG_MODES, aggregate, compute_policy_loss
import pytest

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
GRID = [-1.0, 0.0, 0.5, 1.0, 2.0, 3.25]  # few values: ties and all-equal groups are common

sizes_st = st.lists(st.integers(1, 8), min_size=1, max_size=7)


@st.composite
def grouped_rewards(draw):
    """Rewards on a grid (or continuous) with group ids, in a drawn order; B >= 1."""
    sizes = draw(sizes_st)
    group = [g * 97 + 5 for g, n in enumerate(sizes) for _ in range(n)]
    if draw(st.booleans()):
        rewards = [draw(st.sampled_from(GRID)) for _ in group]
    else:
        rewards = [draw(st.floats(-10, 10, allow_nan=False, width=32)) for _ in group]
    perm = draw(st.permutations(range(len(group))))
    return torch.tensor([rewards[i] for i in perm]), torch.tensor([group[i] for i in perm])


@SETTINGS
@given(grouped_rewards(), st.sampled_from(["group", "batch", "none"]))
def test_mean_baseline_advantages_sum_to_zero_in_each_group(data, scale):
    r, g = data
    a = group_advantages(r, g, baseline="mean", scale=scale)
    assert bool(torch.isfinite(a).all())
    sums, mags = defaultdict(float), defaultdict(float)
    for x, k in zip(a.tolist(), g.tolist()):
        sums[k] += x
        mags[k] += abs(x)
    for k in sums:
        assert abs(sums[k]) <= 1e-5 * max(1.0, mags[k]), (k, sums[k])


@SETTINGS
@given(grouped_rewards(), st.sampled_from([0.01, 0.3, 2.0, 7.5, 1000.0]), st.sampled_from(["group", "batch"]),
       st.sampled_from(["mean", "loo"]))
def test_scaling_rewards_by_c_leaves_normalised_advantages_unchanged(data, c, scale, baseline):
    r, g = data
    a = group_advantages(r, g, baseline=baseline, scale=scale, eps=0.0)
    b = group_advantages(r * c, g, baseline=baseline, scale=scale, eps=0.0)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(sizes_st, st.integers(0, 2**31 - 1), st.sampled_from([0.5, 3.0, 100.0]))
def test_grpo_is_invariant_to_reward_scale(sizes, seed, c):
    b = ref.make_batch(torch.Generator().manual_seed(seed), sizes=tuple(sizes), T=5, empty_row=False)
    scaled = dataclasses.replace(b, outcome=b.outcome * c)
    for scale in ("group", "batch"):
        torch.testing.assert_close(compute_advantages("grpo", scaled, scale=scale, eps=0.0),
                                   compute_advantages("grpo", b, scale=scale, eps=0.0), rtol=1e-4, atol=1e-4)


ORDER_CASES = [
    ("grpo", {}), ("grpo", {"scale": "batch"}), ("dr_grpo", {}), ("rloo", {}), ("reinforce_pp", {"kl_coef": 0.1, "gamma": 0.9}),
    ("reinforce_pp_baseline", {}), ("gae", {}), ("stepwise_grpo", {}), ("gdpo", {}),
]


@SETTINGS
@given(sizes_st, st.integers(0, 2**31 - 1), st.booleans())
def test_results_do_not_depend_on_batch_order(sizes, seed, invalid):
    gen = torch.Generator().manual_seed(seed)
    b = ref.make_batch(gen, sizes=tuple(sizes), T=6, S=3, invalid_frac=0.2 if invalid else 0.0, empty_row=False)
    perm = torch.randperm(b.batch_size, generator=gen)
    p = b.select(perm)
    for name, params in ORDER_CASES:
        torch.testing.assert_close(compute_advantages(name, p, **params), compute_advantages(name, b, **params)[perm],
                                   rtol=1e-5, atol=1e-5, msg=name)
    logp = b.old_logp + 0.3 * torch.randn(b.mask.shape, generator=gen)
    adv = torch.randn(b.mask.shape, generator=gen)
    for mode in AGG_MODES:
        l1 = aggregate(adv, b.mask, mode)
        l2 = aggregate(adv[perm], p.mask, mode)
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        for loss in ("ppo_clip", "gspo"):
            l1, _ = compute_policy_loss(loss, logp, b.old_logp, adv, b.mask, agg=mode)
            l2, _ = compute_policy_loss(loss, logp[perm], p.old_logp, adv[perm], p.mask, agg=mode)
            torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
