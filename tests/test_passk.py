"""pass@k: Codex's unbiased estimator against math.comb, the pass@k advantage (Chen et al., 2025) against brute-force
enumeration of every k-subset of a group, the sampled LLM evaluation's helpers, and the report's pass@k check."""
from __future__ import annotations

import itertools
import math
import os
import statistics
from pathlib import Path

import pytest
import torch

from flowrl.core import TrajectoryBatch, compute_advantages
from flowrl.core.estimators.passk import pass_at_k_group_advantages
from flowrl.core.passk import binom_ratio, pass_at_k
from flowrl.train.llm_eval import distinct_correct, normalise_text, pass_k_metrics, pass_subset
from flowrl.train.report import PASS_K_DROP, REPORT_CHECKS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- the estimator
def test_pass_at_k_equals_the_binomial_formula():
    g = torch.Generator().manual_seed(0)
    n = torch.randint(8, 60, (200,), generator=g)
    c = (torch.rand(200, generator=g) * (n + 1)).floor().long().clamp_max(n)
    for k in (1, 2, 5, 8):
        want = [1 - math.comb(int(a) - int(b), k) / math.comb(int(a), k) for a, b in zip(n, c)]
        torch.testing.assert_close(pass_at_k(n, c, k), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_pass_at_k_by_hand_and_large_n_is_stable():
    # 5 samples, 2 correct, k = 3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert float(pass_at_k(torch.tensor([5]), torch.tensor([2]), 3)) == pytest.approx(0.9, abs=1e-15)
    assert pass_at_k(torch.tensor([4, 4, 4]), torch.tensor([0, 4, 1]), 1).tolist() == pytest.approx([0.0, 1.0, 0.25])
    # n - c < k: every k-subset holds a correct sample
    assert float(pass_at_k(torch.tensor([10]), torch.tensor([3]), 8)) == 1.0
    # C(2000, 100) overflows a float; the product form does not: 1 - C(1990,100)/C(2000,100)
    want = 1 - math.exp(sum(math.log1p(-100 / j) for j in range(1991, 2001)))
    assert float(pass_at_k(torch.tensor([2000]), torch.tensor([10]), 100)) == pytest.approx(want, rel=1e-12)


def test_pass_at_k_refuses_bad_input():
    with pytest.raises(ValueError, match="k=9 exceeds the number of samples"):
        pass_at_k(torch.tensor([8]), torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(torch.tensor([8]), torch.tensor([9]), 2)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(torch.tensor([8]), torch.tensor([1]), 0)
    assert binom_ratio(torch.tensor([3, 2, 5]), torch.tensor([6, 6, 5]), 3).tolist() == pytest.approx([1 / 20, 0.0, 1.0])


# ----------------------------------------------------------------------------- the pass@k advantage
def brute_force(correct: list[bool], k: int) -> list[float]:
    """Every k-subset of the group: reward max(correct), advantage (reward - mean) / std (ddof 0); a sample's
    advantage is the mean over the subsets holding it (0 when the std is 0). k > N uses k = N."""
    k = min(k, len(correct))
    subsets = list(itertools.combinations(range(len(correct)), k))
    rew = [float(any(correct[i] for i in s)) for s in subsets]
    mean, sd = statistics.fmean(rew), statistics.pstdev(rew)
    if sd == 0:
        return [0.0] * len(correct)
    return [statistics.fmean((r - mean) / sd for s, r in zip(subsets, rew) if i in s) for i in range(len(correct))]


def test_a_hand_worked_group():
    # N = 4, c = 1, k = 2: R = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2; A_pos = (1/2)/(1/2) = 1,
    # A_neg = (1 - 1/2 - C(2,1)/C(3,1)) / (1/2) = (1/2 - 2/3) * 2 = -1/3
    a = pass_at_k_group_advantages(torch.tensor([False, True, False, False]), torch.zeros(4, dtype=torch.long), 2)
    assert a.tolist() == pytest.approx([-1 / 3, 1.0, -1 / 3, -1 / 3], abs=1e-6)


def test_matches_enumeration_of_every_k_subset():
    """Random groups of sizes 1..8 (singletons, all-correct, none-correct among them), shuffled and with invalid
    samples (ragged groups), for k = 1..5, against :func:`brute_force` on each group's valid samples."""
    g = torch.Generator().manual_seed(3)
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 8, 6, 5]
    group = torch.cat([torch.full((n,), 100 + 7 * i) for i, n in enumerate(sizes)])
    correct = torch.rand(len(group), generator=g) < 0.4
    correct[group == 100 + 7 * 8] = True  # an all-correct group
    correct[group == 100 + 7 * 9] = False  # a none-correct group
    valid = torch.rand(len(group), generator=g) > 0.2
    perm = torch.randperm(len(group), generator=g)
    group, correct, valid = group[perm], correct[perm], valid[perm]
    for k in range(1, 6):
        got = pass_at_k_group_advantages(correct, group, k, valid)
        want = torch.zeros(len(group), dtype=torch.float64)
        for gid in group.unique():
            rows = ((group == gid) & valid).nonzero().flatten()
            if len(rows):
                want[rows] = torch.tensor(brute_force(correct[rows].tolist(), k), dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=lambda m: f"k={k}: {m}")
        assert bool((got[~valid] == 0).all())


def test_degenerate_groups_are_exactly_zero():
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
    correct = torch.tensor([True, True, True, False, False, False, True, True, False, False])
    a = pass_at_k_group_advantages(correct, group, 3)
    # all correct, none correct, a singleton; k = 3 = N in the last group: one subset, nothing to compare
    assert a.tolist() == [0.0] * 10
    a = pass_at_k_group_advantages(correct, group, 2)  # the last group now compares: C(2,2)/C(3,2) = 1/3
    r = 2 / 3
    s = math.sqrt(r * (1 - r))
    assert a[7:].tolist() == pytest.approx([(1 - r) / s, (1 - r - 1 / 2) / s, (1 - r - 1 / 2) / s], abs=1e-6)


def _batch(outcome, group, T=3):
    B = len(outcome)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    return TrajectoryBatch(group=torch.tensor(group), mask=mask, step=torch.zeros(B, T, dtype=torch.long),
                           old_logp=torch.zeros(B, T), outcome=torch.tensor(outcome))


def test_registered_estimator_k1_is_grpo_with_the_population_std_and_mixes_with_grpo():
    b = _batch([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], [5, 5, 5, 5, 9, 9, 9, 9])
    a1 = compute_advantages("pass_at_k", b, k=1)[:, 1]
    r = b.outcome.view(2, 4)
    pop = (r - r.mean(1, keepdim=True)) / r.std(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(a1, pop.flatten(), atol=1e-5, rtol=1e-5)
    assert float(compute_advantages("pass_at_k", b, k=1)[0, 2]) == 0.0  # off the mask
    a3 = compute_advantages("pass_at_k", b, k=3)
    grpo = compute_advantages("grpo", b)
    mix = compute_advantages("pass_at_k", b, k=3, pass1_weight=0.25)
    torch.testing.assert_close(mix, 0.75 * a3 + 0.25 * grpo, atol=1e-6, rtol=1e-6)
    # outcome threshold: 0.6 counts as correct at threshold 0.5, not at 0.7
    b2 = _batch([0.6, 0.0, 0.0, 0.0], [1, 1, 1, 1])
    assert float(compute_advantages("pass_at_k", b2, k=2)[0, 0]) > 0
    assert float(compute_advantages("pass_at_k", b2, k=2, threshold=0.7).abs().max()) == 0.0


def test_bad_parameters_are_named():
    b = _batch([1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match="advantage.params.k=0"):
        compute_advantages("pass_at_k", b, k=0)
    with pytest.raises(ValueError, match="pass1_weight=1.5"):
        compute_advantages("pass_at_k", b, k=2, pass1_weight=1.5)


# ----------------------------------------------------------------------------- the sampled evaluation's helpers
def test_distinct_correct_counts_normalised_texts_of_correct_completions():
    texts = ["1+2=3", " 1+2=3 ", "1+2 = 3", "1+2=4", "x", "x", "y"]
    correct = [True, True, True, False, True, True, False]
    problem = [0, 0, 0, 0, 1, 1, 2]
    assert distinct_correct(texts, correct, problem, 3) == [2, 1, 0]
    assert normalise_text("  a \n\t b  ") == "a b"


def test_pass_subset_is_fixed_sorted_and_clipped():
    a = pass_subset(200, 50, 1234)
    assert a == pass_subset(200, 50, 1234) and a == sorted(a) and len(set(a)) == 50 and max(a) < 200
    assert a != pass_subset(200, 50, 1)
    assert pass_subset(8, 50, 0) == list(range(8))


def test_config_refuses_k_above_the_samples():
    from flowrl.config import ConfigError
    from flowrl.train.config import EvalConfig

    with pytest.raises((ConfigError, ValueError), match=r"pass_k=\[1, 32\]"):
        EvalConfig(pass_k=[1, 32], pass_samples=16)
    EvalConfig(pass_k=[1, 32], pass_samples=16, pass_problems=0)  # disabled: not checked


# ----------------------------------------------------------------------------- the report check
def test_report_flags_a_pass_at_k_drop_beyond_the_tolerance():
    check = REPORT_CHECKS["pass_at_k"]
    base = {"pass@1": 0.27, "pass@8": 0.73, "distinct_correct": 1.36, "pass_k_max": 8.0}
    kept = dict(base, **{"pass@1": 0.6, "pass@8": 0.73 - PASS_K_DROP + 0.01})
    fell = dict(base, **{"pass@1": 0.6, "pass@8": 0.73 - PASS_K_DROP - 0.01})
    assert check(base, kept).status == "ok"
    f = check(base, fell)
    assert f.status == "flag" and "pass@8 73.0% -> 67.0%" in f.text and "pass@1 27.0% -> 60.0%" in f.text


# ----------------------------------------------------------------------------- the LLM task's evaluation
def test_llm_evaluation_logs_sampled_pass_at_k_without_moving_the_training_rng(tmp_path):
    from accelerate import Accelerator

    from flowrl.config import load
    from flowrl.train.config import TrainConfig
    from flowrl.train.llm_task import LLMTask

    root = Path(__file__).resolve().parents[1]
    cfg = load(TrainConfig, root / "configs/arith/grpo.yaml",
               ["llm.eval_size=8", "llm.dataset_size=16", "progress=false", "trackers=[]", "eval.pass_problems=4",
                "eval.pass_samples=4", "eval.pass_k=[1, 4]", "eval.table_rows=0"])
    task = LLMTask(cfg, Accelerator(cpu=True))
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    m = task.evaluate(0, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training run's random stream did not move
    assert {"accuracy", "pass@1", "pass@4", "distinct_correct", "pass_k_max"} <= set(m) and m["pass_k_max"] == 4.0
    assert 0.0 < m["pass@1"] <= m["pass@4"] <= 1.0 and 0.0 < m["distinct_correct"] <= 4.0
    again = pass_k_metrics(task)
    assert again == {k: m[k] for k in again}  # the same subset and draws at every evaluation
    plan = task.report_plan()
    assert {"pass@1", "pass@4", "distinct_correct"} <= set(plan.metrics)
    assert {"pass_at_k", "distinct_correct"} <= set(plan.checks)
