"""Accuracy against diversity on the embedded digits model: every flow algorithm with and without the diversity
methods, several seeds, one table and one Pareto plot.

    .venv/bin/python scripts/compare_diversity.py --seeds 0 1 2 --jobs 2        # run everything, write the results
    .venv/bin/python scripts/compare_diversity.py --collect-only                 # rebuild from finished runs

Variants of each algorithm ``configs/digits/<algo>.yaml``:

- ``plain``: the config as shipped;
- ``diverse``: the same config plus the diversity keys of ``configs/digits/flow_grpo_diverse.yaml`` (its
  ``flow.rewards``, ``flow.cfg_scale``, ``flow.diversity_bonus``, ``flow.kl_weight`` and ``loss.kl_beta``; read
  from that file, so the shipped recipe and this experiment cannot drift apart). Algorithms whose own config has a
  KL (all but ac_flow) take its kl_beta; ac_flow, which trains no KL, takes the rest; dance_grpo, whose estimator
  gives every reward part its own normalised column, weighs each column as the recipe weighs its reward or bonus.

Each run is ``flowrl train`` in its own single-threaded process (``--jobs`` at a time). After training, the script
evaluates the exported model and the base model with the same fixed evaluation as the demo (20 samples of each
digit, seed 1234), once with the demo's SDE (Flow-SDE, a = 0.7) and once with the ODE, and reads the judge's
accuracy and the per-digit diversity (mean pairwise pixel distance between samples of one digit). It writes the
section "## Diversity on digits" of ``docs/results.md`` (the rest of the file is kept) and
``docs/diversity_pareto.png`` (judge accuracy against diversity relative to the base model, SDE and ODE panels),
with a reference: the base model's own samples kept where the reward classifier accepts them
(``reward_filter_front``), what a method that keeps the base's diversity and learns only the reward aims at.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare_flow  # noqa: E402  (the same single run)
from compare_flow import mean_std, write_results  # noqa: E402  (same results file and statistics)

ALGOS = ("flow_grpo", "dance_grpo", "tp_grpo", "euphonium", "ac_flow")
VARIANTS = ("plain", "diverse")
DIVERSE_CONFIG = ROOT / "configs" / "digits" / "flow_grpo_diverse.yaml"
SECTION = "## Diversity on digits"
EVAL_SEED, EVAL_N = 1234, 20
FRESH_SEED = 777  # the larger evaluation's seed (any seed but the demo's)
ACC_BAR, DIV_BAR = 0.95, 0.90
FILTER_THRESHOLDS, FILTER_N = (0.3, 0.5, 0.7, 0.9, 0.97, 0.99), 300
FILTER_READERS = ("CNN (the demo's reward)", "min(CNN, Gaussian) (the recipe's)")


def diverse_overrides(algo: str) -> list[str]:
    """--set overrides that add the shipped diversity recipe's keys to ``algo``'s own config."""
    from flowrl.config import yaml_load

    d = yaml_load(DIVERSE_CONFIG.read_text())
    flow, loss = d.get("flow", {}), d.get("loss", {})
    out = [f"flow.diversity_bonus={json.dumps(flow.get('diversity_bonus', []))}"]
    rewards = flow.get("rewards") or {"digits": {}}
    if "rewards" in flow:
        out.append(f"flow.rewards={json.dumps(rewards)}")
    if flow.get("cfg_scale") is not None:
        out.append(f"flow.cfg_scale={flow['cfg_scale']}")
    own = yaml_load((ROOT / "configs" / "digits" / f"{algo}.yaml").read_text())
    adv = own.get("advantage", {})
    if adv.get("estimator") == "grpo_per_reward":  # each bonus its own advantage column, weighted as configured
        w = {(cfg or {}).get("name", k): float((cfg or {}).get("weight", 1.0)) for k, cfg in rewards.items()}
        w.update({f"diversity/{b['name']}": b.get("weight", 1.0) for b in flow.get("diversity_bonus", [])})
        out += [f"advantage.params={json.dumps({**(adv.get('params') or {}), 'weights': w})}"]
    if float(own.get("loss", {}).get("kl_beta", 0.0) or 0.0) > 0:
        out += [f"flow.kl_weight={json.dumps(flow.get('kl_weight', {'name': 'uniform'}))}",
                f"loss.kl_beta={loss.get('kl_beta', own['loss']['kl_beta'])}"]
    return out


def run_one(algo: str, variant: str, seed: int, out: Path, iterations: int | None,
            eval_every: int) -> tuple[str, str, int, int, float]:
    """compare_flow's single run, of the diverse recipe's file for flow_grpo and of the algorithm's own config
    plus :func:`diverse_overrides` for the others."""
    diverse = variant == "diverse"
    config = DIVERSE_CONFIG if (algo, variant) == ("flow_grpo", "diverse") else None
    extra = tuple(diverse_overrides(algo)) if diverse and config is None else ()
    _, _, rc, dt = compare_flow.run_one(algo, seed, out, iterations, eval_every, out.parent / f"seed{seed}.log",
                                        config=config, extra=extra)
    return algo, variant, seed, rc, dt


def evaluate(path: Path | None, n: int = EVAL_N, seed: int = EVAL_SEED) -> dict:
    """Judge accuracy and diversity under the demo's SDE and the ODE, of the export at ``path`` (None: the base,
    unguided), ``n`` samples of each digit from ``seed``. A run trained with classifier-free guidance
    (``flow.cfg_scale`` in its config.yaml) is evaluated with it, as its own evaluation and its users sample it."""
    import torch

    from flowrl.config import yaml_load
    from flowrl.pipelines.digits import evaluate_digits, load_digits

    torch.set_num_threads(1)
    pipe = load_digits()
    cfg_scale = None
    if path is not None:
        pipe.load_pretrained(path / "transformer")
        cfg_scale = (yaml_load((path / "config.yaml").read_text()).get("flow") or {}).get("cfg_scale")
    out = {}
    for kind, pre in (("flow_sde", "sde"), ("ode", "ode")):
        m = evaluate_digits(pipe, num_per_digit=n, seed=seed, kind=kind, cfg_scale=cfg_scale)
        out.update({f"{pre}/{k}": float(v) for k, v in m.items()})
    return out


def evaluate_both(path: Path | None, fresh_n: int) -> dict:
    """:func:`evaluate` on the demo's fixed evaluation and, with ``fresh_n`` > 0, again on ``fresh_n`` samples of
    each digit from FRESH_SEED (keys ``fresh/...``): near the bar, 200 samples leave 1.5 points of binomial noise."""
    out = evaluate(path)
    if fresh_n > 0:
        out.update({f"fresh/{k}": v for k, v in evaluate(path, fresh_n, FRESH_SEED).items()})
    return out


def reward_filter_front() -> list[dict]:
    """The base model's samples kept where a reader's probability of the asked digit is at least t, for each t of
    FILTER_THRESHOLDS and each reader of FILTER_READERS: the reference point the reward defines. KL-regularised RL
    with a reward that saturates at t has the base conditioned on that event as its optimum
    (pi* ~ pi_ref exp(r / beta)), so these points are what the reward asks for before any method trades diversity
    away. FILTER_N samples of each digit (seed EVAL_SEED), SDE and ODE; ``{pre}/div_x`` is the kept samples'
    per-digit diversity over all samples'."""
    import torch

    from flowrl.pipelines.digits import load_digit_classifier, load_digit_judge, load_digits, sample_digits, score_digits
    from flowrl.pipelines.digits_gaussian import load_digit_gaussian

    torch.set_num_threads(1)
    pipe, clf, gauss, judge = load_digits(), load_digit_classifier(), load_digit_gaussian(), load_digit_judge()
    digits = torch.arange(10).repeat_interleave(FILTER_N)
    rows = [{"reader": r, "threshold": t} for r in FILTER_READERS for t in FILTER_THRESHOLDS]
    for kind, pre in (("flow_sde", "sde"), ("ode", "ode")):
        x = sample_digits(pipe, digits, kind=kind, seed=EVAL_SEED)
        p_cnn = clf(x).softmax(-1).gather(1, digits[:, None])[:, 0]
        p = {"CNN (the demo's reward)": p_cnn,
             "min(CNN, Gaussian) (the recipe's)": torch.minimum(p_cnn, gauss(x).softmax(-1).gather(1, digits[:, None])[:, 0])}
        every = score_digits(x, digits, classifier=clf, judge=judge)  # loaded once, not per call
        for row in rows:
            keep = p[row["reader"]] >= row["threshold"]
            m = score_digits(x[keep], digits[keep], classifier=clf, judge=judge)
            row.update({f"{pre}/kept": float(keep.float().mean()), f"{pre}/accuracy": m["accuracy"],
                        f"{pre}/div_x": m["diversity"] / every["diversity"]})
    return rows


def training_seconds(out: Path) -> float:
    """The run's own clock at its last iteration (``time/elapsed_s``: rollouts, updates and its evaluations; not
    the model load, the final evaluation and the export)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    return float(train[-1]["time/elapsed_s"]) if train else float("nan")


def collect(runs: Path, algos, seeds, fresh_n: int = 0) -> tuple[dict, list[dict], dict]:
    cache = runs / "eval.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if "base" not in done or (fresh_n > 0 and "fresh/sde/accuracy" not in done["base"]):
        done["base"] = evaluate_both(None, fresh_n)
    want = [(r, t) for r in FILTER_READERS for t in FILTER_THRESHOLDS]
    if [(r.get("reader"), r["threshold"]) for r in done.get("reward_filter", [])] != want:  # absent or stale
        done["reward_filter"] = reward_filter_front()
    data = {}
    for algo in algos:
        for v in VARIANTS:
            for s in seeds:
                out = runs / algo / v / f"seed{s}"
                key = f"{algo}/{v}/{s}"
                if not (out / "transformer").is_dir():
                    continue
                if key not in done or (fresh_n > 0 and "fresh/sde/accuracy" not in done[key]):
                    done[key] = evaluate_both(out, fresh_n)
                    done[key]["wall_s"] = training_seconds(out)
                    cache.write_text(json.dumps(done, indent=1))
                data.setdefault((algo, v), []).append(done[key])
    cache.write_text(json.dumps(done, indent=1))
    return done["base"], done["reward_filter"], data


def plot(base: dict, filt: list[dict], data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 6))
    colors = dict(zip(ALGOS, ("C0", "C1", "C2", "C3", "C4")))
    for ax, pre, title in ((axes[0], "sde", "SDE sampling (Flow-SDE, a = 0.7)"), (axes[1], "ode", "ODE sampling")):
        pts = []
        for (algo, v), rows in data.items():
            x = [r[f"{pre}/diversity"] / base[f"{pre}/diversity"] for r in rows]
            y = [r[f"{pre}/accuracy"] for r in rows]
            pts += list(zip(x, y))
            ax.scatter(x, y, c=colors[algo], marker="o" if v == "plain" else "^", s=36 if v == "plain" else 60,
                       edgecolors="k" if v == "diverse" else "none",
                       label=f"{algo} ({'plain' if v == 'plain' else 'with the diversity methods'})")
        front = sorted(p for p in pts if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pts))
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, alpha=0.6, label="Pareto front")
        ax.scatter([1.0], [base[f"{pre}/accuracy"]], c="k", marker="*", s=150, label="base model")
        for reader, style in zip(FILTER_READERS, ("s:", "D:")):
            rows = [r for r in filt if r["reader"] == reader]
            ax.plot([r[f"{pre}/div_x"] for r in rows], [r[f"{pre}/accuracy"] for r in rows], style, c="0.45", ms=4,
                    label=f"base model, kept where {reader.split(' (')[0]} p >= "
                          + ", ".join(f"{r['threshold']:g}" for r in rows))
        ax.axhline(ACC_BAR, color="gray", lw=0.8, ls=":")
        ax.axvline(DIV_BAR, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("per-digit diversity / base model's")
        ax.set_ylabel("judge accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)  # below the panels: no point is hidden
    fig.suptitle("Digits: accuracy against diversity after training (one point per seed)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(base: dict, filt: list[dict], data: dict, seeds, args, plot_rel: str) -> str:
    L = [SECTION, "",
         f"Every flow algorithm's digits config, as shipped (`plain`) and with the diversity keys of "
         f"`configs/digits/flow_grpo_diverse.yaml` (`diverse`; for flow_grpo that file itself), seeds {list(seeds)}. "
         f"After training, the exported model and the base model are evaluated on the demo's fixed evaluation "
         f"({EVAL_N} samples of each digit, seed {EVAL_SEED}) with the demo's SDE and with the ODE. `div.`: mean "
         "pairwise pixel distance between samples of one digit, mean over digits, as a ratio to the base model's "
         f"(base: SDE {base['sde/diversity']:.3f}, ODE {base['ode/diversity']:.3f}; judge accuracy SDE "
         f"{base['sde/accuracy']:.3f}, ODE {base['ode/accuracy']:.3f}). `train s`: the run's own clock at its last "
         f"iteration (rollouts, updates, its evaluations; single-threaded, {args.jobs} runs at a time on the shared "
         "2-core machine, so compare within a row pair only). "
         f"Command: `.venv/bin/python scripts/compare_diversity.py --seeds {' '.join(map(str, seeds))} "
         f"--jobs {args.jobs}`.", "",
         f"The bar: judge accuracy >= {ACC_BAR:.0%} and diversity >= {DIV_BAR}x the base under both samplers, "
         "in every seed. Mean ± std over the seeds that finished; `seeds meeting the bar` says how many there are "
         "(k/n).", "",
         "| algorithm | variant | SDE judge acc. | SDE div. (x base) | ODE judge acc. | ODE div. (x base) | "
         "seeds meeting the bar | train s |", "|---|---|---|---|---|---|---|---|"]
    for (algo, v), rows in data.items():
        cells = []
        for pre in ("sde", "ode"):
            acc = mean_std([r[f"{pre}/accuracy"] for r in rows])
            div = mean_std([r[f"{pre}/diversity"] / base[f"{pre}/diversity"] for r in rows])
            one = len(rows) == 1  # one seed: no spread to show
            cells += [f"{acc[0]:.3f}" if one else f"{acc[0]:.3f} ± {acc[1]:.3f}",
                      f"{div[0]:.2f}" if one else f"{div[0]:.2f} ± {div[1]:.2f}"]
        ok = sum(all(r[f"{p}/accuracy"] >= ACC_BAR and r[f"{p}/diversity"] >= DIV_BAR * base[f"{p}/diversity"]
                     for p in ("sde", "ode")) for r in rows)
        wall = mean_std([r["wall_s"] for r in rows])
        L.append(f"| {algo} | {v} | " + " | ".join(cells) + f" | {ok}/{len(rows)} | {wall[0]:.0f} |")
    L += ["", "Per seed (SDE acc. / div. x, ODE acc. / div. x):", ""]
    for (algo, v), rows in data.items():
        per = "; ".join(f"{r['sde/accuracy']:.3f} / {r['sde/diversity'] / base['sde/diversity']:.2f}, "
                        f"{r['ode/accuracy']:.3f} / {r['ode/diversity'] / base['ode/diversity']:.2f}" for r in rows)
        L.append(f"- {algo} {v}: {per}")
    if all("fresh/sde/accuracy" in r for rows in data.values() for r in rows) and "fresh/sde/accuracy" in base:
        n = args.fresh_n
        L += ["", f"The same models on a larger evaluation: {n} samples of each digit from seed {FRESH_SEED} "
              f"(`--fresh-n {n}`; base: SDE {base['fresh/sde/accuracy']:.3f} at diversity "
              f"{base['fresh/sde/diversity']:.3f}, ODE {base['fresh/ode/accuracy']:.3f} at "
              f"{base['fresh/ode/diversity']:.3f}). Per seed (SDE acc. / div. x, ODE acc. / div. x) and seeds meeting "
              "the bar:", ""]
        for (algo, v), rows in data.items():
            per = "; ".join(f"{r['fresh/sde/accuracy']:.3f} / {r['fresh/sde/diversity'] / base['fresh/sde/diversity']:.2f}, "
                            f"{r['fresh/ode/accuracy']:.3f} / {r['fresh/ode/diversity'] / base['fresh/ode/diversity']:.2f}"
                            for r in rows)
            ok = sum(all(r[f"fresh/{p}/accuracy"] >= ACC_BAR
                         and r[f"fresh/{p}/diversity"] >= DIV_BAR * base[f"fresh/{p}/diversity"] for p in ("sde", "ode"))
                     for r in rows)
            L.append(f"- {algo} {v}: {per} ({ok}/{len(rows)})")
    L += ["", "What the reward asks for: the base model's samples kept where a reader's probability of the asked "
          f"digit is at least p ({FILTER_N} samples of each digit, seed {EVAL_SEED}; "
          "`reward_filter_front` in `scripts/compare_diversity.py`). As its KL weight beta goes to 0, "
          "KL-regularised RL with a reward saturated at p has this filtered base as its optimum "
          "(pi* ~ pi_ref exp(r / beta)): a method that keeps the base's diversity and learns only what the reward "
          "says lands near these points. The judge disagrees with the CNN on some of what the CNN accepts; "
          "requiring the Gaussian reader to agree too removes most of that.",
          "", "| reader | p >= | SDE kept | SDE judge acc. | SDE div. (x all) | ODE kept | ODE judge acc. | "
          "ODE div. (x all) |", "|---|---|---|---|---|---|---|---|"]
    for r in filt:
        L.append(f"| {r['reader']} | {r['threshold']:g} | " + " | ".join(
            f"{r[f'{pre}/kept']:.2f} | {r[f'{pre}/accuracy']:.3f} | {r[f'{pre}/div_x']:.2f}" for pre in ("sde", "ode"))
            + " |")
    L += ["", f"![judge accuracy against diversity relative to the base, SDE and ODE]({plot_rel})", ""]
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=None, help="override every config's iterations")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=1000,
                   help="the runs' own evaluation interval (default: start and end only; this script evaluates the exports)")
    p.add_argument("--runs", default="/tmp/compare_diversity")
    p.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "diversity_pareto.png"))
    p.add_argument("--fresh-n", type=int, default=0,
                   help="also evaluate every model on this many samples of each digit from a fresh seed (0: off)")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("--skip-done", action="store_true", help="keep runs that already exported a model")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    if not args.collect_only:
        todo = []
        for algo in args.algos:
            for v in args.variants:
                for s in args.seeds:
                    out = runs / algo / v / f"seed{s}"
                    if args.skip_done and (out / "transformer").is_dir():
                        continue
                    if out.exists():
                        import shutil

                        shutil.rmtree(out)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    todo.append((algo, v, s, out))
        print(f"[diversity] {len(todo)} runs, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futs = [pool.submit(run_one, a, v, s, o, args.iterations, args.eval_every) for a, v, s, o in todo]
            for f in futs:
                algo, v, s, rc, dt = f.result()
                print(f"[diversity] {algo} {v} seed {s}: exit {rc} after {dt:.0f} s", flush=True)
                if rc != 0:
                    raise SystemExit(f"{algo} {v} seed {s} failed (exit {rc}); see {runs / algo / v / f'seed{s}.log'}")
    base, filt, data = collect(runs, args.algos, args.seeds, args.fresh_n)
    plot_path, res_path = Path(args.plot), Path(args.results)
    plot(base, filt, data, plot_path)
    write_results(res_path, section(base, filt, data, args.seeds, args, os.path.relpath(plot_path, res_path.parent)),
                  heading=SECTION)
    print(f"[diversity] wrote {res_path} and {plot_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
