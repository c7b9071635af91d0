"""Shared pieces of the credit-assignment tests (tests/test_credit*.py): random batches with every step-level
field set, and loop helpers written from the papers' formulas (plain Python, float64)."""
from __future__ import annotations

import math

import torch

from flowrl.core import TrajectoryBatch
from reference import group_advantages, group_outcomes

NAN = float("nan")


# ----------------------------------------------------------------------------- random batches
def make_batch(gen, *, sizes=(1, 1, 2, 3, 4, 5, 7), T=12, S=4, invalid=True, empty_row=True, nan_frac=0.2,
               node_range=4, outcome_kind=None):
    group, outcome = [], []
    for k, n in enumerate(sizes):
        gid = 1_000_003 * (k + 3) + 11
        kind = outcome_kind or ("equal", "binary", "normal")[k % 3]
        group += [gid] * n
        outcome += group_outcomes(gen, kind, n)
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
    """Per-sample GRPO / RLOO advantages of batch ``b`` (the loop reference of tests/reference.py)."""
    return group_advantages(b.outcome.tolist(), b.group.tolist(), valid_of(b), baseline=baseline, scale=scale, eps=eps)


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
