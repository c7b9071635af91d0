"""Sampled evaluation of an LLM task: pass@k and the number of distinct correct solutions per problem.

Greedy accuracy says what the model's single most likely answer is worth; RL with a pass@1 reward tends to raise
it while the spread of what the model samples narrows, so that pass@k at large k stops improving (or falls). At
each evaluation :func:`pass_k_metrics` samples ``eval.pass_samples`` completions of each of ``eval.pass_problems``
held-out problems (a fixed subset, drawn once from ``eval.seed``) at the rollout's temperature / top-k / top-p
and logs

- ``pass@k`` for each k of ``eval.pass_k``: the unbiased estimator of Chen et al. (2021, Codex),
  mean over problems of 1 - C(n - c, k) / C(n, k) (:func:`flowrl.core.passk.pass_at_k`);
- ``distinct_correct``: the mean over problems of the number of different correct completions (texts compared
  after whitespace normalisation: runs of whitespace become one space, ends stripped);
- ``pass_k_max``: the largest k (the report's pass@k check compares pass@<that k> with the base model's).

Sampling draws from its own generator seeded from ``eval.seed`` (``generate`` restores torch's global RNG), so an
evaluation never moves the training run's random stream.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from flowrl.core.passk import pass_at_k
from flowrl.train.llm_data import row_meta

__all__ = ["normalise_text", "distinct_correct", "pass_subset", "pass_k_metrics", "GEN_ROWS"]

GEN_ROWS = 512  # completions per sampler call (the problems' samples, in order)


def normalise_text(text: str) -> str:
    """``text`` with every run of whitespace turned into one space and the ends stripped."""
    return " ".join(text.split())


def distinct_correct(texts: Sequence[str], correct: Sequence[bool], problem: Sequence[int], num_problems: int) -> list[int]:
    """For each problem 0..num_problems-1, how many different (whitespace-normalised) texts its correct
    completions have; ``problem[i]`` is the problem of completion i."""
    seen: list[set[str]] = [set() for _ in range(num_problems)]
    for t, ok, p in zip(texts, correct, problem):  # strings: a host-side loop over completions
        if ok:
            seen[p].add(normalise_text(t))
    return [len(s) for s in seen]


def pass_subset(num_rows: int, problems: int, seed: int) -> list[int]:
    """The held-out rows of the sampled evaluation: min(problems, num_rows) of them drawn without replacement
    from ``seed``, in increasing order (the same subset at every evaluation and in every run with this seed)."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_rows, generator=g)[:min(problems, num_rows)].tolist())


@torch.no_grad()
def pass_k_metrics(task: Any) -> dict[str, float]:
    """``pass@k`` (each k of ``eval.pass_k``), ``distinct_correct`` and ``pass_k_max`` of an LLM task (an object with
    ``cfg``, ``pipe``, ``reward``, ``score_key`` and ``eval_rows``, as :class:`flowrl.train.llm_task.LLMTask`);
    empty when ``eval.pass_problems`` is 0. See the module docstring."""
    ec, lc = task.cfg.eval, task.cfg.llm
    if ec.pass_problems == 0:
        return {}
    chosen = pass_subset(len(task.eval_rows), ec.pass_problems, ec.seed)
    n = ec.pass_samples
    rows = [task.eval_rows[i] for i in chosen for _ in range(n)]  # problem j's samples are rows j*n .. j*n+n-1
    gen = torch.Generator().manual_seed(ec.seed)
    texts: list[str] = []
    correct = []
    for start in range(0, len(rows), GEN_ROWS):  # sampler calls, each seeded by the next draw of ``gen``
        data = rows[start:start + GEN_ROWS]
        prompts = [d["prompt"] for d in data]
        g = task.pipe.generate(prompts, max_new_tokens=lc.max_new_tokens, temperature=lc.temperature, top_k=lc.top_k,
                               top_p=lc.top_p, generator=gen)
        t = task.pipe.decode(g)
        _, parts, valid, _ = task.reward.score(t, prompts, row_meta(data))
        score = torch.nan_to_num(parts[task.score_key].float(), nan=0.0)
        correct.append((valid & (score >= lc.correct_threshold)).cpu())
        texts += t
    ok = torch.cat(correct)
    P = len(chosen)
    c = ok.view(P, n).sum(dim=1)
    num = torch.full((P,), n, dtype=torch.long)
    m = {f"pass@{k}": float(pass_at_k(num, c, k).mean()) for k in ec.pass_k}
    per_problem = distinct_correct(texts, ok.tolist(), [i // n for i in range(len(texts))], P)
    m["distinct_correct"] = sum(per_problem) / P
    m["pass_k_max"] = float(max(ec.pass_k))
    return m
