"""Reports that fit the task: each task declares what its report shows and checks (a ReportPlan of registered
checks), the report flags only what was measured, and ``curves.png`` plots the declared metrics (diversity for
digits). Hand-written metrics.jsonl files, so these run in well under a second."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl.train.metrics_log import curve_panels, plot_curves
from flowrl.train.report import (
    MIRACLE_GAP, REPORT_CHECKS, ReportPlan, load_plan, run_checks, save_plan, write_report,
)

DIGITS_PLAN = ReportPlan(metrics=("reward", "accuracy", "reward_accuracy", "reward_prob", "realism", "diversity"),
                         checks=("judge_agreement", "realism", "diversity", "digits_demo_bar"), source="digits")
LLM_PLAN = ReportPlan(metrics=("reward", "accuracy", "miracle_rate", "all_steps_correct", "step_accuracy"),
                      checks=("accuracy", "miracle_steps", "all_steps_correct"), source="the LLM task")

DIGITS = [{"step": 0, "reward": 0.52, "accuracy": 0.735, "reward_accuracy": 0.46, "reward_prob": 0.52, "realism": 1.85,
           "diversity": 2.31},
          {"step": 60, "reward": 0.93, "accuracy": 0.95, "reward_accuracy": 0.97, "reward_prob": 0.93, "realism": 1.66,
           "diversity": 1.36}]
# the README's arithmetic GRPO figures: accuracy 0.335 -> 0.675, miracle rate 0.055 -> 0.125
ARITH = [{"step": 0, "reward": 0.335, "accuracy": 0.335, "miracle_rate": 0.055, "all_steps_correct": 0.28,
          "step_accuracy": 0.70},
         {"step": 30, "reward": 0.675, "accuracy": 0.675, "miracle_rate": 0.125, "all_steps_correct": 0.55,
          "step_accuracy": 0.85}]


def _run_dir(out: Path, evals: list[dict], plan: ReportPlan | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(e, split="eval") for e in evals]
    rows += [{"step": e["step"], "split": "train", "reward": e["reward"] - 0.05, "time/elapsed_s": 9.0} for e in evals[1:]]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if plan is not None:
        save_plan(out, plan)
    return out


def test_llm_report_has_no_judge_or_realism_sentence(tmp_path):
    text = write_report(_run_dir(tmp_path / "arith", ARITH, LLM_PLAN)).read_text()
    low = text.lower()
    assert "judge" not in low and "realism" not in low and "diversity" not in low
    assert "held-out accuracy 33.5% -> 67.5% (+34.0 points)" in text
    # 0.055/0.335 = 16.4% of right answers came after a wrong step, 0.125/0.675 = 18.5%: +2.1 points, no flag
    assert "16.4% -> 18.5%" in text
    assert "completions with every step right 28.0% -> 55.0%" in text
    assert "Reward hacking suspected" not in text and "No sign of reward hacking in what was measured" in text
    assert "| miracle_rate | 0.0550 | 0.1250 | +0.0700 |" in text


def test_digits_report_has_judge_realism_and_diversity(tmp_path):
    text = write_report(_run_dir(tmp_path / "digits", DIGITS, DIGITS_PLAN)).read_text()
    assert "the independent judge agrees with the reward model: judge 95.0%, reward classifier 97.0%" in text
    assert "distance to the nearest real sample 1.850 -> 1.660 (-10.3%" in text
    # the README's Flow-GRPO figures: the pixel diversity fell to 0.59x, a collapse (below 0.7x), not hacking
    assert "diversity collapsed to 59% of the start (mean distance between samples of one prompt: diversity " \
           "2.310 -> 1.360; flagged below 70%)" in text
    assert "**Diversity collapsed:**" in text
    assert "the demo's bar" in text and "**met**" in text
    assert "No sign of reward hacking" in text and "Reward hacking suspected" not in text
    assert "miracle" not in text.lower()


def test_the_plan_is_read_back_from_the_run_directory(tmp_path):
    out = _run_dir(tmp_path / "arith", ARITH, LLM_PLAN)
    assert load_plan(out) == LLM_PLAN
    assert "judge" not in write_report(out).read_text().lower()  # no plan argument: the saved one applies


def test_miracle_share_growth_is_flagged(tmp_path):
    hacked = [ARITH[0], dict(ARITH[1], miracle_rate=0.675 * (0.055 / 0.335 + MIRACLE_GAP + 0.02))]
    text = write_report(_run_dir(tmp_path / "m", hacked, LLM_PLAN)).read_text()
    assert "Reward hacking suspected" in text and "right answers increasingly come after wrong steps" in text
    just_under = [ARITH[0], dict(ARITH[1], miracle_rate=0.675 * (0.055 / 0.335 + MIRACLE_GAP - 0.02))]
    assert "Reward hacking suspected" not in write_report(_run_dir(tmp_path / "u", just_under, LLM_PLAN)).read_text()


def test_reward_up_accuracy_down_is_flagged():
    after = dict(ARITH[1], reward=0.9, accuracy=0.20)
    (name, f), = run_checks(ReportPlan(checks=("accuracy",)), ARITH[0], after)
    assert name == "accuracy" and f.status == "flag" and "accuracy fell" in f.text


def test_a_declared_check_whose_metric_was_not_logged_is_not_measured_not_passed(tmp_path):
    # countdown's verifier scores no steps: miracle / all-steps are declared but not logged
    evals = [{k: v for k, v in e.items() if k in ("step", "reward", "accuracy")} for e in ARITH]
    text = write_report(_run_dir(tmp_path / "c", evals, LLM_PLAN)).read_text()
    assert "**miracle steps**: not measured (the evaluation logged no miracle_rate)" in text
    assert "**all steps correct**: not measured (the evaluation logged no all_steps_correct)" in text
    assert "No sign of reward hacking in what was measured (accuracy vs reward)" in text


def test_diversity_collapse_and_unknown_check():
    after = dict(DIGITS[1], diversity=0.2 * DIGITS[0]["diversity"])
    (_, f), = run_checks(ReportPlan(checks=("diversity",)), DIGITS[0], after)
    assert f.status == "flag" and "collapsed to 20%" in f.text
    with pytest.raises(ValueError, match="unknown check.*'judge'.*registered"):
        ReportPlan(checks=("judge",))
    assert {"judge_agreement", "realism", "diversity", "accuracy", "miracle_steps", "all_steps_correct"} <= set(REPORT_CHECKS)


def test_a_reward_only_plan_says_hacking_was_not_checked(tmp_path):
    plan = ReportPlan(metrics=("reward",), checks=("reward_change",), source="the flow task")
    text = write_report(_run_dir(tmp_path / "r", [{"step": 0, "reward": 0.2}, {"step": 2, "reward": 0.4}], plan)).read_text()
    assert "reward 0.2000 -> 0.4000 (+0.2000)" in text
    assert "Reward hacking was not checked" in text and "No sign of reward hacking" not in text


def test_curves_plot_the_declared_metrics_with_diversity(tmp_path):
    from flowrl.train.loop import _curve_keys

    out = _run_dir(tmp_path / "digits", DIGITS, DIGITS_PLAN)
    keys = _curve_keys(out, DIGITS_PLAN)
    assert keys == ["reward", "accuracy", "reward_accuracy", "reward_prob", "realism", "diversity"]
    png = plot_curves(out, keys=keys)
    assert curve_panels(png) == keys
    # without a plan the digits metrics still get their diversity panel
    assert "diversity" in _curve_keys(out)
    llm = _run_dir(tmp_path / "arith", ARITH, LLM_PLAN)
    assert _curve_keys(llm, LLM_PLAN) == ["reward", "accuracy", "miracle_rate", "all_steps_correct", "step_accuracy"]


def test_an_llm_report_shows_sampled_pass_at_k_and_distinct_correct(tmp_path):
    from flowrl.train.loop import _curve_keys

    plan = ReportPlan(metrics=LLM_PLAN.metrics + ("pass@1", "pass@8", "distinct_correct"), checks=LLM_PLAN.checks,
                      source="the LLM task")
    evals = [dict(ARITH[0], **{"pass@1": 0.30, "pass@8": 0.80, "distinct_correct": 2.5}),
             dict(ARITH[1], **{"pass@1": 0.60, "pass@8": 0.78, "distinct_correct": 1.25})]
    out = _run_dir(tmp_path / "passk", evals, plan)
    text = write_report(out).read_text()
    for row in ("| pass@1 | 0.3000 | 0.6000 | +0.3000 |", "| pass@8 | 0.8000 | 0.7800 | -0.0200 |",
                "| distinct_correct | 2.5000 | 1.2500 | -1.2500 |"):
        assert row in text
    assert {"pass@1", "pass@8", "distinct_correct"} <= set(_curve_keys(out, plan))


def test_a_pass_at_k_drop_is_reported_as_a_collapse_not_as_hacking(tmp_path):
    plan = ReportPlan(metrics=LLM_PLAN.metrics + ("pass@8",), checks=LLM_PLAN.checks + ("pass_at_k",), source="llm")
    evals = [dict(ARITH[0], **{"pass@8": 0.80, "pass_k_max": 8}), dict(ARITH[1], **{"pass@8": 0.60, "pass_k_max": 8})]
    text = write_report(_run_dir(tmp_path / "pk", evals, plan)).read_text()
    assert "**Diversity collapsed:**" in text and "pass@8 fell below the base model's" in text
    assert "Reward hacking suspected" not in text and "No sign of reward hacking in what was measured" in text


def test_fewer_distinct_correct_completions_are_flagged_as_a_collapse(tmp_path):
    """An LLM whose held-out problems are solved by fewer different completions than the base's (below
    DIVERSITY_FLOOR of the start) is flagged as a collapse; the arithmetic GRPO's measured 60-iteration drop
    (1.36 -> 1.21, docs/results.md) is not."""
    from flowrl.train.report import DIVERSITY_FLOOR

    plan = ReportPlan(metrics=LLM_PLAN.metrics + ("distinct_correct",), checks=LLM_PLAN.checks + ("distinct_correct",),
                      source="llm")
    collapsed = [dict(ARITH[0], distinct_correct=2.5), dict(ARITH[1], distinct_correct=2.5 * DIVERSITY_FLOOR - 0.01)]
    text = write_report(_run_dir(tmp_path / "dc", collapsed, plan)).read_text()
    assert "**Diversity collapsed:**" in text and "distinct_correct collapsed to 70% of the start" in text
    assert "Reward hacking suspected" not in text
    mild = [dict(ARITH[0], distinct_correct=1.36), dict(ARITH[1], distinct_correct=1.21)]
    text = write_report(_run_dir(tmp_path / "mild", mild, plan)).read_text()
    assert "Diversity collapsed" not in text and "distinct_correct 1.360 -> 1.210 (89% of the start" in text
