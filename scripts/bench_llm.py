"""Benchmark of the LLM side: what flowrl adds on top of the model's own work.

1. Generation: ``flowrl.llm.generate`` (log-probs and entropies of every sampled token, stop mask) against a bare
   ``model.generate(...)`` call with the same model, batch, length, temperature and seed (the same tokens come out).
   Target: at most 1.05x.
2. One training iteration of ``configs/arith/<config>.yaml`` through the LLM task (rollout, rewards, step
   verifier, advantage, PPO loss, backward, optimiser step), and the share of it spent in the core's advantage
   estimator plus the policy loss (forward and backward of the loss function on given log-probs). Target: at most 2%.

    python scripts/bench_llm.py                     # embedded arithmetic model, 128 rows, 40 tokens, 1 thread
    python scripts/bench_llm.py --threads 2 --repeats 7

Timings are medians over ``--repeats`` interleaved repetitions (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_generation(pipe, prompts, max_new_tokens: int, repeats: int) -> dict:
    from transformers import GenerationConfig

    from flowrl.llm.generate import generate

    ids, am = pipe.build_prompts(prompts)
    model = pipe.model.eval()
    tok = pipe.tokenizer
    bare_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def ours():
        torch.manual_seed(0)
        return generate(model, ids, am, max_new_tokens=max_new_tokens, temperature=1.0,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def bare():
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=am, generation_config=bare_cfg)

    a, b = ours(), bare()
    same = torch.equal(a.completion_ids[a.completion_mask], b[:, ids.shape[1]:][a.completion_mask])
    t_ours, t_bare = [], []
    for _ in range(repeats):  # interleaved
        t_ours.append(median_time(ours, 1))
        t_bare.append(median_time(bare, 1))
    to, tb = statistics.median(t_ours), statistics.median(t_bare)
    return {"flowrl_s": to, "bare_s": tb, "ratio": to / tb, "same_tokens": same, "tokens": int(a.completion_mask.sum())}


def bench_step(config: str, repeats: int) -> dict:
    """Time one iteration's parts through the LLM task, and the core's share (advantage + loss fwd/bwd)."""
    from accelerate import Accelerator

    from flowrl.config import load
    from flowrl.core import compute_advantages, compute_policy_loss
    from flowrl.train.config import TrainConfig
    from flowrl.train.llm_task import LLMTask
    from flowrl.train.loop import iteration_generator

    cfg = load(TrainConfig, ROOT / "configs" / "arith" / f"{config}.yaml", ["progress=false", "trackers=[]"])
    task = LLMTask(cfg, Accelerator(cpu=True))
    opt = torch.optim.AdamW([p for p in task.module.parameters() if p.requires_grad], lr=cfg.optim.lr)
    rows = []
    for it in range(repeats):
        t0 = time.perf_counter()
        roll = task.rollout(it, iteration_generator(cfg.seed, it, 0))
        batch = roll.batch.validate()
        t1 = time.perf_counter()
        adv = compute_advantages(cfg.advantage.estimator, batch, **cfg.advantage.params)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task.backward(roll, torch.arange(batch.batch_size), batch, adv, it)
        opt.step()
        t3 = time.perf_counter()
        # the loss alone, on log-probs given as a leaf: forward + backward of the core's loss function
        logp = batch.old_logp.clone().requires_grad_(True)
        t4 = time.perf_counter()
        loss, _ = compute_policy_loss(cfg.loss.name, logp, batch.old_logp, adv, batch.mask, agg=cfg.loss.agg,
                                      **cfg.loss.params)
        loss.backward()
        t5 = time.perf_counter()
        rows.append({"rollout": t1 - t0, "advantage": t2 - t1, "update": t3 - t2, "loss": t5 - t4})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    step = med["rollout"] + med["advantage"] + med["update"]
    med["step"] = step
    med["core_share"] = (med["advantage"] + med["loss"]) / step
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=128, help="generation batch (rows)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--configs", nargs="+", default=["grpo", "dual_level"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flowrl.pipelines.arithmetic import load_arithmetic, make_problems, prompt_text

    pipe = load_arithmetic()
    prompts = [prompt_text(a, b) for a, b in make_problems(args.rows, split="train", seed=0)]
    g = bench_generation(pipe, prompts, args.max_new_tokens, args.repeats)
    print(f"torch threads: {args.threads}; embedded arithmetic model; {args.rows} rows x up to {args.max_new_tokens} tokens")
    print()
    print("| generation | flowrl.llm.generate (s) | bare model.generate (s) | ratio (target <= 1.05) | same tokens |")
    print("|---|---|---|---|---|")
    print(f"| {args.rows} rows, {g['tokens']} tokens | {g['flowrl_s']:.3f} | {g['bare_s']:.3f} | {g['ratio']:.3f} | {g['same_tokens']} |")
    print()
    print("| config | step (s) | rollout (s) | update (s) | advantage (ms) | loss fwd+bwd (ms) | core share (target <= 2%) |")
    print("|---|---|---|---|---|---|---|")
    for c in args.configs:
        m = bench_step(c, args.repeats)
        print(f"| {c} | {m['step']:.3f} | {m['rollout']:.3f} | {m['update']:.3f} | {1e3 * m['advantage']:.2f} | "
              f"{1e3 * m['loss']:.2f} | {100 * m['core_share']:.2f}% |")


if __name__ == "__main__":
    main()
