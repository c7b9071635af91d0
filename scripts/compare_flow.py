"""Reproduction table: every flow algorithm on the embedded digits model, several seeds, one results file.

    .venv/bin/python scripts/compare_flow.py --seeds 0 1 2 --jobs 2            # run everything, write docs/results.md
    .venv/bin/python scripts/compare_flow.py --iterations 40 --jobs 2          # shorter runs (said in the file)
    .venv/bin/python scripts/compare_flow.py --collect-only                    # rebuild the tables from finished runs

Each run is ``flowrl train configs/digits/<algo>.yaml --out <runs>/<algo>/seed<s> --set seed=<s> ...`` in its own
single-threaded process (``--jobs`` of them at a time). From each run's ``metrics.jsonl`` the script reads the
evaluation lines (fixed prompts and seeds: ``reward`` = mean reward-classifier probability of the asked digit,
``accuracy`` = the independent judge's accuracy, ``realism``) and the training wall time: the cumulative sum of
``time/iteration_s`` up to a step (rollouts and updates; evaluations excluded, so the eval interval does not
bias the clock). It writes, under the heading "## Flow models (digits)" of ``docs/results.md`` (the rest of the
file is left as it is):

- per algorithm, a table of reward and judge accuracy (mean +- std over seeds) at each evaluated step;
- the steps and the training seconds each algorithm needs to reach thresholds below saturation
  (judge accuracy >= 0.85, reward >= 0.8 by default): mean +- std over the seeds that reached it, and how many did;
- a PNG (reward and accuracy against steps and against wall time) under ``docs/``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("flow_grpo", "dance_grpo", "tp_grpo", "euphonium", "ac_flow")
SECTION = "## Flow models (digits)"


# ------------------------------------------------------------------------------------------- running
def run_one(algo: str, seed: int, out: Path, iterations: int | None, eval_every: int | None, log: Path,
            config: Path | None = None, extra: tuple[str, ...] = ()) -> tuple[str, int, int, float]:
    """One single-threaded ``flowrl train`` of ``config`` (default ``configs/digits/<algo>.yaml``) with ``extra``
    --set overrides, its output in ``log``: (algo, seed, exit code, seconds)."""
    config = config if config is not None else ROOT / "configs" / "digits" / f"{algo}.yaml"
    cmd = [sys.executable, "-m", "flowrl.cli", "train", str(config),
           "--out", str(out), "--set", f"seed={seed}", "--set", "progress=false", "--set", "trackers=[]",
           "--set", "threads=1"]
    for o in extra:
        cmd += ["--set", o]
    if iterations is not None:
        cmd += ["--set", f"iterations={iterations}"]
    if eval_every is not None:
        cmd += ["--set", f"eval.every={eval_every}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return algo, seed, rc, time.time() - t0


def run_all(algos, seeds, runs: Path, iterations, eval_every, jobs: int, skip_done: bool) -> None:
    todo = []
    for algo in algos:
        for s in seeds:
            out = runs / algo / f"seed{s}"
            if skip_done and (out / "report.md").exists():
                print(f"[compare] {algo} seed {s}: done already, kept", flush=True)
                continue
            if out.exists():
                import shutil

                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            todo.append((algo, s, out))
    print(f"[compare] {len(todo)} runs, {jobs} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = [pool.submit(run_one, a, s, o, iterations, eval_every, o.parent / f"seed{s}.log") for a, s, o in todo]
        for f in futs:
            algo, s, rc, dt = f.result()
            print(f"[compare] {algo} seed {s}: exit {rc} after {dt:.0f} s", flush=True)
            if rc != 0:
                raise SystemExit(f"{algo} seed {s} failed (exit {rc}); see {runs / algo / f'seed{s}.log'}")


# ------------------------------------------------------------------------------------------- reading
def read_run(out: Path) -> dict:
    """{'steps': [...], 'time': [...] (training seconds at each eval step), 'reward': [...], 'accuracy': [...],
    'realism': [...], 'reward_accuracy': [...], 'iter_s': mean seconds per iteration}."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = sorted((r for r in rows if r.get("split") == "train"), key=lambda r: r["step"])
    evals = sorted((r for r in rows if r.get("split") == "eval"), key=lambda r: r["step"])
    clock, t = {0: 0.0}, 0.0
    for r in train:
        t += float(r["time/iteration_s"])
        clock[r["step"]] = t
    res = {"steps": [r["step"] for r in evals], "time": [clock[r["step"]] for r in evals],
           "iter_s": t / max(len(train), 1)}
    for k in ("reward", "accuracy", "reward_accuracy", "realism"):
        res[k] = [float(r[k]) for r in evals]
    return res


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def first_reach(run: dict, key: str, thr: float) -> tuple[float, float] | None:
    """(step, training seconds) of the first evaluation with run[key] >= thr, or None."""
    for s, t, v in zip(run["steps"], run["time"], run[key]):
        if v >= thr:
            return s, t
    return None


def fmt(m: float, sd: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(m) else f"{m:.{digits}f} ± {sd:.{digits}f}"


# ------------------------------------------------------------------------------------------- writing
def plot(data: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for algo, runs in data.items():
        steps = runs[0]["steps"]
        n = min(len(r["steps"]) for r in runs)
        steps = steps[:n]
        for row, key in enumerate(("reward", "accuracy")):
            vals = [[r[key][i] for r in runs] for i in range(n)]
            m = [mean_std(v)[0] for v in vals]
            sd = [mean_std(v)[1] for v in vals]
            tm = [mean_std([r["time"][i] for r in runs])[0] for i in range(n)]
            for col, x in enumerate((steps, tm)):
                ax = axes[row, col]
                ax.plot(x, m, marker="o", ms=3, label=algo)
                ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.15)
    for row, key in enumerate(("reward (mean classifier prob.)", "judge accuracy")):
        for col, xl in enumerate(("iteration", "training seconds (1 CPU thread)")):
            axes[row, col].set_xlabel(xl)
            axes[row, col].set_ylabel(key)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Digits: evaluation on fixed prompts and seeds (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(data: dict[str, list[dict]], seeds, args, plot_rel: str, wall_total: float | None) -> str:
    L = [SECTION, ""]
    iters = {a: max(r["steps"][-1] for r in runs) for a, runs in data.items()}
    how_long = ("the configs' own iteration counts" if args.iterations is None
                else f"{args.iterations} iterations each (shortened from the configs)")
    L += [f"Every algorithm's config in `configs/digits/` on the embedded digits model, seeds {list(seeds)}, "
          f"{how_long}"
          f" ({', '.join(f'{a}: {n}' for a, n in iters.items())}), evaluated every "
          f"{args.eval_every or 'config'} iterations on the fixed evaluation set (20 samples of each digit, fixed "
          "noise). One CPU thread per run, two runs at a time on a shared 2-core machine, so the seconds are "
          "comparable between algorithms but not an absolute speed. "
          f"Command: `.venv/bin/python scripts/compare_flow.py --seeds {' '.join(map(str, seeds))} --jobs {args.jobs}"
          f"{'' if args.iterations is None else f' --iterations {args.iterations}'}"
          f"{'' if args.eval_every is None else f' --eval-every {args.eval_every}'}`"
          + (f" ({wall_total / 60:.0f} minutes in all)." if wall_total else "."), ""]
    L += ["- `reward`: mean probability the reward classifier gives the asked digit (continuous, does not saturate "
          "as fast as accuracy).",
          "- `judge acc.`: accuracy of the independent k-NN judge (never a reward), the success measure.",
          "- seconds: training wall time (rollouts + updates, evaluations excluded), one thread.",
          "- Each algorithm is evaluated with its own rollout kernel (flow_grpo, tp_grpo, ac_flow: Flow-SDE a = 0.7; "
          "dance_grpo, euphonium: constant-noise SDE eta = 0.5), so the step-0 figures differ slightly between them; "
          "Euphonium's figures are without guidance (what the model learned).", ""]
    # thresholds
    thr = [("accuracy", t, "judge acc.") for t in args.acc_thresholds] + [("reward", t, "reward") for t in args.reward_thresholds]
    L += ["### Steps and seconds to reach a threshold", "",
          "| algorithm | s / iteration | " + " | ".join(f"steps to {n} ≥ {t}" for _, t, n in thr) + " | "
          + " | ".join(f"seconds to {n} ≥ {t}" for _, t, n in thr) + " | final judge acc. | final realism (step 0) |",
          "|---|---|" + "---|" * (2 * len(thr)) + "---|---|"]
    summary = {}
    for algo, runs in data.items():
        cells_s, cells_t = [], []
        for key, t, _ in thr:
            hits = [first_reach(r, key, t) for r in runs]
            got = [h for h in hits if h is not None]
            ms, ss = mean_std([h[0] for h in got])
            mt, st = mean_std([h[1] for h in got])
            tag = f" ({len(got)}/{len(runs)})" if len(got) < len(runs) else ""
            cells_s.append("not reached" if not got else f"{ms:.1f} ± {ss:.1f}{tag}")
            cells_t.append("not reached" if not got else f"{mt:.0f} ± {st:.0f}{tag}")
            summary.setdefault((algo, key), (ms, mt, len(got)))  # the first (lowest) threshold of each metric
        it = mean_std([r["iter_s"] for r in runs])
        fa = mean_std([r["accuracy"][-1] for r in runs])
        fr = mean_std([r["realism"][-1] for r in runs])
        r0 = mean_std([r["realism"][0] for r in runs])
        L.append(f"| {algo} | {it[0]:.2f} ± {it[1]:.2f} | " + " | ".join(cells_s) + " | " + " | ".join(cells_t)
                 + f" | {fmt(*fa)} | {fmt(*fr, 2)} ({r0[0]:.2f}) |")
    L += ["", "Mean ± std over the seeds that reached the threshold; (k/n) says how many did when not all. The "
          "evaluation interval bounds the resolution of the step counts.", ""]
    L += [f"![reward and judge accuracy against steps and wall time]({plot_rel})", ""]
    # per-algorithm tables
    L += ["### Curves per algorithm (mean ± std over seeds)", ""]
    for algo, runs in data.items():
        n = min(len(r["steps"]) for r in runs)
        L += [f"**{algo}**", "", "| step | seconds | reward | judge acc. | reward-classifier acc. | realism |",
              "|---|---|---|---|---|---|"]
        for i in range(n):
            col = lambda k, d=3: fmt(*mean_std([r[k][i] for r in runs]), d)
            L.append(f"| {runs[0]['steps'][i]} | {mean_std([r['time'][i] for r in runs])[0]:.0f} | {col('reward')} | "
                     f"{col('accuracy')} | {col('reward_accuracy')} | {col('realism', 2)} |")
        L.append("")
    L += ["### Against the papers' claims", "", claims_paragraph(summary, data), ""]
    return "\n".join(L)


def claims_paragraph(summary: dict, data: dict) -> str:
    """Plain statements of the measured ratios; the interpretation is written by hand in docs/results.md's notes."""
    def ratio(algo: str, key: str, idx: int) -> str:
        a, b = summary.get(("flow_grpo", key)), summary.get((algo, key))
        if not a or not b or not a[2] or not b[2]:
            return "n/a"
        return f"{a[idx] / b[idx]:.2f}x"
    parts = []
    for algo in ("tp_grpo", "euphonium"):
        if algo in data and "flow_grpo" in data:
            parts.append(f"{algo} vs flow_grpo, speed-up to judge acc. threshold: {ratio(algo, 'accuracy', 0)} in steps, "
                         f"{ratio(algo, 'accuracy', 1)} in seconds; to reward threshold: {ratio(algo, 'reward', 0)} "
                         f"in steps, {ratio(algo, 'reward', 1)} in seconds (> 1 means faster than Flow-GRPO)")
    return "Measured: " + "; ".join(parts) + "." if parts else "Flow-GRPO was not run; no comparison."


def write_results(path: Path, text: str, heading: str = SECTION) -> None:
    """Replace (or add) the section under ``heading`` (default "## Flow models (digits)"); other sections stay."""
    old = path.read_text() if path.exists() else "# Results\n\n"
    notes = ""
    if heading in old:
        head, rest = old.split(heading, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        own = rest if nxt < 0 else rest[:nxt]
        k = own.find("### Notes")  # hand-written notes under the section are kept
        notes = own[k:].rstrip() + "\n" if k >= 0 else ""
    else:
        head, tail = old.rstrip() + "\n\n", ""
    path.write_text(head + text.rstrip() + "\n\n" + notes + ("\n" + tail if tail else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=None, help="override every config's iterations")
    p.add_argument("--eval-every", type=int, default=5, help="evaluation interval (iterations)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each is single-threaded)")
    p.add_argument("--runs", default="/tmp/compare_flow", help="directory of the run outputs")
    p.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "flow_digits_compare.png"))
    p.add_argument("--acc-thresholds", type=float, nargs="+", default=[0.85, 0.9], help="judge accuracy thresholds")
    p.add_argument("--reward-thresholds", type=float, nargs="+", default=[0.8], help="reward (mean prob.) thresholds")
    p.add_argument("--collect-only", action="store_true", help="do not run; read the finished runs under --runs")
    p.add_argument("--skip-done", action="store_true", help="keep runs that already wrote report.md")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    t0 = time.time()
    if not args.collect_only:
        run_all(args.algos, args.seeds, runs, args.iterations, args.eval_every, args.jobs, args.skip_done)
    wall = time.time() - t0 if not args.collect_only else None
    data = {}
    for algo in args.algos:
        got = [read_run(runs / algo / f"seed{s}") for s in args.seeds if (runs / algo / f"seed{s}" / "metrics.jsonl").exists()]
        if len(got) != len(args.seeds):
            raise SystemExit(f"{algo}: {len(got)} of {len(args.seeds)} seeds have metrics under {runs / algo}")
        data[algo] = got
    plot_path, res_path = Path(args.plot), Path(args.results)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(data, plot_path)
    rel = os.path.relpath(plot_path, res_path.parent)
    write_results(res_path, section(data, args.seeds, args, rel, wall))
    print(f"[compare] wrote {res_path} and {plot_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
