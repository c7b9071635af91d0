"""Procedural reasoning tasks from the ``reasoning-gym`` package, as datasets with their own scorers.

Nothing is downloaded: every task is generated from a seed. :func:`make_task_dataset` gives a list-like
dataset of rows ``{"prompt", "answer", "entry", "task"}`` (the prompt: the English question in a template, or
for countdown a compact rendering of the numbers and target, :func:`compact_prompt`); ``entry`` is reasoning-gym's own record (question,
reference answer, metadata), JSON-serialisable, and it is what the scorer reads. The reward
``reasoning_gym`` scores completions with the task's own ``score_answer`` (reasoning-gym's
``get_score_answer_fn(task)``), reading the answer from the last ``<answer>...</answer>`` block (or the
whole completion when there is none and ``require_tag`` is False).

Tasks tested here (``TASKS``): ``countdown`` (reach the target with + - * / using the given numbers: score 1
if right, 0.05 if it evaluates but uses the wrong numbers or misses the target, 0.01 when unparseable or
empty), ``chain_sum`` and ``basic_arithmetic`` (an integer expression: 1 for the exact value, decimal
tolerant), ``leg_counting`` (count animals' legs). Any other reasoning-gym task name also works.

Safety: countdown's scorer evaluates the answer with sympy's ``parse_expr`` (which uses ``eval``). A
countdown answer with any character other than digits, ``+ - * /``, parentheses, dots and spaces is
therefore scored 0.01 (the scorer's own "unparseable" value) without reaching the scorer.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch

from .base import Meta, Parts, Reward, register_reward
from .text import _check_texts, _meta_list, extract_tag

TASKS = ("countdown", "chain_sum", "basic_arithmetic", "leg_counting")

# answers that are safe to hand to a scorer that evaluates them, and the value it gives an unparseable one
_SAFE_ANSWER = {"countdown": (re.compile(r"[\d+\-*/().\s]*"), 0.01)}

DEFAULT_TEMPLATE = (
    "{question}\nThink step by step inside <think> </think>, then give only the final answer inside "
    "<answer> </answer>."
)


PROMPT_FORMATS = ("template", "compact")


def _compact_countdown(entry: dict) -> str:
    m = entry["metadata"]
    return " ".join(str(n) for n in m["numbers"]) + f"={m['target']}:"


# task -> compact rendering of an entry's metadata (for tiny character-level models such as the embedded one)
_COMPACT = {"countdown": _compact_countdown}


def compact_prompt(entry: dict) -> str:
    """The compact prompt of a reasoning-gym record, built from its metadata instead of the English question.

    countdown: the numbers space-separated, ``=``, the target, ``:`` (numbers [3, 7, 25, 50], target 175 ->
    ``"3 7 25 50=175:"``); the answer is the bare expression (the scorer reads the whole completion).
    """
    task = _task_of(entry)
    if task not in _COMPACT:
        raise ValueError(f"prompt_format='compact' is defined for the tasks {sorted(_COMPACT)}; not for {task!r} "
                         "(use prompt_format='template')")
    return _COMPACT[task](entry)


def make_task_dataset(task: str, size: int = 1000, seed: int = 0, template: str = DEFAULT_TEMPLATE,
                      prompt_format: str = "template", **config: Any) -> list[dict]:
    """``size`` procedurally generated problems of the reasoning-gym task ``task`` (``config``: the task's own
    options, e.g. ``min_numbers=3, max_numbers=4`` for countdown). Rows: ``{"prompt": ..., "answer": reference
    answer, "entry": reasoning-gym record, "task": task}``; the prompt is ``template.format(question=...)``
    (``prompt_format="template"``) or :func:`compact_prompt` of the record (``"compact"``). Deterministic in
    ``seed``: entry ``i`` is reasoning-gym's item ``i`` of seed ``seed`` (its own RNG seeded ``seed + i``)."""
    import reasoning_gym

    if size < 1:
        raise ValueError(f"reasoning-gym task dataset size must be >= 1; got {size}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"reasoning-gym prompt_format={prompt_format!r}; valid: {list(PROMPT_FORMATS)}")
    if prompt_format == "compact" and task not in _COMPACT:
        raise ValueError(f"prompt_format='compact' is defined for the tasks {sorted(_COMPACT)}; not for {task!r} "
                         "(use prompt_format='template')")
    if prompt_format == "template" and "{question}" not in template:
        raise ValueError(f"reasoning-gym template {template!r} must contain '{{question}}'")
    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    except Exception as e:
        raise ValueError(f"reasoning-gym cannot build task {task!r} with options {config}: {type(e).__name__}: {e}. "
                         f"Tasks tested with flowrl: {list(TASKS)}") from e
    rows = []
    for i in range(size):  # dataset construction, not a training-time path
        entry = ds[i]
        prompt = template.format(question=entry["question"]) if prompt_format == "template" else compact_prompt(entry)
        rows.append({"prompt": prompt, "answer": str(entry["answer"]),
                     "entry": entry, "task": task})
    return rows


def task_meta(rows: Sequence[dict]) -> dict[str, list]:
    """The reward's ``meta`` for a batch of dataset rows: ``{"entry": [...], "answer": [...], "task": [...]}``."""
    return {"entry": [r["entry"] for r in rows], "answer": [r["answer"] for r in rows], "task": [r["task"] for r in rows]}


def _task_of(entry: dict) -> str:
    try:
        return entry["metadata"]["source_dataset"]
    except (KeyError, TypeError) as e:
        raise ValueError("reasoning_gym reward: meta['entry'] items must be reasoning-gym records "
                         "(with metadata.source_dataset); build them with make_task_dataset") from e


def score_answers(answers: Sequence[Optional[str]], entries: Sequence[dict]) -> torch.Tensor:
    """float [B]: each task's own ``score_answer(answer, entry)``; ``answers[i]`` None means no answer found."""
    from reasoning_gym import get_score_answer_fn

    fns: dict[str, Any] = {}
    out = []
    for a, e in zip(answers, entries):  # task scorers are plain Python, one sample at a time
        task = _task_of(e)
        if task not in fns:
            fns[task] = get_score_answer_fn(task)
        safe = _SAFE_ANSWER.get(task)
        if safe is not None and a is not None and not safe[0].fullmatch(a):
            out.append(safe[1])
            continue
        out.append(float(fns[task](a, e)))
    return torch.tensor(out, dtype=torch.float32)


@register_reward("reasoning_gym")
class ReasoningGymReward(Reward):
    """Outcome reward of reasoning-gym tasks: the task's own scorer on the answer in the completion.

    ``meta["entry"]``: the reasoning-gym record of each sample (:func:`make_task_dataset` rows, :func:`task_meta`).
    Options: ``answer_tag`` (default ``"answer"``; None reads the whole completion), ``require_tag`` (no tag
    block -> the scorer sees no answer). Parts: ``<name>`` (the scorer's value, float [B] in [0, 1]) and
    ``<name>/correct`` (1 iff the scorer gave 1).
    """

    def __init__(self, *, name: Optional[str] = None, on_error: str = "raise", answer_tag: Optional[str] = "answer",
                 require_tag: bool = False):
        super().__init__(name=name, on_error=on_error)
        import reasoning_gym  # noqa: F401  (fail at construction if the package is missing)

        self.answer_tag, self.require_tag = answer_tag, require_tag

    def extract(self, completion: str) -> Optional[str]:
        """The answer string the scorer sees (stripped), or None."""
        body = extract_tag(completion, self.answer_tag) if self.answer_tag else None
        if body is None and not (self.require_tag and self.answer_tag):
            body = completion
        return body.strip() if body is not None else None

    def score(self, samples, prompts, meta: Meta) -> Parts:
        texts = _check_texts(samples)
        entries = _meta_list(meta, "entry", len(texts), f"reward {self.name!r}")
        s = score_answers([self.extract(t) for t in texts], entries)
        return {self.name: s, f"{self.name}/correct": (s == 1.0).float()}
