"""Tree and graph credit (flowrl.core.estimators.tree: tree_mc, salt) against slow loop references from the papers'
formulas.

Every reference loops over samples, steps and tokens in plain Python (float64) on random batches with ragged
masks (holes), trajectories of different step counts, singleton / all-equal / mixed groups, invalid samples and
an empty row; plus hand-worked cases. Batches and helpers: tests/credit_reference.py.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
import torch

from flowrl.core import TrajectoryBatch, compute_advantages
from tests.credit_reference import (
    SEEDS, assert_close, grpo_ref, last_step, make_batch, mean, present_steps, to_actions, valid_of,
)

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path


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
