"""Reward shapers and sample filters against loop references, plus hand-worked cases."""
from __future__ import annotations

import pytest
import torch

import reference as ref
from flowrl.core import accuracy_band_filter, soft_overlong_penalty, weighted_sum, zero_variance_filter


def _data(gen):
    b = ref.make_batch(gen, sizes=(1, 2, 3, 1, 5, 8, 4, 6), invalid_frac=0.15)
    return b.outcome, b.group, b.sample_valid, b.outcome_parts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_sum_matches_reference(seed):
    _, _, _, parts = _data(torch.Generator().manual_seed(seed))
    for w in (None, {"acc": 2.0, "len": -0.5}):
        got = weighted_sum(parts, w)
        torch.testing.assert_close(got.double(), torch.tensor(ref.weighted_sum(parts, w), dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("keep_singletons", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_variance_filter_matches_reference(seed, keep_singletons):
    r, g, v, _ = _data(torch.Generator().manual_seed(seed))
    got = zero_variance_filter(r, g, valid=v, keep_singletons=keep_singletons)
    assert got.dtype == torch.bool
    assert got.tolist() == ref.zero_variance_filter(r, g, v, keep_singletons)


@pytest.mark.parametrize("band", [(0.2, 0.8), (0.0, 0.5), (0.5, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_band_filter_matches_reference(seed, band):
    gen = torch.Generator().manual_seed(seed)
    _, g, v, _ = _data(gen)
    correct = torch.rand(g.shape, generator=gen) < 0.5
    got = accuracy_band_filter(correct, g, low=band[0], high=band[1], valid=v)
    assert got.tolist() == ref.accuracy_band_filter(correct, g, band[0], band[1], v)


def test_soft_overlong_penalty_matches_reference(gen):
    lengths = torch.randint(0, 120, (200,), generator=gen)
    for factor in (1.0, 0.5):
        got = soft_overlong_penalty(lengths, max_len=100, cache_len=30, factor=factor)
        torch.testing.assert_close(got.double(), torch.tensor(ref.soft_overlong_penalty(lengths, 100, 30, factor), dtype=torch.float64))


def test_shaping_by_hand():
    parts = {"acc": torch.tensor([1.0, 0.0]), "fmt": torch.tensor([0.5, 1.0])}
    assert weighted_sum(parts).tolist() == [1.5, 1.0]
    assert weighted_sum(parts, {"fmt": 0.2}).tolist() == pytest.approx([1.1, 0.2])
    # group 0: 1, 1 (equal, dropped); group 1: 0, 1 (kept); group 2: singleton (dropped unless kept)
    r, g = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5]), torch.tensor([0, 0, 1, 1, 2])
    assert zero_variance_filter(r, g).tolist() == [False, False, True, True, False]
    assert zero_variance_filter(r, g, keep_singletons=True).tolist() == [False, False, True, True, True]
    # accuracies: group 0 -> 1/4, group 1 -> 3/4, group 2 -> 1
    c = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    assert accuracy_band_filter(c, g, low=0.2, high=0.8).tolist() == [True] * 8 + [False]
    assert accuracy_band_filter(c, g, low=0.5, high=1.0).tolist() == [False] * 4 + [True] * 5
    # max 100, cache 20: 0 up to 80, (80 - L) / 20 inside, -1 beyond 100
    L = torch.tensor([10, 80, 81, 90, 100, 101])
    assert soft_overlong_penalty(L, 100, 20).tolist() == pytest.approx([0, 0, -0.05, -0.5, -1.0, -1.0])


def test_shaping_bad_input():
    p = {"acc": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"weighted_sum: no reward parts given"):
        weighted_sum({})
    with pytest.raises(ValueError, match=r"weights name unknown reward part\(s\) \['ac'\]; parts are \['acc'\]"):
        weighted_sum(p, {"ac": 1.0})
    with pytest.raises(ValueError, match=r"every part must be float \[B\] of one B"):
        weighted_sum({"acc": torch.zeros(3), "fmt": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"need 0 <= low <= high <= 1, got low=0.9, high=0.1"):
        accuracy_band_filter(torch.zeros(3), torch.zeros(3, dtype=torch.long), low=0.9, high=0.1)
    with pytest.raises(ValueError, match=r"need 0 < cache_len <= max_len, got cache_len=0, max_len=10"):
        soft_overlong_penalty(torch.zeros(3), 10, 0)
    with pytest.raises(ValueError, match=r"group has shape \(2,\); expected long \[B\] = \(3,\)"):
        zero_variance_filter(torch.zeros(3), torch.zeros(2, dtype=torch.long))
