"""The digits demo end to end, and the reward-hacking check of the report.

- ``hacking_flags`` on hand-made before/after evaluation lines (fast), and ``write_report`` on a hand-written
  metrics.jsonl (fast): the flag appears exactly when the reward model and the judge disagree or realism drifts.
- A shortened Flow-GRPO digits run (slow, still in CI): the independent judge's accuracy rises by a measured
  margin, realism stays within 10% of the start, and the report carries no hacking flag. The same, shorter, for
  TurningPoint-GRPO, DanceGRPO, Euphonium and AC-Flow.
- A deliberately hacking run (slow): no KL, a high learning rate and several updates per rollout; the reward
  classifier is fooled while the judge or realism gets worse, and the report says "Reward hacking suspected".

The margins of the slow tests were measured with these exact seeds (see the constants below); each leaves room
for run-to-run float differences but would fail if training stopped working.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl.config import load
from flowrl.train.config import TrainConfig
from flowrl.train.loop import train
from flowrl.train.metrics_log import read_metrics
from flowrl.train.report import HACK_GAP, REALISM_TOL, hacking_flags, write_report

ROOT = Path(__file__).resolve().parents[1]
FLOW_GRPO = ROOT / "configs" / "digits" / "flow_grpo.yaml"
SUSPECTED = "Reward hacking suspected"

# --------------------------------------------------------------------------------------------- hacking_flags
BEFORE = {"step": 0, "accuracy": 0.735, "reward_accuracy": 0.46, "realism": 1.85}


def test_hacking_flags_clean_run_has_none():
    after = {"step": 60, "accuracy": 0.95, "reward_accuracy": 0.97, "realism": 1.60}
    assert hacking_flags(BEFORE, after) == []


def test_hacking_flags_reward_judge_gap():
    # the reward classifier says 100%, the judge 60%: gap 40 points > HACK_GAP
    after = {"step": 20, "accuracy": 0.60, "reward_accuracy": 1.0, "realism": 1.80}
    flags = hacking_flags(BEFORE, after)
    assert len(flags) == 1 and "judge" in flags[0] and "40.0%" in flags[0]
    # a gap just under the threshold is not flagged, just over is
    assert hacking_flags(BEFORE, dict(after, accuracy=1.0 - HACK_GAP + 0.01)) == []
    assert len(hacking_flags(BEFORE, dict(after, accuracy=1.0 - HACK_GAP - 0.01))) == 1
    # the judge ahead of the reward model is no sign of hacking (the base model is like that)
    assert hacking_flags(BEFORE, dict(after, accuracy=0.9, reward_accuracy=0.5)) == []


def test_hacking_flags_realism_drift():
    b = BEFORE["realism"]
    worse = {"step": 20, "accuracy": 0.9, "reward_accuracy": 0.9, "realism": b * (1 + REALISM_TOL + 0.02)}
    flags = hacking_flags(BEFORE, worse)
    assert len(flags) == 1 and "realism" in flags[0]
    assert hacking_flags(BEFORE, dict(worse, realism=b * (1 + REALISM_TOL - 0.02))) == []
    # both at once: two reasons
    both = dict(worse, accuracy=0.3, reward_accuracy=1.0)
    assert len(hacking_flags(BEFORE, both)) == 2


def test_hacking_flags_without_judge_or_realism_says_nothing():
    # a task without a judge (no accuracy) or without realism cannot be checked: no flag, no error
    assert hacking_flags({"reward": 0.1}, {"reward": 0.99, "reward_accuracy": 1.0}) == []
    assert hacking_flags({"accuracy": 0.5}, {"accuracy": 0.5, "reward_accuracy": 0.6, "realism": 9.0}) == []


def _write_metrics(out: Path, evals: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [dict(e, split="eval") for e in evals] + [{"step": evals[-1]["step"], "split": "train", "reward": 0.9,
                                                        "time/elapsed_s": 12.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_report_flags_a_hacked_run_and_not_a_clean_one(tmp_path):
    _write_metrics(tmp_path / "hacked", [BEFORE, {"step": 20, "accuracy": 0.40, "reward_accuracy": 1.0, "realism": 3.1}])
    _write_metrics(tmp_path / "clean", [BEFORE, {"step": 20, "accuracy": 0.95, "reward_accuracy": 0.96, "realism": 1.7}])
    hacked = write_report(tmp_path / "hacked").read_text()
    clean = write_report(tmp_path / "clean").read_text()
    assert SUSPECTED in hacked and "realism worsened" in hacked and "judge" in hacked
    assert SUSPECTED not in clean and "No sign of reward hacking" in clean


# --------------------------------------------------------------------------------------------- runs (slow)
def _run(tmp_path: Path, name: str, *overrides: str, config: Path = FLOW_GRPO) -> tuple[dict, dict, str]:
    cfg = load(TrainConfig, config, ["progress=false", "trackers=[]", "threads=1", "save_every=1000",
                                        "eval.grid_per_prompt=4", *overrides])
    out = tmp_path / name
    train(cfg, out)
    evals = read_metrics(out, split="eval")
    return evals[0], evals[-1], (out / "report.md").read_text()


# Shortened Flow-GRPO demo: the config (lr 2e-4, KL 0.01) with 10 prompts x 8 samples per iteration, 24 iterations,
# evaluation of 10 samples per digit. Measured (seed 0, about 30 s of training): judge accuracy 0.71 -> 0.83 (+12
# points), reward (mean prob.) 0.50 -> 0.79, realism 1.82 -> 1.70, no flag.
SHORT = ["iterations=24", "group_size=8", "eval.every=8", "eval.num_per_prompt=10"]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    """The shortened demo, run once for the tests that read it."""
    return _run(tmp_path_factory.mktemp("demo"), "demo", *SHORT)


@pytest.mark.slow
def test_short_flow_grpo_run_improves_the_judges_accuracy(short_demo):
    before, after, report = short_demo
    assert after["accuracy"] - before["accuracy"] >= 0.08, (before, after)
    assert after["reward"] - before["reward"] >= 0.15, (before, after)
    assert after["realism"] <= 1.10 * before["realism"], (before, after)
    assert SUSPECTED not in report and "No sign of reward hacking" in report


# The diversity recipe (configs/digits/flow_grpo_diverse.yaml: the conservative CNN + Gaussian reward ensemble,
# classifier-free guidance at scale 3, the pairwise bonus, the noise-level KL) on the same short run. Guidance starts
# it at the guided base (judge 0.94, diversity 1.94 SDE / 1.76 ODE), so the short run shows what it keeps, not a
# gain. Measured (seed 0): judge accuracy 0.94 -> 0.93, ODE 0.94 -> 0.97; per-digit diversity after 2.00 (SDE) and
# 1.75 (ODE) against the plain short demo's 0.83 accuracy and 1.74 / 1.45 diversity. Margins about half the gaps.
# The guided start is nearer real digits (realism 1.74) than the end (2.01), which report.md flags (docs/results.md).
@pytest.mark.slow
def test_short_diverse_run_keeps_accuracy_and_more_diversity_than_the_demo(tmp_path, short_demo):
    _, plain, _ = short_demo
    before, after, report = _run(tmp_path, "diverse", *SHORT, config=ROOT / "configs" / "digits" / "flow_grpo_diverse.yaml")
    assert after["accuracy"] >= plain["accuracy"] + 0.05, (after, plain)
    assert after["ode/accuracy"] >= before["ode/accuracy"] - 0.02, (before, after)
    assert after["diversity"] >= plain["diversity"] + 0.13, (after, plain)
    assert after["ode/diversity"] >= plain["ode/diversity"] + 0.15, (after, plain)


# Shortened AC-Flow (likelihood-free: per-step critic-weighted flow matching, positive-part weights, 4 updates per
# rollout): 10 iterations (5 of them the critic's warm-up), evaluation of 10 samples per digit. Measured (seed 0, 315 s
# on a heavily shared CPU): judge accuracy 0.71 -> 0.85, reward (mean prob.) 0.50 -> 0.67, realism 1.82 -> 1.80, no
# flag. The full config passes the demo bar (docs/results.md).
AC_SHORT = ["iterations=10", "eval.every=10", "eval.num_per_prompt=10"]


@pytest.mark.slow
def test_short_ac_flow_run_raises_the_reward_and_the_judges_accuracy(tmp_path):
    before, after, report = _run(tmp_path, "ac_flow", *AC_SHORT, config=ROOT / "configs" / "digits" / "ac_flow.yaml")
    assert after["reward"] - before["reward"] >= 0.08, (before, after)
    assert after["accuracy"] - before["accuracy"] >= 0.06, (before, after)
    assert after["realism"] <= 1.10 * before["realism"], (before, after)
    assert SUSPECTED not in report


# The other PPO-style algorithms, shortened to 12 iterations with evaluation of 10 samples per digit. Measured (seed
# 0, this CPU): tp_grpo judge 0.71 -> 0.88, reward 0.50 -> 0.82 (about 60 s); dance_grpo 0.73 -> 0.88, 0.57 -> 0.79
# (about 15 s); euphonium (evaluated unguided) 0.73 -> 0.77, 0.57 -> 0.73 (about 40 s). Margins about half of that.
SHORT_OTHERS = {"tp_grpo": (0.15, 0.08), "dance_grpo": (0.11, 0.07), "euphonium": (0.08, 0.0)}


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(SHORT_OTHERS))
def test_short_runs_of_the_other_algorithms_raise_the_reward(tmp_path, algo):
    d_reward, d_acc = SHORT_OTHERS[algo]
    before, after, report = _run(tmp_path, algo, "iterations=12", "eval.every=12", "eval.num_per_prompt=10",
                                 config=ROOT / "configs" / "digits" / f"{algo}.yaml")
    assert after["reward"] - before["reward"] >= d_reward, (before, after)
    assert after["accuracy"] - before["accuracy"] >= d_acc, (before, after)
    assert after["realism"] <= 1.10 * before["realism"], (before, after)
    assert SUSPECTED not in report


# Deliberate hacking: no KL and lr 5e-4 (2.5x the demo's), otherwise the same short run, 60 iterations.
# Measured (seed 0, about 50 s of training): the reward classifier's accuracy 0.52 -> 0.82 while the judge's falls
# 0.71 -> 0.62 and realism goes 1.82 -> 2.83 (+55%): stripes and blobs. (Higher rates, 1e-3 or 3e-3, collapse the
# model outright, reward included, which is not hacking.)
HACK = ["iterations=60", "group_size=8", "eval.every=30", "eval.num_per_prompt=10", "loss.kl_beta=0.0", "optim.lr=5e-4"]


@pytest.mark.slow
def test_hacking_run_is_flagged(tmp_path):
    before, after, report = _run(tmp_path, "hack", *HACK)
    # the reward model is pleased ...
    assert after["reward_accuracy"] - before["reward_accuracy"] >= 0.2, (before, after)
    # ... the judge is not, and the samples left the data
    assert after["accuracy"] < after["reward_accuracy"] and after["accuracy"] < before["accuracy"] + 0.05, after
    assert after["realism"] > 1.25 * before["realism"], (before, after)
    assert SUSPECTED in report and "realism worsened" in report


# --------------------------------------------------------------------------------------------- Euphonium credit
def test_euphonium_step_reward_scores_the_state_each_action_leads_to():
    """step_reward[:, t] = PRM(x_{k+1}, sigma_{k+1}) for the t-th SDE step k: the state the action produced, not the
    one it started from (that credited action k with earlier actions' effects; see configs/digits/euphonium.yaml)."""
    import torch
    from accelerate import Accelerator

    from flowrl.flow.pipeline import cond_select
    from flowrl.rewards import build_process_reward
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    cfg = load(TrainConfig, ROOT / "configs" / "digits" / "euphonium.yaml",
               ["prompts_per_iter=2", "group_size=3", "progress=false", "trackers=[]"])
    task = FlowTask(cfg, Accelerator(cpu=True))
    roll = task.rollout(0, iteration_generator(0, 0, 0))
    traj, steps, sr = roll.side["traj"], roll.side["steps"], roll.batch.step_reward
    assert sr.shape == (6, len(steps)) and steps.tolist() == [0, 1, 2, 3, 4]
    prm = build_process_reward("digits_noisy")
    for t, k in enumerate(steps.tolist()):  # slow reference: one PRM call per step and sample
        for b in range(6):
            x = traj.latents[b:b + 1, k + 1]
            want = prm(x, traj.sigmas[k + 1].view(1), cond_select(traj.cond, torch.tensor([b])))
            torch.testing.assert_close(sr[b, t], want[0], rtol=1e-5, atol=1e-6)
    # the guided steps' drift was taken at x_k: the recorded PRM there differs from the step reward
    guided = traj.guided_mask.nonzero().flatten().tolist()
    assert guided and not torch.allclose(traj.process_rewards[:, guided], sr[:, guided])
