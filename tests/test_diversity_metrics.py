"""The diversity primitives of ``flowrl.core.diversity`` against slow references written here from the definitions
(a double loop over the pairs of each group; numpy's eigenvalues of K / n for the Vendi score), on random features
with ragged groups and a group of one, plus cases worked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowrl.core.diversity import group_mean_pairwise_distance, mean_pairwise_distance, pairwise_distances, vendi_score

GROUPS = [7, 7, 3, 9, 9, 9, 9, 3, 5, 7, 9, 2, 2, 2]  # ragged: sizes 3, 2, 5, 1 (group 5), 3; ids not 0..G-1


def _features(seed: int = 0, D: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(GROUPS), D, generator=g, dtype=torch.float64).float()


def _members(group: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group):
        out.setdefault(g, []).append(i)
    return dict(sorted(out.items()))


def _dist(f: np.ndarray, i: int, j: int) -> float:
    return math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(f[i], f[j])))


def ref_mean_pairwise(f: np.ndarray, group: list[int]) -> list[float]:
    """D_i = mean over j != i of the same group of ||f_i - f_j||; 0 alone."""
    out = []
    for i in range(len(group)):
        ds = [_dist(f, i, j) for j in range(len(group)) if j != i and group[j] == group[i]]
        out.append(sum(ds) / len(ds) if ds else 0.0)
    return out


def ref_group_mean(f: np.ndarray, group: list[int]) -> dict[int, float]:
    """Per group: the mean over its ordered pairs (i, j), i != j, by an explicit double loop; NaN alone."""
    out = {}
    for g, idx in _members(group).items():
        ds = [_dist(f, i, j) for i in idx for j in idx if i != j]
        out[g] = sum(ds) / len(ds) if ds else float("nan")
    return out


def ref_vendi(f: np.ndarray, group: list[int], kernel: str, h: float | None = None,
              center: bool = False) -> dict[int, float]:
    """Per group: exp(-sum lambda log lambda), lambda = numpy eigvals of K / n (Friedman & Dieng, 2023)."""
    f = np.asarray(f, dtype=np.float64)
    if center:
        f = f - f.mean(0, keepdims=True)
    out = {}
    for g, idx in _members(group).items():
        n = len(idx)
        K = np.zeros((n, n))
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                if kernel == "cosine":
                    ni, nj = np.linalg.norm(f[i]), np.linalg.norm(f[j])
                    K[a, b] = 1.0 if a == b else (f[i] @ f[j] / (ni * nj) if ni > 0 and nj > 0 else 0.0)
                else:
                    K[a, b] = math.exp(-_dist(f, i, j) ** 2 / (2 * h * h))
        lam = np.linalg.eigvals(K / n).real
        out[g] = math.exp(-sum(x * math.log(x) for x in lam if x > 1e-12))
    return out


def _median_distance(f: np.ndarray) -> float:
    """The rbf kernel's default bandwidth: the median distance over all ordered pairs of the batch."""
    return float(np.median([_dist(f, i, j) for i in range(len(f)) for j in range(len(f)) if i != j]))


# ---------------------------------------------------------------------------------------------- distances
def test_mean_pairwise_distance_against_loops():
    f = _features()
    got = mean_pairwise_distance(f, torch.tensor(GROUPS))
    want = ref_mean_pairwise(f.double().numpy(), GROUPS)
    assert got.shape == (len(GROUPS),)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert float(got[GROUPS.index(5)]) == 0.0  # alone in its group


def test_group_mean_pairwise_distance_against_loops():
    f = _features(1)
    got, ids = group_mean_pairwise_distance(f, torch.tensor(GROUPS))
    want = ref_group_mean(f.double().numpy(), GROUPS)
    assert ids.tolist() == list(want)  # torch.unique order
    for g, v in zip(ids.tolist(), got.tolist()):
        if math.isnan(want[g]):
            assert math.isnan(v) and g == 5  # a group of one: no pair, nothing measured
        else:
            assert v == pytest.approx(want[g], rel=1e-5)


def test_distances_by_hand_and_identical_samples_are_exactly_zero():
    # group 0: (0,0), (3,4), (0,4): distances 5, 4, 3 -> per-sample means (5+4)/2, (5+3)/2, (4+3)/2; group mean 4
    # group 1: two identical rows: distance exactly 0 (differences, not |a|^2 + |b|^2 - 2ab)
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0], [0.1234567, 7.654321], [0.1234567, 7.654321]])
    group = torch.tensor([0, 0, 0, 1, 1])
    assert mean_pairwise_distance(f, group).tolist() == [4.5, 4.0, 3.5, 0.0, 0.0]
    per_group, _ = group_mean_pairwise_distance(f, group)
    assert per_group.tolist() == [4.0, 0.0]
    d, pairs = pairwise_distances(f, group)
    assert d[3, 4] == 0.0 and pairs.sum() == 8 and not pairs[0, 3] and not pairs.diagonal().any()


def test_shape_errors_are_loud():
    with pytest.raises(ValueError, match=r"features must be float \[B, D\]"):
        mean_pairwise_distance(torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group must be long \[B\] with B = 3"):
        vendi_score(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kernel='l1'; valid: \['cosine', 'rbf'\]"):
        vendi_score(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), kernel="l1")


# ---------------------------------------------------------------------------------------------- Vendi
@pytest.mark.parametrize("kernel,center,bandwidth", [("cosine", False, None), ("cosine", True, None),
                                                      ("rbf", False, 1.7), ("rbf", False, None)])
def test_vendi_against_numpy_eigenvalues(kernel, center, bandwidth):
    f = _features(2)
    fn = f.double().numpy()
    got, ids = vendi_score(f, torch.tensor(GROUPS), kernel=kernel, center=center, bandwidth=bandwidth)
    h = bandwidth if bandwidth is not None else _median_distance(fn)
    want = ref_vendi(fn, GROUPS, kernel, h=h, center=center)
    assert ids.tolist() == list(want)
    np.testing.assert_allclose(got.numpy(), list(want.values()), rtol=2e-4)
    assert float(got[ids.tolist().index(5)]) == pytest.approx(1.0)  # a group of one: one effective sample


@pytest.mark.parametrize("kernel", ["cosine", "rbf"])
def test_vendi_identical_is_one_orthogonal_is_n(kernel):
    eye = torch.eye(5) * 30.0  # orthogonal and far apart (rbf with bandwidth 1: off-diagonal exp(-900) = 0)
    same = torch.tensor([[0.3, -1.2, 2.0, 0.0, 0.5]]).repeat(4, 1)
    f = torch.cat([eye, same])
    group = torch.tensor([0] * 5 + [1] * 4)
    got, _ = vendi_score(f, group, kernel=kernel, bandwidth=1.0 if kernel == "rbf" else None)
    assert got.tolist() == [pytest.approx(5.0, rel=1e-5), pytest.approx(1.0, abs=1e-5)]


def test_vendi_by_hand_two_samples():
    # two samples with cosine c: K / 2 = [[1, c], [c, 1]] / 2 has eigenvalues (1 +- c) / 2;
    # c = 0.6 (vectors (1, 0) and (0.6, 0.8)): lambda = 0.8, 0.2, VS = exp(-(0.8 ln 0.8 + 0.2 ln 0.2)) = 1.6493
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    got, _ = vendi_score(f, torch.zeros(2, dtype=torch.long))
    assert float(got[0]) == pytest.approx(math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))), rel=1e-5)
    assert float(got[0]) == pytest.approx(1.6493, abs=1e-4)
    # rbf, bandwidth 1, distance 2 between the two: k = exp(-4 / 2) = e^-2, lambda = (1 +- e^-2) / 2
    k = math.exp(-2.0)
    lam = [(1 + k) / 2, (1 - k) / 2]
    got, _ = vendi_score(torch.tensor([[0.0], [2.0]]), torch.zeros(2, dtype=torch.long), kernel="rbf", bandwidth=1.0)
    assert float(got[0]) == pytest.approx(math.exp(-sum(x * math.log(x) for x in lam)), rel=1e-5)
