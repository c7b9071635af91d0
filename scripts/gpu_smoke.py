"""One training iteration of each shipped real-model recipe on random-weight models of the published architectures,
with seconds per phase and the peak GPU memory beside the ``--dry-run`` estimate.

    python scripts/gpu_smoke.py                   # a CUDA GPU: SD3.5-medium, FLUX.1-dev, Wan2.1-T2V-1.3B, Qwen2.5-0.5B
    python scripts/gpu_smoke.py --only sd3 --group-size 8
    python scripts/gpu_smoke.py --tiny            # tiny sizes of the same classes, on the CPU, in seconds
    python scripts/gpu_smoke.py --estimate-only --world-size 8   # the --dry-run estimate of each recipe as shipped

Each model runs its recipe (configs/sd3/flow_grpo_pickscore.yaml, configs/flux/dance_grpo_hps.yaml,
configs/wan/flow_grpo.yaml, configs/countdown/grpo.yaml) through ``flowrl.train.loop.train`` with these changes,
printed per run: the model is random-weight (``scripts/smoke_models.py``; architectures in
``scripts/smoke_archs.json``); one iteration of ``--prompts`` prompts x ``--group-size`` samples (default: the
recipe's group; 4 with --tiny) on this one device; LoRA (the recipe's rank, else 32) with fp32 adapters over the bf16 base and
gradient checkpointing on every model (FLUX's recipe trains the full model, which does not fit one GPU with
AdamW); evaluation of one prompt x one sample; the LLM keeps truncated completions in the loss (a random model rarely
stops); rewards that need weights which are not cached are replaced by
``smoke_standin`` (same call signature, mean brightness) under the same names and weights.

Phases: ``rollout`` = the task's rollout (sampling, decoding, the reward, the batch) minus ``reward``; ``reward``
= the reward calls of the rollout; ``update`` = the forward/backward passes of the optimiser steps. ``peak`` =
``torch.cuda.max_memory_allocated`` from the start of the iteration to the end of the run (final evaluation and
checkpoint included); ``weights`` = memory allocated once the task is built. ``estimate`` = the preflight
estimate of ``flowrl train --dry-run`` (``flowrl.train.preflight.estimate_memory``, one rank) of the same run, read
from a config-only copy of the model's repo; ``n/a`` when there is no estimator.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a reward's weights are used when cached, never fetched (no retries)

import torch  # noqa: E402

import smoke_models  # noqa: E402  (registers smoke_sd3 / smoke_flux / smoke_wan and the stand-in reward)
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from flowrl.config import load  # noqa: E402
from flowrl.train.config import TrainConfig  # noqa: E402

RECIPES = {
    "sd3": ("configs/sd3/flow_grpo_pickscore.yaml", "SD3.5-medium (2.5B MMDiT-X) at the recipe's 512x512"),
    "flux": ("configs/flux/dance_grpo_hps.yaml", "FLUX.1-dev (12B) at the recipe's 720x720"),
    "wan": ("configs/wan/flow_grpo.yaml", "Wan2.1-T2V-1.3B at the recipe's 33 frames of 240x416"),
    "qwen": ("configs/countdown/grpo.yaml", "Qwen2.5-0.5B-shaped LLM, countdown GRPO"),
}
PROMPTS = ["a photo of a red cube on a blue table", "a watercolor painting of a fox in the snow",
           "a city street at night in the rain", "a bowl of fruit on a wooden table"]


def _has_field(section: Any, name: str) -> bool:
    import dataclasses

    return any(f.name == name for f in dataclasses.fields(section))


def overrides(model: str, base: TrainConfig, args) -> list[str]:
    """The --set overrides that turn the recipe into one smoke iteration (see the module docstring)."""
    G = args.group_size or (4 if args.tiny else base.group_size)
    o = ["iterations=1", f"prompts_per_iter={args.prompts}", f"group_size={G}", "progress=false", "trackers=[]",
         "eval.every=1000", "save_every=1000", "eval.num_per_prompt=1", "eval.grid_per_prompt=1",
         "lora.enabled=true", "gradient_checkpointing=true", "eval.table_rows=0"]
    if not base.lora.enabled:  # FLUX's recipe: full fine-tuning
        o += ["lora.rank=32", "lora.alpha=64"]
    mb = base.minibatches
    while (args.prompts * G) % mb:
        mb -= 1
    o.append(f"minibatches={mb}")
    if args.tiny:
        o += ["mixed_precision=no"]
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_smoke: no CUDA device; run with --tiny on a CPU")
    if model == "qwen":
        # a random model rarely emits EOS: with the recipe's mask_truncated every completion would be masked
        o += ["llm.eval_size=4", "llm.dataset_size=64", "llm.mask_truncated=false"]
        o += ["llm.dtype=float32", "llm.max_new_tokens=8"] if args.tiny else ["llm.dtype=bfloat16"]
        return o
    fc = base.flow
    o += [f"flow.model=smoke_{model}", f"flow.model_path={'tiny' if args.tiny else 'published'}",
          f"flow.prompts=[{', '.join(PROMPTS)}]", "flow.prompt_file=null", f"flow.eval_prompts=[{PROMPTS[0]}]"]
    if _has_field(fc, "eval_prompt_file"):
        o.append("flow.eval_prompt_file=null")
    if args.tiny:
        kw = smoke_models.arch(model, "tiny")["model_kwargs"]
        o += ["flow.dtype=float32", "flow.model_kwargs={" + ", ".join(f"{k}: {v}" for k, v in kw.items()) + "}",
              "flow.num_steps=2", "flow.eval_num_steps=1", "flow.sde_window=null", "flow.timestep_fraction=1.0"]
    else:
        o.append("flow.dtype=bfloat16")
    return o


def stand_in_rewards(cfg: TrainConfig, model: str, device) -> Optional[str]:
    """Replace the recipe's flow rewards by ``smoke_standin`` under the same names and weights unless they build
    and score one sample here (their weights cached); returns why they were replaced, or None."""
    if model == "qwen":
        return None  # countdown's reward is reasoning-gym's rule: no weights to miss
    from flowrl.rewards import build_rewards

    spec = cfg.flow.rewards
    try:
        r = build_rewards(spec)
        x = torch.rand(1, 5, 3, 64, 64) if model == "wan" else torch.rand(1, 3, 64, 64)
        r(x.to(device), ["a cat"])
        return None
    except Exception as e:  # a missing weight file, an offline hub: the reward cannot run here
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
    cfg.flow.rewards = {k: {"weight": (v.get("weight", 1.0) if isinstance(v, dict) else float(v)), "type": "smoke_standin"}
                        for k, v in spec.items()}
    return why


def estimate(cfg: TrainConfig, model: str, base: TrainConfig, args, workdir: Path) -> tuple[str, Optional[float]]:
    """The preflight memory estimate of ``flowrl train --dry-run`` for this run (text, total GiB), or n/a when
    ``flowrl.train.preflight`` has none. A flow model is estimated from a config-only copy of its repo
    (``smoke_models.write_config_repo``) under the recipe's adapter name, as the estimator would read the real one."""
    import copy

    try:
        from flowrl.train.preflight import estimate_memory
    except ImportError:
        return "n/a (flowrl.train.preflight.estimate_memory does not exist)", None
    c = copy.deepcopy(cfg)
    if model != "qwen":
        c.flow.model = base.flow.model
        c.flow.model_path = str(smoke_models.write_config_repo(model, "tiny" if args.tiny else "published",
                                                               workdir / "config_repo"))
    try:
        est = estimate_memory(c, world_size=1)
    except Exception as e:  # the estimator refuses: say why, and go on
        return f"n/a ({type(e).__name__}: {str(e)[:120]})", None
    total = getattr(est, "total", None)
    if total is None:
        return str(est), None
    text = (f"{size(total)} (params {size(est.params)}, grads {size(est.gradients)}, optimiser {size(est.optimizer)}, "
            f"activations {size(est.activations)}{'' if est.complete else '; incomplete'})")
    return text, total / 2**30


def size(b: float) -> str:
    """Bytes as GiB, or MiB below one GiB (the --tiny models)."""
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def estimate_recipes(models: list[str], world: int, extra: list[str]) -> int:
    """``--estimate-only``: the estimator's figures for the shipped recipes as they are (their batch split over
    ``world`` ranks, their precision, LoRA and checkpointing settings; ``extra`` overrides) on the published
    architectures. No GPU."""
    from transformers import Qwen2Config

    print("| recipe | model | ranks | samples per rank | estimate per GPU, GiB (not measured) | params / grads / "
          "optimiser / activations, GiB |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for m in models:
            path, what = RECIPES[m]
            if m == "qwen":
                folder = Path(d) / "qwen"
                Qwen2Config(**smoke_models.arch("qwen", "published")["model"]).save_pretrained(folder)
                sets = [f"llm.model={folder}"]
            else:
                repo = smoke_models.write_config_repo(m, "published", Path(d) / m)
                sets = [f"flow.model_path={repo}"]
            cfg = load(TrainConfig, ROOT / path, sets + extra)
            from flowrl.train.preflight import estimate_memory

            est = estimate_memory(cfg, world_size=world)
            b = cfg.prompts_per_iter * cfg.group_size // world
            g = lambda x: f"{x / 2**30:.1f}"  # noqa: E731
            print(f"| {path} | {what} | {world} | {b} | {g(est.total)}{'' if est.complete else ' (incomplete)'} | "
                  f"{g(est.params)} / {g(est.gradients)} / {g(est.optimizer)} / {g(est.activations)} |")
    return 0


class PhaseTimer:
    """Seconds per phase of the one iteration, with the device synchronised around each timed call."""

    def __init__(self, cuda: bool):
        self.cuda, self.t = cuda, {"rollout": 0.0, "reward": 0.0, "update": 0.0}
        self.in_rollout = False

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, name: str, fn, on_start=None):
        def timed(*a, **kw):
            if name == "reward" and not self.in_rollout:
                return fn(*a, **kw)  # evaluation's reward calls are not part of the iteration
            if on_start is not None:
                on_start()
            self._sync()
            t0 = time.perf_counter()
            self.in_rollout |= name == "rollout"
            try:
                return fn(*a, **kw)
            finally:
                self._sync()
                self.t[name] += time.perf_counter() - t0
                if name == "rollout":
                    self.in_rollout = False
        return timed


def run_one(model: str, args, workdir: Path) -> dict:
    from flowrl.train.algorithms import ALGORITHMS
    from flowrl.train.loop import train

    path, what = RECIPES[model]
    base = load(TrainConfig, ROOT / path)
    sets = overrides(model, base, args)
    if model == "qwen":
        size = "tiny" if args.tiny else "published"
        folder = smoke_models.write_qwen(workdir / "qwen", size, torch.float32 if args.tiny else torch.bfloat16)
        sets.append(f"llm.model={folder}")
    cfg = load(TrainConfig, ROOT / path, sets + list(args.set))
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    why = stand_in_rewards(cfg, model, device)
    print(f"\n== {model}: {what}{' (tiny sizes, CPU)' if args.tiny else ''}\n   recipe {path}, overrides: {' '.join(sets + list(args.set))}")
    own = "the recipe's own (a rule, no weights)" if model == "qwen" else "the recipe's own (weights cached)"
    print("   reward: " + (own if why is None else
                          f"STAND-IN smoke_standin (mean brightness) under the recipe's names {sorted(cfg.flow.rewards)}: {why}"))
    timer = PhaseTimer(cuda)
    mem: dict[str, float] = {}

    def reset_peak():
        if cuda and "weights" not in mem:
            mem["weights"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()

    def build(c, acc):
        task = ALGORITHMS[c.algorithm].build_task(c, acc)
        task.rollout = timer.wrap("rollout", task.rollout, on_start=reset_peak)
        task.reward.score = timer.wrap("reward", task.reward.score)
        task.backward = timer.wrap("update", task.backward)
        return task

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train(cfg, workdir / f"run_{model}", build_task=build)
    total = time.perf_counter() - t0
    t = timer.t
    row = {"model": model, "rollout_s": t["rollout"] - t["reward"], "reward_s": t["reward"], "update_s": t["update"],
           "total_s": total, "weights_gib": mem.get("weights", float("nan")),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "batch": f"{cfg.prompts_per_iter}x{cfg.group_size}"}
    row["estimate"], row["estimate_gib"] = estimate(cfg, model, base, args, workdir)
    print(f"   rollout {row['rollout_s']:.2f} s | reward {row['reward_s']:.2f} s | update {row['update_s']:.2f} s | "
          f"whole run {total:.1f} s (build and two evaluations included)")
    print("   peak GPU memory: " + (f"{row['peak_gib']:.1f} GiB (weights {row['weights_gib']:.1f} GiB)" if cuda
                                     else "n/a (CPU)") + f" | estimate: {row['estimate']}")
    return row


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes of the same classes, on the CPU")
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), default=None, help="models to run (default: all)")
    p.add_argument("--prompts", type=int, default=1, help="prompts in the iteration (default 1)")
    p.add_argument("--group-size", type=int, default=0, help="samples per prompt (default: the recipe's; 4 with --tiny)")
    p.add_argument("--set", action="append", default=[], help="extra config override, e.g. --set flow.sample_batch=8")
    p.add_argument("--keep-going", action="store_true", help="run the other models when one fails")
    p.add_argument("--estimate-only", action="store_true", help="print the --dry-run estimate of each shipped recipe "
                   "as it is, on the published architectures (no GPU, nothing trained)")
    p.add_argument("--world-size", type=int, default=8, help="ranks the recipes' batch is split over (--estimate-only)")
    args = p.parse_args(argv)
    if args.estimate_only:
        return estimate_recipes(args.only or list(RECIPES), args.world_size, list(args.set))
    diffusers_logging.set_verbosity_error()  # casting built models to bf16 warns about every class, needlessly
    if args.tiny:
        torch.set_num_threads(1)
    rows, failed = [], []
    models = args.only or list(RECIPES)
    for m in models:
        with tempfile.TemporaryDirectory() as d:
            try:
                rows.append(run_one(m, args, Path(d)))
            except Exception:
                failed.append(m)
                traceback.print_exc()
                if not args.keep_going:
                    break
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\n| model | batch | rollout s | reward s | update s | peak (measured) | weights | estimate |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = "n/a" if r["estimate_gib"] is None else size(r["estimate_gib"] * 2**30)
        peak, w = ((size(r["peak_gib"] * 2**30), size(r["weights_gib"] * 2**30)) if r["peak_gib"] == r["peak_gib"]
                   else ("n/a (CPU)", "n/a (CPU)"))
        print(f"| {r['model']} | {r['batch']} | {r['rollout_s']:.2f} | {r['reward_s']:.2f} | {r['update_s']:.2f} | "
              f"{peak} | {w} | {e} |")
    if failed:
        print(f"FAILED: {failed}")
    return 1 if failed or len(rows) < len(models) else 0


if __name__ == "__main__":
    sys.exit(main())
