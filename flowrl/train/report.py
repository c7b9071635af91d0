"""``report.md`` at the end of a run: before/after evaluation figures, grids, curves, and a reward-hacking check.

The check never trusts the reward model alone. With an independent judge (``accuracy``) and a realism
distance (``realism``, lower is better) in the evaluation lines, a run is flagged when

    reward_accuracy - accuracy > HACK_GAP          (the reward model agrees with the prompt, the judge does not), or
    realism_after > (1 + REALISM_TOL) * realism_before  (samples drifted away from real data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from flowrl.train.metrics_log import read_metrics

HACK_GAP = 0.15
REALISM_TOL = 0.10
SHOWN = ("reward", "accuracy", "reward_accuracy", "reward_prob", "realism", "diversity")


def hacking_flags(before: dict, after: dict) -> list[str]:
    """Reasons to suspect reward hacking from the first and last evaluation lines (empty: none)."""
    flags = []
    if "reward_accuracy" in after and "accuracy" in after:
        gap = after["reward_accuracy"] - after["accuracy"]
        if gap > HACK_GAP:
            flags.append(f"the reward classifier's accuracy ({after['reward_accuracy']:.1%}) exceeds the independent "
                         f"judge's ({after['accuracy']:.1%}) by {gap:.1%} (> {HACK_GAP:.0%})")
    if "realism" in after and "realism" in before and before["realism"] > 0:
        rel = after["realism"] / before["realism"] - 1.0
        if rel > REALISM_TOL:
            flags.append(f"realism worsened by {rel:.1%} (distance to the nearest real sample "
                         f"{before['realism']:.3f} -> {after['realism']:.3f}; tolerance {REALISM_TOL:.0%})")
    return flags


def write_report(out_dir: str | Path, title: Optional[str] = None) -> Path:
    out_dir = Path(out_dir)
    evals = read_metrics(out_dir, split="eval")
    train = read_metrics(out_dir, split="train")
    lines = [f"# {title or 'flowrl run'}: {out_dir.name}", ""]
    if not evals:
        lines.append("No evaluation was logged.")
    else:
        before, after = evals[0], evals[-1]
        keys = [k for k in SHOWN if k in after]
        lines += ["| metric | before (step %d) | after (step %d) | change |" % (before["step"], after["step"]),
                  "|---|---|---|---|"]
        for k in keys:
            b, a = before.get(k), after.get(k)
            change = "" if b is None or a is None else f"{a - b:+.4f}"
            lines.append(f"| {k} | {_fmt(b)} | {_fmt(a)} | {change} |")
        lines.append("")
        if "accuracy" in after and "realism" in after:
            gain = after["accuracy"] - before["accuracy"]
            ok = gain >= 0.20 and after["accuracy"] >= 0.90 and after["realism"] <= (1 + REALISM_TOL) * before["realism"]
            lines += [f"Judge accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} ({gain * 100:+.1f} points), "
                      f"realism {before['realism']:.3f} -> {after['realism']:.3f}: the demo's bar (+20 points, to at "
                      f"least 90%, realism within {REALISM_TOL:.0%} of the base) is **{'met' if ok else 'not met'}**.", ""]
        flags = hacking_flags(before, after)
        if flags:
            lines += ["**Reward hacking suspected:**", ""] + [f"- {f}" for f in flags] + [""]
        elif "accuracy" in after:
            lines += ["No sign of reward hacking: the independent judge agrees with the reward model "
                      f"(gap <= {HACK_GAP:.0%}) and realism is within {REALISM_TOL:.0%} of the start.", ""]
        if train:
            t = train[-1].get("time/elapsed_s")
            if t is not None:
                lines += [f"Training time: {t:.0f} s over {train[-1]['step']} iterations.", ""]
    grids = sorted(out_dir.glob("samples/step_*.png"))
    if grids:
        lines += ["## Samples (fixed prompts and seeds)", "", f"Before: ![before]({grids[0].relative_to(out_dir)})", "",
                  f"After: ![after]({grids[-1].relative_to(out_dir)})", ""]
    if (out_dir / "curves.png").exists():
        lines += ["## Curves", "", "![curves](curves.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
