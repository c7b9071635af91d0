"""Every registered estimator against the loop references of tests/reference.py, plus hand-worked cases."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import reference as ref
from flowrl.core import ADVANTAGES, TrajectoryBatch, compute_advantages, min_group_size, register_advantage
from flowrl.core.batch import outcome_at_end
from flowrl.core.estimators.common import discounted_returns

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path

# (estimator, params) pairs: every estimator, every scale, every option that changes the formula.
CASES = [
    ("grpo", {}),
    ("grpo", {"scale": "batch"}),
    ("grpo", {"scale": "none"}),
    ("grpo", {"eps": 0.5}),
    ("dr_grpo", {}),
    ("rloo", {}),
    ("reinforce_pp", {}),
    ("reinforce_pp", {"kl_coef": 0.1}),
    ("reinforce_pp", {"kl_coef": 0.05, "gamma": 0.9}),
    ("reinforce_pp_baseline", {}),
    ("gae", {}),
    ("gae", {"gamma": 0.9, "lam": 0.8, "kl_coef": 0.1}),
    ("gae", {"gamma": 0.99, "lam": 1.0, "whiten": False}),
    ("stepwise_grpo", {}),
    ("stepwise_grpo", {"scale": "none"}),
    ("gdpo", {}),
    ("gdpo", {"weights": {"acc": 2.0, "len": 0.5}}),
]
BATCHES = {
    "plain": dict(),
    "big_groups": dict(sizes=(16, 1, 9, 2, 16, 3, 1, 12), T=23, S=5),
    "invalid": dict(invalid_frac=0.2),
    "invalid_rows_kept": dict(invalid_frac=0.2, invalid_mask_rows=True),
    # no holes: the matrix-product scan (returns, GAE); T = 70 spans several 32-action chunks, not a multiple
    "runs_long": dict(layout="runs", T=70, S=6),
    "left_padded": dict(layout="left", T=37, S=5, invalid_frac=0.2),
}


def test_every_referenced_estimator_is_registered_and_tested():
    # the estimators with a loop reference in tests/reference.py; the others are tested in tests/test_credit*.py
    assert {name for name, _ in CASES} == set(ref.ESTIMATORS)
    assert set(ref.ESTIMATORS) <= set(ADVANTAGES)


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p in CASES])
def test_estimator_matches_reference(name, params, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = ref.make_batch(gen, **BATCHES[kind])
    got = compute_advantages(name, batch, **params)
    want = ref.ESTIMATORS[name](batch, **params)
    assert got.dtype == torch.float32 and got.shape == batch.mask.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)
    assert bool((got[~batch.mask] == 0).all()), "advantages must be exactly 0 off the mask"
    if batch.sample_valid is not None:
        assert bool((got[~batch.sample_valid] == 0).all()), "invalid samples must get 0"


def test_outcome_estimators_give_zero_to_singleton_and_equal_groups(gen):
    group = torch.tensor([7, 3, 3, 3, 9, 9])  # 7: singleton, 3: all equal, 9: mixed
    outcome = torch.tensor([5.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    mask = torch.ones(6, 4, dtype=torch.bool)
    b = TrajectoryBatch(group=group, mask=mask, step=torch.zeros(6, 4, dtype=torch.long),
                        old_logp=torch.zeros(6, 4), outcome=outcome)
    for name in ("grpo", "dr_grpo", "rloo"):
        a = compute_advantages(name, b)
        assert bool((a[:4] == 0).all()) and bool(torch.isfinite(a).all()), name
        assert bool((a[4:] != 0).all()), name


# ----------------------------------------------------------------------------- hand-worked cases
def _b(group, outcome, mask, **kw) -> TrajectoryBatch:
    mask = torch.tensor(mask, dtype=torch.bool)
    return TrajectoryBatch(group=torch.tensor(group), mask=mask, step=kw.pop("step", torch.zeros(mask.shape, dtype=torch.long)),
                           old_logp=kw.pop("old_logp", torch.zeros(mask.shape)), outcome=torch.tensor(outcome), **kw)


# group 0: rewards 1, 2, 3 (mean 2, unbiased std 1); group 1: singleton 5; group 2: equal 2, 2.
HAND = _b([0, 0, 0, 1, 2, 2], [1.0, 2.0, 3.0, 5.0, 2.0, 2.0], [[1, 1, 0]] * 6)


def test_grpo_by_hand():
    a = compute_advantages("grpo", HAND)[:, 0]
    e = 1e-4
    assert a.tolist() == pytest.approx([-1 / (1 + e), 0.0, 1 / (1 + e), 0.0, 0.0, 0.0], abs=1e-6)
    # batch std of 1, 2, 3, 5, 2, 2: mean 2.5, squared deviations sum 9.5, / 5 = 1.9
    a = compute_advantages("grpo", HAND, scale="batch")[:, 0]
    sb = math.sqrt(1.9)
    assert a.tolist() == pytest.approx([-1 / (sb + e), 0.0, 1 / (sb + e), 0.0, 0.0, 0.0], abs=1e-6)
    a = compute_advantages("grpo", HAND, scale="none")
    assert a[:, 0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert a[:, 2].tolist() == [0.0] * 6  # padding


def test_dr_grpo_and_rloo_by_hand():
    assert compute_advantages("dr_grpo", HAND)[:, 1].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # leave-one-out means of group 0: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5
    assert compute_advantages("rloo", HAND)[:, 1].tolist() == pytest.approx([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])


def test_reinforce_pp_by_hand():
    # sample 0: actions at t=0 and t=2 (t=1 is a tool observation), outcome 1 at t=2; gamma 0.5
    # returns: t=2 -> 1, t=0 -> 0 + 0.5 * 1 = 0.5 (the hole neither earns nor discounts).
    # sample 1: actions t=0, t=1, outcome 0 -> returns 0, 0. Whitening over 0.5, 1, 0, 0:
    # mean 0.375, squared deviations .015625 + .390625 + .140625 + .140625 = .6875, unbiased var .6875/3.
    b = _b([0, 0], [1.0, 0.0], [[1, 0, 1], [1, 1, 0]])
    a = compute_advantages("reinforce_pp", b, gamma=0.5)
    inv = 1 / math.sqrt(0.6875 / 3 + 1e-8)
    want = [[(0.5 - 0.375) * inv, 0.0, (1 - 0.375) * inv], [-0.375 * inv, -0.375 * inv, 0.0]]
    torch.testing.assert_close(a, torch.tensor(want))
    # in-reward KL: old - ref = 1 on every action, kl_coef 0.1 -> r = -0.1 per action (gamma 1).
    b2 = dataclasses.replace(b, old_logp=torch.ones(2, 3), ref_logp=torch.zeros(2, 3))
    a = compute_advantages("reinforce_pp", b2, kl_coef=0.1)
    # returns: sample 0: t=2: 1 - .1 = .9, t=0: -.1 + .9 = .8; sample 1: t=1: -.1, t=0: -.2.
    vals = [0.8, 0.9, -0.2, -0.1]
    m = sum(vals) / 4
    inv = 1 / math.sqrt(sum((v - m) ** 2 for v in vals) / 3 + 1e-8)
    want = [[(0.8 - m) * inv, 0.0, (0.9 - m) * inv], [(-0.2 - m) * inv, (-0.1 - m) * inv, 0.0]]
    torch.testing.assert_close(a, torch.tensor(want))


def test_reinforce_pp_baseline_by_hand():
    # group 0: rewards 1, 0 -> centred 0.5, -0.5; sample 0 has 2 actions, sample 1 has 1:
    # values .5, .5, -.5: mean 1/6, deviations 1/3, 1/3, -2/3 -> unbiased var (1/9+1/9+4/9)/2 = 1/3.
    b = _b([0, 0], [1.0, 0.0], [[1, 1], [1, 0]])
    a = compute_advantages("reinforce_pp_baseline", b)
    inv = 1 / math.sqrt(1 / 3 + 1e-8)
    torch.testing.assert_close(a, torch.tensor([[inv / 3, inv / 3], [-2 * inv / 3, 0.0]]))


def test_gae_by_hand():
    # V = 0.5, 0.2; outcome 1 at t=1; gamma 1, lambda 0.5:
    # t=1: delta = 1 + 0 - 0.2 = 0.8, A = 0.8;  t=0: delta = 0 + 0.2 - 0.5 = -0.3, A = -0.3 + 0.5 * 0.8 = 0.1.
    b = _b([0], [1.0], [[1, 1, 0]], value=torch.tensor([[0.5, 0.2, 9.0]]))
    a = compute_advantages("gae", b, gamma=1.0, lam=0.5, whiten=False)
    torch.testing.assert_close(a, torch.tensor([[0.1, 0.8, 0.0]]))
    # gamma 0.5, lambda 1 with a hole at t=1: t=2: delta = 1 - 0.2 = 0.8; t=0: delta = 0.5*0.2 - 0.5 = -0.4,
    # A = -0.4 + 0.5 * 0.8 = 0.0.
    b = _b([0], [1.0], [[1, 0, 1]], value=torch.tensor([[0.5, 7.0, 0.2]]))
    a = compute_advantages("gae", b, gamma=0.5, lam=1.0, whiten=False)
    torch.testing.assert_close(a, torch.tensor([[0.0, 0.0, 0.8]]))


def test_stepwise_grpo_by_hand():
    # one group of 3, two steps; step 0 rewards 1, 3, 2 (mean 2, std 1); step 1: NaN, 2, 2 (equal -> 0).
    sr = torch.tensor([[1.0, float("nan")], [3.0, 2.0], [2.0, 2.0]])
    step = torch.tensor([[0, 1, 1]] * 3)
    b = _b([4, 4, 4], [0.0, 0.0, 0.0], [[1, 1, 1], [1, 1, 0], [1, 0, 1]], step=step, step_reward=sr)
    a = compute_advantages("stepwise_grpo", b)
    e = 1 / (1 + 1e-4)
    torch.testing.assert_close(a, torch.tensor([[-e, 0.0, 0.0], [e, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_gdpo_by_hand():
    # part a: group 0 -> 1, 0; group 1 -> 1, 1 (equal).  part b: group 0 -> 0, 0 (equal); group 1 -> 2, 0.
    # GRPO per part: a gives +-x with x = 0.5 / (sqrt(.5) + 1e-4); b gives +-y with y = 1 / (sqrt(2) + 1e-4).
    parts = {"a": torch.tensor([1.0, 0.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.0, 2.0, 0.0])}
    b = _b([0, 0, 1, 1], [0.0] * 4, [[1, 1]] * 4, outcome_parts=parts)
    x, y = 0.5 / (math.sqrt(0.5) + 1e-4), 1 / (math.sqrt(2) + 1e-4)
    inv = 1 / math.sqrt((2 * x * x + 2 * y * y) / 3 + 1e-8)  # mean of x, -x, y, -y is 0
    a = compute_advantages("gdpo", b)[:, 0]
    torch.testing.assert_close(a, torch.tensor([x * inv, -x * inv, y * inv, -y * inv]))
    # weights: w_b = 3 -> totals x, -x, 3y, -3y
    a = compute_advantages("gdpo", b, weights={"b": 3.0})[:, 0]
    inv = 1 / math.sqrt((2 * x * x + 18 * y * y) / 3 + 1e-8)
    torch.testing.assert_close(a, torch.tensor([x * inv, -x * inv, 3 * y * inv, -3 * y * inv]))


def test_token_helpers_by_hand():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    end = outcome_at_end(torch.tensor([2.0, 3.0, 4.0]), mask)
    assert end.tolist() == [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, 4]]
    r = torch.tensor([[1.0, 5.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    g = discounted_returns(r, mask, gamma=0.5)
    assert g.tolist() == [[2.0, 0, 2.0, 0], [0, 0, 0, 0], [1.875, 1.75, 1.5, 1.0]]
    assert discounted_returns(r, mask, gamma=1.0).tolist() == [[3.0, 0, 2.0, 0], [0, 0, 0, 0], [4.0, 3.0, 2.0, 1.0]]


# ----------------------------------------------------------------------------- bad input
def test_unknown_estimator_lists_registered_names(gen):
    b = ref.make_batch(gen)
    with pytest.raises(KeyError, match=r"unknown advantage estimator 'grp0'.*'grpo'.*'rloo'"):
        compute_advantages("grp0", b)


def test_unknown_parameter_names_the_valid_ones(gen):
    b = ref.make_batch(gen)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['sclae'\]; valid: \['scale', 'eps'\]"):
        compute_advantages("grpo", b, sclae="batch")
    with pytest.raises(ValueError, match=r"scale='groups'.*valid values"):
        compute_advantages("grpo", b, scale="groups")
    with pytest.raises(ValueError, match=r"scale='batch'.*valid values are \('group', 'none'\)"):
        compute_advantages("stepwise_grpo", b, scale="batch")


def test_missing_required_fields(gen):
    b = ref.make_batch(gen)
    with pytest.raises(ValueError, match=r"'gae' needs batch.value"):
        compute_advantages("gae", dataclasses.replace(b, value=None))
    with pytest.raises(ValueError, match=r"'stepwise_grpo' needs batch.step_reward"):
        compute_advantages("stepwise_grpo", dataclasses.replace(b, step_reward=None, node=None))
    with pytest.raises(ValueError, match=r"'gdpo' needs batch.outcome_parts"):
        compute_advantages("gdpo", dataclasses.replace(b, outcome_parts={}))
    with pytest.raises(ValueError, match=r"kl_coef=0.1 needs batch.ref_logp"):
        compute_advantages("reinforce_pp", dataclasses.replace(b, ref_logp=None), kl_coef=0.1)
    with pytest.raises(KeyError, match=r"gdpo: weights name unknown reward part\(s\) \['nope'\]"):
        compute_advantages("gdpo", b, weights={"nope": 1.0})


def test_nan_reward_raises_or_is_masked_and_counted(gen):
    b = ref.make_batch(gen)
    outcome = b.outcome.clone()
    outcome[[2, 5]] = float("nan")
    bad = dataclasses.replace(b, outcome=outcome)
    with pytest.raises(ValueError, match=r"non-finite reward in 2 sample\(s\) \(first indices \[2, 5\]\)"):
        compute_advantages("grpo", bad)
    masked = bad.validate(nonfinite="mask")
    assert masked.num_masked == 2 and masked.sample_valid.tolist().count(False) == 2
    assert not bool(masked.mask[[2, 5]].any())
    for name in ref.ESTIMATORS:
        a = compute_advantages(name, masked)
        assert bool(torch.isfinite(a).all()) and bool((a[[2, 5]] == 0).all()), name
        torch.testing.assert_close(a.double(), ref.ESTIMATORS[name](masked), rtol=1e-4, atol=2e-5)


def test_empty_batch_and_no_valid_action(gen):
    b = ref.make_batch(gen)
    empty = b.select(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"TrajectoryBatch is empty"):
        compute_advantages("grpo", empty)
    with pytest.raises(ValueError, match=r"mask has no valid action"):
        compute_advantages("grpo", dataclasses.replace(b, mask=torch.zeros_like(b.mask)))


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match=r"'grpo' is already registered"):
        register_advantage("grpo")(lambda batch: batch.mask.float())


def test_a_new_estimator_plugs_into_the_registry(gen):
    @register_advantage("test_only_constant")
    def _const(batch, *, c: float = 1.0):
        return torch.full(batch.mask.shape, c)

    try:
        b = ref.make_batch(gen)
        a = compute_advantages("test_only_constant", b, c=2.5)
        assert bool((a[b.mask] == 2.5).all()) and bool((a[~b.mask] == 0).all())
    finally:
        ADVANTAGES.unregister("test_only_constant")


@pytest.mark.parametrize("c", [0.0, 0.03, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("T", [1, 31, 32, 100])
def test_masked_discounted_scan_matches_the_recurrence(c, T):
    """The chunked, vectorised scan (returns and GAE) equals y_t = x_t + c * y_next_valid over long ragged rows."""
    from flowrl.core.kernels.scan import masked_discounted_scan

    g = torch.Generator().manual_seed(T)
    B = 7
    x = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False  # an empty row
    mask[1] = True  # a full row
    torch.testing.assert_close(masked_discounted_scan(x, mask, c), ref.discounted_scan(x, mask, c), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- min_group_size
GROUP_SIZE = {  # 2 where the estimator's statistic compares the samples of a group
    "grpo": 2, "dr_grpo": 2, "rloo": 2, "reinforce_pp_baseline": 2, "gdpo": 2, "grpo_per_reward": 2,
    "reinforce_pp": 1, "gae": 1, "prime": 2, "empg": 2, "stepwise_grpo": 2, "tp_grpo": 2, "step_returns": 1, "dual_level": 2, "igpo": 1,
    "spae": 2, "tree_mc": 2, "salt": 2, "pass_at_k": 2,
}


def test_min_group_size_of_every_estimator():
    assert {n: min_group_size(n) for n in ADVANTAGES} == GROUP_SIZE
    with pytest.raises(KeyError, match=r"unknown advantage estimator 'grp0'; valid: \[.*'grpo'"):
        min_group_size("grp0")


@pytest.mark.parametrize("name", sorted(GROUP_SIZE))
def test_groups_of_one_carry_no_outcome_exactly_where_min_group_size_is_2(name):
    """On a batch of singleton groups, an estimator that needs two samples per group ignores the outcome (most
    give a constant 0; empg and spae keep only their step terms); one that needs one does not."""
    gen = torch.Generator().manual_seed(3)
    b = ref.make_batch(gen, sizes=(1,) * 9, S=4, empty_row=False, parts=("acc", "fmt"))
    b = dataclasses.replace(b, step_reward=torch.nan_to_num(b.step_reward, nan=0.5).sigmoid())  # probes: finite
    # another outcome for every sample (reversed: not an affine map, which a whitening would undo)
    other = dataclasses.replace(b, outcome=b.outcome.flip(0) + 1,
                                outcome_parts={k: v.flip(0) + 1 for k, v in b.outcome_parts.items()})
    params = {"step_returns": {"outcome_coef": 1.0}}.get(name, {})
    a, a2 = compute_advantages(name, b, **params), compute_advantages(name, other, **params)
    if GROUP_SIZE[name] == 2:
        torch.testing.assert_close(a, a2, rtol=0, atol=0)
    else:
        assert float((a - a2).abs().max()) > 1e-3
