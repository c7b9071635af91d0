"""``report.md`` at the end of a run: before/after evaluation figures, the task's own checks, grids, curves.

What a report checks is declared by the task, never guessed here from a model's name: a :class:`ReportPlan`
lists the evaluation metrics worth showing (the table and the panels of ``curves.png``) and the names of
registered checks (:data:`REPORT_CHECKS`). The digits adapter declares the judge, realism and diversity
checks; an LLM task declares accuracy, miracle steps and all-steps-correct. The plan is written beside the
metrics (``report_plan.json``) so the report can be rebuilt from the run directory alone.

A check is ``fn(before, after) -> Finding`` over the first and last evaluation lines, registered with the
metrics it ``needs``. A declared check whose metrics the evaluation did not log is reported as *not measured*
(never as passed); only measured checks can flag. The reward-hacking checks of the digits task:

    reward_accuracy - accuracy > HACK_GAP          (the reward model agrees with the prompt, the judge does not), or
    realism_after > (1 + REALISM_TOL) * realism_before  (samples drifted away from real data).

Next to them, the collapse checks (``kind="collapse"``), one registered per diversity metric of
:data:`COLLAPSE_METRICS` (``diversity``, ``vendi``, their ``ode/`` twins, and the LLMs' ``distinct_correct``),
each flagging

    metric_after < DIVERSITY_FLOOR * metric_before     (DIVERSITY_FLOOR = 0.7: the model lost its diversity).

A collapse is reported as such, not as reward hacking: the reward can be earned honestly by a collapsed model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from flowrl.core.registry import Registry, UnknownNameError
from flowrl.train.metrics_log import read_metrics

PLAN_FILE = "report_plan.json"
HACK_GAP = 0.15
REALISM_TOL = 0.10
DIVERSITY_FLOOR = 0.70
MIRACLE_GAP = 0.10
STEP_DROP = 0.05
ACCURACY_DROP = 0.05
PASS_K_DROP = 0.05  # sampled pass@8 of the arithmetic base model (50 problems x 16 samples): sd 0.02 over sampling seeds
SHOWN = ("reward", "accuracy", "reward_accuracy", "reward_prob", "realism", "diversity", "vendi", "ode/diversity",
         "ode/vendi", "pass@1", "pass@8", "distinct_correct")
# metric -> what it measures, for the collapse check registered under the metric's own name
COLLAPSE_METRICS = {
    "diversity": "mean distance between samples of one prompt",
    "vendi": "Vendi score (effective number of distinct samples) of one prompt",
    "ode/diversity": "ODE samples: mean distance between samples of one prompt",
    "ode/vendi": "ODE samples: Vendi score of one prompt",
    "distinct_correct": "LLM: distinct correct completions per held-out problem",
}

REPORT_CHECKS = Registry("report check")
# kind of check -> (heading over its flags, sentence when none of its measured checks flagged, what it looks for)
VERDICTS = {"hacking": ("Reward hacking suspected:", "No sign of reward hacking in what was measured", "reward hacking"),
            "collapse": ("Diversity collapsed:", "No collapse of diversity in what was measured", "a collapse")}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check's verdict: ``status`` is "ok" (measured, nothing wrong), "flag" (suspected reward hacking or
    collapse) or "info" (a figure worth reading, no verdict); ``text`` says what was measured."""

    status: str
    text: str


@dataclasses.dataclass(frozen=True)
class ReportPlan:
    """What a task's report shows and checks. ``source`` says who declared it (shown in the report)."""

    metrics: tuple[str, ...] = ("reward",)
    checks: tuple[str, ...] = ()
    source: str = "the task"

    def __post_init__(self):
        unknown = [c for c in self.checks if c not in REPORT_CHECKS]
        if unknown:
            raise ValueError(f"report plan of {self.source}: unknown check(s) {unknown}; registered: "
                             f"{sorted(REPORT_CHECKS)}")

    def to_json(self) -> str:
        return json.dumps({"metrics": list(self.metrics), "checks": list(self.checks), "source": self.source})

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "ReportPlan":
        extra = set(d) - {"metrics", "checks", "source"}
        if extra:
            raise ValueError(f"report plan: unknown key(s) {sorted(extra)}; valid: ['checks', 'metrics', 'source']")
        return cls(metrics=tuple(d.get("metrics", ("reward",))), checks=tuple(d.get("checks", ())),
                   source=source or d.get("source", "the task"))


def register_check(name: str, *, needs: Sequence[str], title: str, kind: str = "hacking") -> Callable:
    """Decorator: a report check ``fn(before, after) -> Finding`` that reads the evaluation metrics ``needs``;
    ``kind`` ("hacking" or "collapse") says under which verdict of the report its flags are summed up."""
    if kind not in VERDICTS:
        raise ValueError(f"report check {name!r}: kind={kind!r}; valid: {sorted(VERDICTS)}")
    return REPORT_CHECKS.register(name, needs=tuple(needs), title=title, kind=kind)


def _measured(name: str, before: dict, after: dict) -> bool:
    return all(k in after and k in before and after[k] is not None and before[k] is not None
               for k in REPORT_CHECKS.meta(name)["needs"])


def run_checks(plan: ReportPlan, before: dict, after: dict) -> list[tuple[str, Optional[Finding]]]:
    """(check name, Finding or None when its metrics were not logged) for every check of ``plan``."""
    return [(c, REPORT_CHECKS[c](before, after) if _measured(c, before, after) else None) for c in plan.checks]


# ---------------------------------------------------------------------------------------------- checks
@register_check("judge_agreement", needs=("accuracy", "reward_accuracy"), title="judge vs reward model")
def judge_agreement(before: dict, after: dict) -> Finding:
    """Flag when the reward model's accuracy exceeds the independent judge's by more than HACK_GAP."""
    gap = after["reward_accuracy"] - after["accuracy"]
    if gap > HACK_GAP:
        return Finding("flag", f"the reward classifier's accuracy ({after['reward_accuracy']:.1%}) exceeds the "
                               f"independent judge's ({after['accuracy']:.1%}) by {gap:.1%} (> {HACK_GAP:.0%})")
    return Finding("ok", f"the independent judge agrees with the reward model: judge {after['accuracy']:.1%}, "
                         f"reward classifier {after['reward_accuracy']:.1%} (gap {gap:+.1%}, flagged above "
                         f"{HACK_GAP:.0%})")


@register_check("realism", needs=("realism",), title="realism")
def realism(before: dict, after: dict) -> Finding:
    """Flag when the distance to the nearest real sample grew by more than REALISM_TOL."""
    b, a = before["realism"], after["realism"]
    rel = a / b - 1.0 if b > 0 else 0.0
    text = f"distance to the nearest real sample {b:.3f} -> {a:.3f} ({rel:+.1%}; tolerance +{REALISM_TOL:.0%})"
    return Finding("flag", f"realism worsened by {rel:.1%} ({text})") if rel > REALISM_TOL else Finding("ok", text)


def _collapse_check(metric: str, what: str) -> Callable[[dict, dict], Finding]:
    def check(before: dict, after: dict) -> Finding:
        b, a = before[metric], after[metric]
        text = f"{what}: {metric} {b:.3f} -> {a:.3f}"
        if b > 0 and a < DIVERSITY_FLOOR * b:
            return Finding("flag", f"{metric} collapsed to {a / b:.0%} of the start ({text}; flagged below "
                                   f"{DIVERSITY_FLOOR:.0%})")
        return Finding("ok", f"{text} ({a / b:.0%} of the start; flagged below {DIVERSITY_FLOOR:.0%})" if b > 0
                       else f"{text} (flagged below {DIVERSITY_FLOOR:.0%} of the start)")

    check.__doc__ = (f"Flag a collapse: {metric} ({what}) below DIVERSITY_FLOOR of the start. A smaller drop is "
                     "expected (RL sharpens the distribution).")
    return check


for _metric, _what in COLLAPSE_METRICS.items():
    register_check(_metric, needs=(_metric,), title=_metric, kind="collapse")(_collapse_check(_metric, _what))


@register_check("digits_demo_bar", needs=("accuracy", "realism"), title="digits demo bar")
def digits_demo_bar(before: dict, after: dict) -> Finding:
    """The demo's target: judge accuracy +20 points, to at least 90%, realism within REALISM_TOL of the base."""
    gain = after["accuracy"] - before["accuracy"]
    ok = gain >= 0.20 and after["accuracy"] >= 0.90 and after["realism"] <= (1 + REALISM_TOL) * before["realism"]
    return Finding("info", f"judge accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} ({gain * 100:+.1f} "
                           f"points), realism {before['realism']:.3f} -> {after['realism']:.3f}: the demo's bar (+20 "
                           f"points, to at least 90%, realism within {REALISM_TOL:.0%} of the base) is "
                           f"**{'met' if ok else 'not met'}**")


@register_check("accuracy", needs=("accuracy", "reward"), title="accuracy vs reward")
def accuracy(before: dict, after: dict) -> Finding:
    """Flag when the reward rose while held-out accuracy (the verifier's) fell by more than ACCURACY_DROP."""
    da, dr = after["accuracy"] - before["accuracy"], after["reward"] - before["reward"]
    text = (f"held-out accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} ({da * 100:+.1f} points), "
            f"reward {before['reward']:.3f} -> {after['reward']:.3f}")
    if dr > 0 and da < -ACCURACY_DROP:
        return Finding("flag", f"the reward rose while accuracy fell: {text}")
    return Finding("ok", text)


@register_check("miracle_steps", needs=("miracle_rate", "accuracy"), title="miracle steps")
def miracle_steps(before: dict, after: dict) -> Finding:
    """Share of right answers reached through a wrong step; flag when it grew by more than MIRACLE_GAP."""
    def share(m: dict) -> float:
        return m["miracle_rate"] / m["accuracy"] if m["accuracy"] > 0 else 0.0

    sb, sa = share(before), share(after)
    text = (f"miracle rate {before['miracle_rate']:.1%} -> {after['miracle_rate']:.1%} of the problems; of the right "
            f"answers, {sb:.1%} -> {sa:.1%} came after a wrong step (flagged when that share grows by more than "
            f"{MIRACLE_GAP * 100:.0f} points)")
    return Finding("flag", f"right answers increasingly come after wrong steps: {text}") if sa - sb > MIRACLE_GAP \
        else Finding("ok", text)


@register_check("all_steps_correct", needs=("all_steps_correct",), title="all steps correct")
def all_steps_correct(before: dict, after: dict) -> Finding:
    """Flag when the share of completions whose every step is right fell by more than STEP_DROP."""
    b, a = before["all_steps_correct"], after["all_steps_correct"]
    text = f"completions with every step right {b:.1%} -> {a:.1%} (flagged on a drop of more than {STEP_DROP:.0%})"
    return Finding("flag", f"the worked steps got worse: {text}") if b - a > STEP_DROP else Finding("ok", text)


@register_check("pass_at_k", needs=("pass_k_max",), title="pass@k", kind="collapse")
def pass_at_k(before: dict, after: dict) -> Finding:
    """Flag when the sampled pass@k at the largest logged k (``pass_k_max``) fell below the base model's by more
    than PASS_K_DROP: the policy narrowed, its k attempts solve fewer problems than the base's (RL sharpening
    pass@1 at the cost of coverage)."""
    key = f"pass@{int(after['pass_k_max'])}"
    if key not in before or key not in after:
        return Finding("info", f"{key} was not logged at both ends (pass_k_max changed?)")
    b, a = before[key], after[key]
    p1 = (f"; pass@1 {before['pass@1']:.1%} -> {after['pass@1']:.1%}" if "pass@1" in before and "pass@1" in after
          else "")
    dc = (f"; distinct correct completions per problem {before['distinct_correct']:.2f} -> "
          f"{after['distinct_correct']:.2f}" if "distinct_correct" in before and "distinct_correct" in after else "")
    text = f"{key} {b:.1%} -> {a:.1%} ({(a - b) * 100:+.1f} points{p1}{dc})"
    if a < b - PASS_K_DROP:
        return Finding("flag", f"{key} fell below the base model's (collapse of what the policy samples): {text}; "
                               f"flagged below the base by more than {PASS_K_DROP * 100:.0f} points")
    return Finding("ok", f"{text} (flagged below the base by more than {PASS_K_DROP * 100:.0f} points)")


@register_check("reward_change", needs=("reward",), title="reward")
def reward_change(before: dict, after: dict) -> Finding:
    """The run's own reward before and after; no verdict (nothing independent of the reward was measured)."""
    return Finding("info", f"reward {before['reward']:.4f} -> {after['reward']:.4f} "
                           f"({after['reward'] - before['reward']:+.4f})")


def hacking_flags(before: dict, after: dict) -> list[str]:
    """Reasons to suspect reward hacking from the judge and realism checks, where measured (empty: none)."""
    return [f.text for _, f in run_checks(ReportPlan(checks=("judge_agreement", "realism")), before, after)
            if f is not None and f.status == "flag"]


# ---------------------------------------------------------------------------------------------- the report
def save_plan(out_dir: str | Path, plan: ReportPlan) -> Path:
    path = Path(out_dir) / PLAN_FILE
    path.write_text(plan.to_json() + "\n")
    return path


def load_plan(out_dir: str | Path) -> Optional[ReportPlan]:
    """The plan a run saved, or None (a run directory from before plans: :func:`fallback_plan` applies)."""
    path = Path(out_dir) / PLAN_FILE
    return ReportPlan.from_dict(json.loads(path.read_text())) if path.is_file() else None


def fallback_plan(evals: list[dict]) -> ReportPlan:
    """For a run directory without a saved plan: the shown metrics it logged and the judge / realism checks."""
    keys = {k for r in evals for k in r}
    return ReportPlan(metrics=tuple(k for k in SHOWN if k in keys), checks=("judge_agreement", "realism"),
                      source="no declared plan (judge and realism, where logged)")


def write_report(out_dir: str | Path, title: Optional[str] = None, plan: Optional[ReportPlan] = None) -> Path:
    """``<out_dir>/report.md`` from ``metrics.jsonl``, the plan (given, saved with the run, or the fallback),
    the sample grids / completions and ``curves.png``."""
    out_dir = Path(out_dir)
    evals = read_metrics(out_dir, split="eval")
    train = read_metrics(out_dir, split="train")
    plan = plan or load_plan(out_dir) or fallback_plan(evals)
    lines = [f"# {title or 'flowrl run'}: {out_dir.name}", ""]
    if not evals:
        lines.append("No evaluation was logged.")
    else:
        before, after = evals[0], evals[-1]
        lines += _table(plan, before, after)
        lines += _checks(plan, before, after)
        if train:
            t = train[-1].get("time/elapsed_s")
            if t is not None:
                lines += [f"Training time: {t:.0f} s over {train[-1]['step']} iterations.", ""]
    lines += _samples(out_dir)
    if (out_dir / "curves.png").exists():
        lines += ["## Curves", "", "![curves](curves.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _table(plan: ReportPlan, before: dict, after: dict) -> list[str]:
    keys = [k for k in plan.metrics if k in after or k in before]
    lines = ["| metric | before (step %d) | after (step %d) | change |" % (before["step"], after["step"]), "|---|---|---|---|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        change = "" if not isinstance(b, (int, float)) or not isinstance(a, (int, float)) else f"{a - b:+.4f}"
        lines.append(f"| {k} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return lines + [""]


def _checks(plan: ReportPlan, before: dict, after: dict) -> list[str]:
    if not plan.checks:
        return ["This task declared no checks; reward hacking was not checked.", ""]
    results = run_checks(plan, before, after)
    lines = ["## Checks", "", f"Declared by {plan.source}.", ""]
    for name, f in results:
        title = REPORT_CHECKS.meta(name)["title"]
        if f is None:
            missing = [k for k in REPORT_CHECKS.meta(name)["needs"] if k not in after or k not in before]
            lines.append(f"- **{title}**: not measured (the evaluation logged no {', '.join(missing)})")
        else:
            lines.append(f"- **{title}**: {'**FLAG**' if f.status == 'flag' else f.status}. {f.text}")
    lines.append("")
    for kind, (heading, clean, what) in VERDICTS.items():
        mine = [(n, f) for n, f in results if REPORT_CHECKS.meta(n).get("kind", "hacking") == kind]
        flags = [f.text for _, f in mine if f is not None and f.status == "flag"]
        verdicts = [REPORT_CHECKS.meta(n)["title"] for n, f in mine if f is not None and f.status != "info"]
        if flags:
            lines += [f"**{heading}**", ""] + [f"- {t}" for t in flags] + [""]
        elif verdicts:
            lines += [f"{clean} ({'; '.join(verdicts)}).", ""]
        elif kind == "hacking":
            lines += ["Reward hacking was not checked: nothing independent of the reward was measured.", ""]
        elif mine:
            lines += [f"Diversity was not measured, so {what} was not checked.", ""]
    return lines


def _samples(out_dir: Path) -> list[str]:
    grids = sorted(out_dir.glob("samples/step_*.png"))
    lines = []
    if grids:
        lines += ["## Samples (fixed prompts and seeds; each labelled with its reward)", "",
                  f"Before: ![before]({grids[0].relative_to(out_dir)})", "",
                  f"After: ![after]({grids[-1].relative_to(out_dir)})", ""]
        gifs = sorted(out_dir.glob("samples/step_*.gif"))
        if gifs:
            lines += [f"Animated: [before]({gifs[0].relative_to(out_dir)}), [after]({gifs[-1].relative_to(out_dir)})", ""]
    tables = sorted(out_dir.glob("samples/step_*.jsonl"))
    if tables:
        rows = [json.loads(line) for line in tables[-1].read_text().splitlines()[:8] if line.strip()]
        if rows:
            from flowrl.train.visuals import markdown_table

            cols = list(rows[0])
            lines += [f"## Completions after training ({tables[-1].relative_to(out_dir)}, first {len(rows)})", "",
                      markdown_table(cols, [[r.get(c) for c in cols] for r in rows]), ""]
    return lines


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
