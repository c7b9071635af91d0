"""GRPO against pass@k training on the embedded arithmetic model: greedy accuracy, sampled pass@1 / pass@8 and distinct
correct completions per problem, before and after, per seed and mean ± std over seeds (a markdown table on stdout).

Each config of ``configs/arith/`` runs through ``flowrl train`` (the one loop), one run at a time with one torch
thread; finished runs under ``--runs`` are reused (delete the folder to rerun). Extra ``--set`` overrides apply to
every run (to try a variant of a config, give it a ``--tag`` so its runs get their own folders).

    python scripts/compare_passk.py --configs grpo grpo_passk --seeds 0 1 2 --iterations 30
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLS = ("accuracy", "pass@1", "pass@8", "distinct_correct")


def run_one(cfg: str, seed: int, args) -> Path:
    out = Path(args.runs) / f"{cfg}{args.tag}_s{seed}"
    if (out / "report.md").exists():
        return out
    cmd = [sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs" / "arith" / f"{cfg}.yaml"), "--out", str(out),
           "--set", f"seed={seed}", "--set", f"iterations={args.iterations}", "--set", f"eval.every={args.eval_every}",
           "--set", "progress=false", "--set", "trackers=[]", "--set", "max_minutes=0", "--set", "threads=1",
           "--set", f"save_every={args.iterations}"]
    for s in args.set:
        cmd += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    t = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"{cfg}{args.tag} seed {seed}: rc={rc} in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    if rc != 0:
        raise RuntimeError(f"{cfg} seed {seed} failed; see {out.parent / (out.name + '.log')}")
    return out


def evals(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "eval"]


def ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["grpo", "grpo_passk"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--set", action="append", default=[], help="an override for every run (key=value)")
    p.add_argument("--tag", default="", help="suffix of the run folders (for a variant given with --set)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "compare_passk"))
    a = p.parse_args()
    lines = ["| config | " + " | ".join(f"{c} before" for c in COLS) + " | " + " | ".join(f"{c} after" for c in COLS)
             + " | per seed (accuracy / pass@1 / pass@8 / distinct after) |", "|---" * (2 + 2 * len(COLS)) + "|"]
    for cfg in a.configs:
        ends = [evals(run_one(cfg, s, a)) for s in a.seeds]
        before = [e[0] for e in ends]
        after = [e[-1] for e in ends]
        cells = [ms([b[c] for b in before]) for c in COLS] + [ms([x[c] for x in after]) for c in COLS]
        seeds = "; ".join(f"s{s}: " + " / ".join(f"{x[c]:.3f}" for c in COLS) for s, x in zip(a.seeds, after))
        lines.append(f"| `{cfg}{a.tag}` | " + " | ".join(cells) + f" | {seeds} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
