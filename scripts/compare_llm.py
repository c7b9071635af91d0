"""Compare the LLM algorithms on the embedded arithmetic task and write the "## LLMs" section of docs/results.md.

Each method is a config of ``configs/arith/``; each runs with several seeds through ``flowrl train`` (the one loop),
``--jobs`` runs at a time (each with one torch thread). Read back from every run's ``metrics.jsonl``:

- greedy exact-match accuracy on the 200 held-out problems against iterations (mean over seeds),
- iterations to reach ``--threshold`` accuracy (per seed; "-" when not reached),
- the share of sampled completions with every step right (train, mean over the iterations), and the miracle rate
  (right answer after a wrong step) of the samples: at the start, its peak, and at the end; and greedy at the end.

    python scripts/compare_llm.py --iterations 30 --seeds 0 1 2 --jobs 2      # the full table
    python scripts/compare_llm.py --iterations 10 --seeds 0 --jobs 2          # a quick look

Runs already finished under ``--runs`` are reused (delete the folder to rerun).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # name in the table: config
    "GRPO (outcome only)": "grpo",
    "Dr. GRPO": "dr_grpo",
    "RLOO": "rloo",
    "PRIME (online implicit PRM)": "prime",
    "dual-level + step verifier": "dual_level",
    "PROF filter + step verifier": "prof",
    "Posterior-GRPO gate + step verifier": "posterior_gate",
}


def run_one(cfg: str, seed: int, args) -> Path:
    out = Path(args.runs) / f"{cfg}_s{seed}"
    if (out / "report.md").exists():
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs" / "arith" / f"{cfg}.yaml"), "--out", str(out),
           "--set", f"seed={seed}", "--set", f"iterations={args.iterations}", "--set", f"eval.every={args.eval_every}",
           "--set", "progress=false", "--set", "trackers=[]", "--set", "max_minutes=0",
           "--set", f"save_every={args.iterations}", "--set", f"llm.eval_size={args.eval_size}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    t = time.time()
    log = Path(args.runs) / f"{cfg}_s{seed}.log"
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"{cfg} seed {seed}: rc={rc} in {time.time() - t:.0f}s", flush=True)
    if rc != 0:
        raise RuntimeError(f"{cfg} seed {seed} failed; see {log}")
    return out


def read(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def summarise(args) -> str:
    lines = []
    steps = None
    table = []
    for name, cfg in METHODS.items():
        runs = [Path(args.runs) / f"{cfg}_s{s}" for s in args.seeds]
        runs = [r for r in runs if (r / "report.md").exists()]
        if not runs:
            continue
        per = [read(r) for r in runs]
        ev_steps = [e["step"] for e in per[0][1]]
        steps = steps or ev_steps
        acc = {st: mean([next((e["accuracy"] for e in ev if e["step"] == st), None) for _, ev in per]) for st in ev_steps}
        reach = []
        for _, ev in per:
            hit = next((e["step"] for e in ev if e["accuracy"] >= args.threshold), None)
            reach.append("-" if hit is None else str(hit))
        asc = mean([mean([r.get("all_steps_correct") for r in tr]) for tr, _ in per])
        mir0 = mean([tr[0].get("miracle_rate") for tr, _ in per])
        mirpk = mean([max(r.get("miracle_rate", 0.0) for r in tr) for tr, _ in per])
        mirend = mean([mean([r.get("miracle_rate") for r in tr[-3:]]) for tr, _ in per])
        gmir = mean([ev[-1].get("miracle_rate") for _, ev in per])
        secs = mean([tr[-1]["time/elapsed_s"] for tr, _ in per])
        table.append((name, cfg, len(runs), acc, reach, asc, mir0, mirpk, mirend, gmir, secs))
    head = "| method (config) | seeds | " + " | ".join(f"acc@{s}" for s in steps) + \
           f" | iters to {args.threshold:.0%} | all-steps-right (samples, mean) | miracle: start / peak / end (samples) | miracle end (greedy) | s/run |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, cfg, n, acc, reach, asc, mir0, mirpk, mirend, gmir, secs in table:
        lines.append(f"| {name} (`configs/arith/{cfg}.yaml`) | {n} | " + " | ".join(f"{acc[s]:.3f}" for s in steps)
                     + f" | {', '.join(reach)} | {asc:.3f} | {mir0:.3f} / {mirpk:.3f} / {mirend:.3f} | {gmir:.3f} | {secs:.0f} |")
    return "\n".join(lines)


def write_section(text: str, path: Path) -> None:
    """Replace (or append) the "## LLMs" section of ``path``; every other section is left as it is."""
    old = path.read_text() if path.exists() else "# Results\n"
    start = old.find("\n## LLMs")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        nxt = old.find("\n## ", start + 1)
        new = old[:start] + "\n" + text.rstrip("\n") + "\n" + (old[nxt:] if nxt >= 0 else "")
    path.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", default=list(METHODS.values()), help="configs to run (default: all)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "compare_llm"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--no-run", action="store_true", help="only summarise finished runs")
    args = p.parse_args()
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    if not args.no_run:
        jobs = [(c, s) for s in args.seeds for c in args.methods]
        with ThreadPoolExecutor(args.jobs) as ex:
            for f in [ex.submit(run_one, c, s, args) for c, s in jobs]:
                f.result()
    table = summarise(args)
    text = (
        "## LLMs\n\n"
        "Embedded arithmetic model (1.05 M-parameter Llama, buggy-student data), 16 prompts x 8 samples per iteration at "
        "temperature 1, full fine-tuning, lr 1e-4 (dual-level: 3e-4; PRIME's implicit PRM: 1e-5), PPO-clip 0.2; "
        f"{args.iterations} iterations, seeds {args.seeds}. "
        f"`acc@k`: greedy exact match on {args.eval_size} held-out problems after k iterations (mean over seeds). "
        "Sample columns are over the rollouts (128 completions per iteration). Written by "
        f"`python scripts/compare_llm.py --iterations {args.iterations} --seeds {' '.join(map(str, args.seeds))} "
        f"--jobs {args.jobs}` on a shared 2-core CPU (one torch thread per run; s/run is wall time under that load).\n\n"
        + table + "\n"
    )
    write_section(text, Path(args.out))
    print(table)


if __name__ == "__main__":
    main()
