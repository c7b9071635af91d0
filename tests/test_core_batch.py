"""TrajectoryBatch: construction, validate() (shapes, dtypes, non-finite rewards), helpers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import reference as ref
from flowrl.core import TrajectoryBatch, broadcast_to_actions, gather_steps

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path

NAN, INF = float("nan"), float("inf")


def test_build_by_keyword_optional_fields_default_to_none():
    b = TrajectoryBatch(group=torch.tensor([0, 0]), mask=torch.ones(2, 3, dtype=torch.bool),
                        step=torch.zeros(2, 3, dtype=torch.long), old_logp=torch.zeros(2, 3), outcome=torch.tensor([1.0, 0.0]))
    assert b.ref_logp is None and b.step_reward is None and b.value is None and b.entropy is None and b.node is None
    assert b.outcome_parts == {} and b.sample_valid is None and b.num_masked == 0
    assert b.validate() is b
    assert (b.batch_size, b.num_actions, b.num_steps) == (2, 3, 1)
    assert b.valid.tolist() == [True, True]


def _set(b, **kw):
    return dataclasses.replace(b, **kw)


def test_validate_names_field_shape_and_expected_shape(gen):
    b = ref.make_batch(gen)
    B, T, S = b.batch_size, b.num_actions, b.num_steps
    cases = [
        (dict(outcome=torch.zeros(B + 1)), rf"outcome has shape \({B + 1},\); expected \[B\] = \({B},\)"),
        (dict(group=torch.zeros(B, 1, dtype=torch.long)), rf"group has shape \({B}, 1\); expected \[B\] = \({B},\)"),
        (dict(old_logp=torch.zeros(B, T - 1)), rf"old_logp has shape \({B}, {T - 1}\); expected \[B, T\] = \({B}, {T}\)"),
        (dict(step=torch.zeros(B, T + 2, dtype=torch.long)), rf"step has shape .*expected \[B, T\] = \({B}, {T}\)"),
        (dict(value=torch.zeros(T, B)), rf"value has shape \({T}, {B}\); expected \[B, T\]"),
        (dict(node=torch.zeros(B, S + 1, dtype=torch.long)), rf"node has shape \({B}, {S + 1}\); expected \[B, S\] = \({B}, {S}\)"),
        (dict(sample_valid=torch.ones(B - 1, dtype=torch.bool)), rf"sample_valid has shape \({B - 1},\); expected \[B\]"),
        (dict(mask=b.mask.float()), r"mask has dtype torch.float32; expected a bool tensor"),
        (dict(group=b.group.float()), r"group has dtype torch.float32; expected a long tensor"),
        (dict(outcome=b.outcome.long()), r"outcome has dtype torch.int64; expected a float tensor"),
        (dict(mask=b.mask[0]), r"mask has shape \(\d+,\); expected \[B, T\]"),
        (dict(outcome=[1.0] * B), r"outcome must be a torch.Tensor, got list"),
        (dict(ref_logp=1.0), r"ref_logp must be a torch.Tensor or None, got float"),
        (dict(outcome_parts={"acc": torch.zeros(B + 2)}), rf"outcome_parts\['acc'\] has shape \({B + 2},\); expected float \[B\]"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _set(b, **kw).validate()


def test_validate_step_range(gen):
    b = ref.make_batch(gen)
    step = b.step.clone()
    step[0, 0] = b.num_steps  # the first action of row 0 is always valid
    with pytest.raises(ValueError, match=r"step has values outside \[0, S=4\) on valid actions"):
        _set(b, step=step).validate()
    step = b.step.clone()
    step[0, 0] = -1
    with pytest.raises(ValueError, match=r"step has negative values"):
        _set(b, step=step, step_reward=None, node=None).validate()
    step = b.step.clone()
    step[~b.mask] = 99  # padding may hold anything
    _set(b, step=step).validate()


def test_empty_batch_and_no_valid_action(gen):
    b = ref.make_batch(gen)
    with pytest.raises(ValueError, match=r"TrajectoryBatch is empty: mask has shape \[0, T\]"):
        b.select(torch.zeros(0, dtype=torch.long)).validate()
    with pytest.raises(ValueError, match=r"TrajectoryBatch.mask has no valid action \(all False\)"):
        _set(b, mask=torch.zeros_like(b.mask)).validate()


def test_nonfinite_rewards_raise_or_are_masked_and_counted(gen):
    b = ref.make_batch(gen)
    out = b.outcome.clone()
    out[3] = NAN
    parts = dict(b.outcome_parts)
    parts["fmt"] = parts["fmt"].clone()
    parts["fmt"][7] = INF
    sr = b.step_reward.clone()
    sr[9, 1] = -INF
    bad = _set(b, outcome=out, outcome_parts=parts, step_reward=sr)
    with pytest.raises(ValueError, match=r"non-finite reward in 3 sample\(s\) \(first indices \[3, 7, 9\]\).*nonfinite='mask'"):
        bad.validate()
    with pytest.raises(ValueError, match=r"validate\(nonfinite='drop'\): valid values are 'raise', 'mask'"):
        bad.validate(nonfinite="drop")
    m = bad.validate(nonfinite="mask")
    assert m.num_masked == 3
    assert m.sample_valid.tolist() == [i not in (3, 7, 9) for i in range(b.batch_size)]
    assert not bool(m.mask[[3, 7, 9]].any()) and bool((m.mask[m.sample_valid] == b.mask[m.sample_valid]).all())
    assert m.validate(nonfinite="mask").num_masked == 3  # masking again counts nothing new
    # NaN in step_reward means "no reward at this step": allowed
    assert b.validate() is b and bool(torch.isnan(b.step_reward).any())


def test_select_cat_to_and_minibatches(gen):
    b = ref.make_batch(gen, invalid_frac=0.2)
    idx = torch.tensor([4, 0, 2])
    s = b.select(idx)
    assert s.group.tolist() == b.group[idx].tolist() and s.outcome_parts["acc"].tolist() == b.outcome_parts["acc"][idx].tolist()
    keep = torch.arange(b.batch_size) % 2 == 0
    assert b.select(keep).batch_size == int(keep.sum())
    with pytest.raises(ValueError, match=r"bool index has shape \(3,\); expected \[B\]"):
        b.select(torch.ones(3, dtype=torch.bool))
    parts = list(b.minibatches(3, generator=torch.Generator().manual_seed(0)))
    sizes = [len(i) for i, _ in parts]  # B = 31: sizes differ by at most one
    assert sizes == [11, 10, 10] and b.batch_size == 31
    order = torch.cat([i for i, _ in parts])
    assert sorted(order.tolist()) == list(range(b.batch_size))
    joined = TrajectoryBatch.cat([mb for _, mb in parts])
    inv = torch.argsort(order)
    back = joined.select(inv)
    for f in ("group", "mask", "step", "old_logp", "ref_logp", "value", "entropy", "node", "sample_valid"):
        assert torch.equal(getattr(back, f), getattr(b, f)), f
    torch.testing.assert_close(back.step_reward, b.step_reward, equal_nan=True)
    torch.testing.assert_close(back.outcome, b.outcome, equal_nan=True)
    c = b.to("cpu")
    assert c.mask.dtype == torch.bool and torch.equal(c.group, b.group)
    with pytest.raises(ValueError, match=r"minibatches\(n=0\): n must be an int in \[1, B="):
        next(b.minibatches(0))
    with pytest.raises(ValueError, match=r"field 'value' is None in some batches and set in others"):
        TrajectoryBatch.cat([b, _set(b, value=None)])
    with pytest.raises(ValueError, match=r"field 'mask' has trailing shapes"):
        TrajectoryBatch.cat([b, b.select(idx)._map(lambda t: t[:, :3] if t.dim() == 2 else t)])
    with pytest.raises(ValueError, match=r"outcome_parts keys differ"):
        TrajectoryBatch.cat([b, _set(b, outcome_parts={})])
    with pytest.raises(ValueError, match=r"needs at least one batch"):
        TrajectoryBatch.cat([])


def test_broadcast_and_gather_steps_by_hand():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert broadcast_to_actions(torch.tensor([2.0, -1.0]), mask).tolist() == [[2, 2, 0], [0, -1, -1]]
    per_step = torch.tensor([[10.0, NAN], [30.0, 40.0]])
    step = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert gather_steps(per_step, step, mask).tolist() == [[10, 0, 0], [0, 30, 40]]


def test_validation_is_cached_until_a_tensor_changes():
    """compute_advantages skips re-validating a batch the trainer already validated, but not one whose tensors
    were replaced or modified in place since."""
    import dataclasses

    from flowrl.core import compute_advantages

    g = torch.Generator().manual_seed(0)
    B, T = 6, 4
    b = TrajectoryBatch(group=torch.tensor([0, 0, 0, 1, 1, 1]), mask=torch.ones(B, T, dtype=torch.bool),
                        step=torch.zeros(B, T, dtype=torch.long), old_logp=torch.randn(B, T, generator=g),
                        outcome=torch.randn(B, generator=g))
    assert not b.is_validated()
    b = b.validate()
    assert b.is_validated()
    b.outcome[2] = float("nan")  # in place: the version counter moves
    assert not b.is_validated()
    with pytest.raises(ValueError, match="non-finite reward"):
        compute_advantages("grpo", b)
    c = dataclasses.replace(b, outcome=torch.zeros(B)).validate()
    c.outcome = torch.full((B,), float("inf"))  # replaced: another object
    with pytest.raises(ValueError, match="non-finite reward"):
        compute_advantages("grpo", c)
