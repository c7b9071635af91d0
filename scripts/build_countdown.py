"""Train and ship the embedded countdown model (pipelines/countdown_weights/).

A tiny character-level Llama (``pipelines/countdown.py``: hidden 128, 4 layers, 4 heads, MLP 512, tied
embeddings) learns reasoning-gym's countdown (``TASK_OPTIONS``: 3 numbers in 1..10, target 1..100) from the
generator's own reference expressions: prompt ``compact_prompt(entry)`` (``"7 2 5=17:"``), completion the
reference answer without spaces (``"5*2+7"``) then EOS. The puzzles come from reasoning-gym seeds
``--data-seed + i`` (i < ``--puzzles``), away from the trainer's pools (``llm.data_seed`` 0.. for training,
10,000,019 + eval.seed (1234).. for the held-out evaluation); the puzzle space is small, so some puzzles recur across
pools (the model learns a function of numbers and target, not a lookup). Headroom for RL: the targets are noisy
in a systematic way (a "buggy student", :func:`buggy_answer`: with probability ``--p-bug`` 0.6 every ``*`` of the
reference is written ``+``), so where a product is needed the wrong operator is the model's mode, and the run is
short (500 AdamW steps of 128 puzzles, lr 3e-3, 50 warm-up steps). The training loop is ``build_arithmetic.fit``
(AdamW, warm-up, completion-token cross-entropy), fixed seed, one CPU thread; the weights after k steps do not
depend on ``--steps`` or ``--eval-every``.

Measured (torch 2.14.1, seed 0, one thread, shared 2-core CPU): 1,052,544 parameters (4.2 MB of float32
safetensors); 20,000 puzzles generated in about 60 s, 500 steps in 406 s. Held-out (200 puzzles): greedy accuracy
0.255 (mean score 0.292), one sample at temperature 1 0.185. Along the same run (greedy / sampled): step 100
0.18 / 0.10, 200 0.235 / 0.135, 300 0.26 / 0.13, 400 0.275 / 0.17. Without the bug (``--p-bug 0``) the model
reaches 0.275 greedy at step 200 and 0.68 at step 800. ``configs/countdown/tiny_grpo.yaml`` then raises the
greedy accuracy to about 0.4 in 40 GRPO iterations (about a minute).

    python scripts/build_countdown.py                         # train, save, evaluate
    python scripts/build_countdown.py --eval-only             # evaluate the shipped weights
    python scripts/build_countdown.py --eval-every 100 --out /tmp/cd   # accuracy along the run

Evaluation: the trainer's held-out set (``make_task_dataset("countdown", 200, seed=10_000_019 + 1234, compact)``, eval.seed 1234), scored
by reasoning-gym's ``score_answer`` through the ``reasoning_gym`` reward: greedy accuracy (score 1), the mean
score, and the accuracy of one sample at temperature 1 (what a GRPO rollout sees).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_arithmetic import encode_texts, fit, save_tokenizer  # noqa: E402

from flowrl.pipelines import countdown as cd  # noqa: E402
from flowrl.rewards.reasoning_gym_tasks import ReasoningGymReward, make_task_dataset, task_meta  # noqa: E402

EVAL_SEED_BASE = 10_000_019  # flowrl.train.llm_data.load_dataset (EVAL_SEED_OFFSET): eval rows come from seed 10_000_019 + eval.seed


def puzzles(n: int, seed: int) -> list[dict]:
    return make_task_dataset("countdown", size=n, seed=seed, prompt_format="compact", **cd.TASK_OPTIONS)


def buggy_answer(expr: str, rng: random.Random, p_bug: float) -> str:
    """The "buggy student": with probability ``p_bug`` every ``*`` of the reference expression becomes ``+`` (a
    systematic confusion, so that the wrong operator is the mode where a product is needed; RL can undo it)."""
    if not 0.0 <= p_bug <= 1.0:
        raise ValueError(f"p_bug={p_bug} must lie in [0, 1]")
    return expr.replace("*", "+") if "*" in expr and rng.random() < p_bug else expr


@torch.no_grad()
def evaluate(pipe, rows: list[dict], *, max_new_tokens: int = 16, seed: int = 0) -> dict[str, float]:
    """Greedy accuracy / mean score and one-sample accuracy at temperature 1 on ``rows`` (reasoning-gym scorer)."""
    reward = ReasoningGymReward()
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    for name, temp in (("greedy", 0.0), ("sampled", 1.0)):
        scores = []
        for i in range(0, len(rows), 100):
            chunk = rows[i:i + 100]
            g = pipe.generate([r["prompt"] for r in chunk], max_new_tokens=max_new_tokens, temperature=temp, generator=gen)
            parts = reward.score(pipe.decode(g), [r["prompt"] for r in chunk], task_meta(chunk))
            scores.append(parts["reasoning_gym"])
        s = torch.cat(scores)
        out[f"{name}_accuracy"] = float((s == 1.0).float().mean())
        out[f"{name}_score"] = float(s.mean())
    out["n"] = float(len(rows))
    return out


def train(args, eval_rows: list[dict]) -> float:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = cd.build_tokenizer()
    model = LlamaForCausalLM(cd.model_config(len(tok))).float()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}; vocab {len(tok)}")
    t0 = time.time()
    data = [(r["prompt"], r["answer"].replace(" ", "")) for r in puzzles(args.puzzles, args.data_seed)]
    print(f"{len(data)} puzzles generated in {time.time() - t0:.1f} s", flush=True)

    def next_batch(step: int):
        batch = [data[rng.randrange(len(data))] for _ in range(args.batch)]
        return encode_texts(tok, [p for p, _ in batch], [buggy_answer(c, rng, args.p_bug) for _, c in batch])

    def probe(step: int) -> None:
        if args.eval_every and step % args.eval_every == 0:
            from flowrl.pipelines.causal_lm import CausalLMPipeline

            res = evaluate(CausalLMPipeline(model=model, tokenizer=tok), eval_rows)
            print(f"  step {step}: {json.dumps(res)}", flush=True)
            model.train()

    build_s = fit(model, next_batch, steps=args.steps, lr=args.lr, warmup=args.warmup, on_step=probe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    save_tokenizer(cd.build_tokenizer(), out)  # a fresh one: the probes' padding calls leave state in ``tok``
    print(f"trained {args.steps} steps in {build_s:.1f} s; saved to {out}")
    return build_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(cd.WEIGHTS_DIR), help="where to write the weights and tokenizer")
    p.add_argument("--steps", type=int, default=500, help="AdamW steps (the default gives the shipped weights)")
    p.add_argument("--batch", type=int, default=128, help="puzzles per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    p.add_argument("--p-bug", type=float, default=0.6, help="probability that a target's '*' are all written '+'")
    p.add_argument("--puzzles", type=int, default=20_000, help="training puzzles generated by reasoning-gym")
    p.add_argument("--data-seed", type=int, default=1_000_000, help="reasoning-gym seed of the training puzzles")
    p.add_argument("--eval-n", type=int, default=200, help="held-out puzzles of the evaluation")
    p.add_argument("--eval-seed", type=int, default=1234, help="the trainer's eval.seed whose held-out set is used")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every this many steps (0: only at the end)")
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate --out")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    eval_rows = puzzles(args.eval_n, EVAL_SEED_BASE + args.eval_seed)
    build_s = None
    if not args.eval_only:
        build_s = train(args, eval_rows)
    pipe = cd.load_countdown(args.out)
    t0 = time.time()
    res = evaluate(pipe, eval_rows)
    res["eval_s"] = round(time.time() - t0, 2)
    if build_s is not None:
        res["build_s"] = round(build_s, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
