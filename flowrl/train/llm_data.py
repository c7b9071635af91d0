"""The LLM task's data: the training and evaluation problems, their reward metadata, and the merge of the
reward metrics of several scoring calls.

A row is ``{"prompt": str}`` (the embedded arithmetic problems) or a reasoning-gym row with its ``entry``
(``flowrl.rewards.reasoning_gym_tasks.make_task_dataset``), whose metadata the verifier reads.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from flowrl.train.config import TrainConfig

# the evaluation set of a reasoning-gym task is drawn with this seed offset from eval.seed (apart from training)
EVAL_SEED_OFFSET = 10_000_019


def load_dataset(cfg: "TrainConfig") -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of ``cfg.llm``: ``dataset_size`` training problems drawn with
    ``data_seed`` and ``eval_size`` held-out problems drawn with ``eval.seed``."""
    lc = cfg.llm
    if lc.dataset == "arithmetic":
        from flowrl.pipelines.arithmetic import make_problems, prompt_text

        train = [{"prompt": prompt_text(a, b)} for a, b in make_problems(lc.dataset_size, split="train",
                                                                           seed=lc.data_seed, digits=lc.digits)]
        ev = [{"prompt": prompt_text(a, b)} for a, b in make_problems(lc.eval_size, split="heldout",
                                                                        seed=cfg.eval.seed, digits=lc.digits)]
        return train, ev
    from flowrl.rewards.reasoning_gym_tasks import DEFAULT_TEMPLATE, make_task_dataset

    tpl = lc.template or DEFAULT_TEMPLATE
    fmt = lc.prompt_format
    train = make_task_dataset(lc.task, size=lc.dataset_size, seed=lc.data_seed, template=tpl, prompt_format=fmt,
                              **lc.task_options)
    ev = make_task_dataset(lc.task, size=lc.eval_size, seed=EVAL_SEED_OFFSET + cfg.eval.seed, template=tpl,
                           prompt_format=fmt, **lc.task_options)
    return train, ev


def default_rewards(cfg: "TrainConfig") -> dict:
    """The outcome rewards of ``cfg.llm`` (``llm.rewards``, or the dataset's own verifier when empty)."""
    lc = cfg.llm
    return dict(lc.rewards) or {("arithmetic" if lc.dataset == "arithmetic" else "reasoning_gym"): {"weight": 1.0}}


def row_meta(rows: list[dict]) -> Optional[dict]:
    """The reward metadata of ``rows`` (reasoning-gym entries), or None for rows that carry none."""
    if "entry" not in rows[0]:
        return None
    from flowrl.rewards.reasoning_gym_tasks import task_meta

    return task_meta(rows)


def merge_reward_metrics(items: list[tuple[int, dict]]) -> dict[str, float]:
    """Reward metrics of several scored chunks ``[(rows, metrics)]``: invalid counts add up, means are weighted
    by rows (NaN where no chunk has a finite value)."""
    out: dict[str, float] = {}
    keys = {k for _, m in items for k in m}
    for k in sorted(keys):
        vals = [(n, m[k]) for n, m in items if k in m]
        if k.endswith("invalid"):
            out[k] = float(sum(v for _, v in vals))
        else:
            fin = [(n, v) for n, v in vals if math.isfinite(v)]
            out[k] = sum(n * v for n, v in fin) / sum(n for n, _ in fin) if fin else float("nan")
    return out
