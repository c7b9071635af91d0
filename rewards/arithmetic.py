"""The embedded arithmetic step verifier: an exact check of every step of a column-arithmetic solution.

Format (the embedded arithmetic LM is trained on it)::

    prompt      Q:347+985\\n
    completion  7+5+0=12\\n4+8+1=13\\n3+9+1=13\\nA:1332

Addition: one line per column, digits right to left, ``a+b+c=s`` with ``a``, ``b`` the column's digits
(0 past the end of the shorter operand), ``c`` the carry into the column (0 for the first) and
``s = a + b + c``; the carry out is ``s // 10``. The final carry is not a step of its own: it is the
leading digit of the answer. The last line is ``A:<a+b>``.

Subtraction (``Q:985-347\\n``): one line per column, ``a-b-w=d`` with ``w`` the borrow into the column
(0 for the first) and ``d = a - b - w`` written as a signed integer (``5-7-0=-2``); the column's digit is
``d mod 10`` and the borrow out is ``1 if d < 0 else 0``. Completion for 985-347::

    5-7-0=-2\\n8-4-1=3\\n9-3-0=6\\nA:638

The answer line holds the exact difference (negative when ``a < b``: ``A:-5``).

Scoring (exact, model-free):

- The completion is split into **lines** (:func:`split_steps`; a trailing newline does not open a line).
  Line ``k`` is step ``k``: the same index :func:`step_index_of_tokens` gives the tokens of that line.
- A calculation line ``k`` scores 1 iff it equals, character for character after stripping surrounding
  whitespace, the reference line of column ``k`` (:func:`reference_steps`): right digits, the *true*
  carry/borrow into the column and the exact column result. Any other line before the answer (a wrong
  step, a malformed line, a step past the last column) scores 0.
- The first line of the form ``A:<integer>`` is the answer line; its step score is NaN (it is scored by
  the outcome, not as a step). Lines after it score 0 (garbage after the answer).
- Past a completion's last line the step score is NaN (no step).
- outcome ``correct`` = 1 iff the answer line exists and its integer equals the true result.
- ``miracle`` = 1 iff ``correct`` and at least one step scored 0 (a right answer after a wrong step).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .base import Meta, Parts, Reward, register_process_reward, register_reward

_PROMPT_RE = re.compile(r"^\s*Q:(\d+)([+-])(\d+)\s*$")
_ANSWER_RE = re.compile(r"^A:(-?\d+)$")


def parse_problem(prompt: str) -> tuple[int, str, int]:
    """``"Q:347+985\\n"`` -> ``(347, "+", 985)``. Raises ValueError naming the prompt and the valid form."""
    if not isinstance(prompt, str):
        raise TypeError(f"arithmetic prompt must be a str like 'Q:347+985\\n'; got {type(prompt).__name__}")
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(f"arithmetic prompt {prompt!r} is not of the form 'Q:<digits>+<digits>' or 'Q:<digits>-<digits>'")
    return int(m.group(1)), m.group(2), int(m.group(3))


def reference_steps(a: int, op: str, b: int) -> list[str]:
    """The correct calculation lines of ``a op b`` (one per column, right to left), without the answer line.

    Addition: ``f"{x}+{y}+{c}={x+y+c}"``, carry ``c' = (x+y+c) // 10``.
    Subtraction: ``f"{x}-{y}-{w}={x-y-w}"``, borrow ``w' = 1 if x-y-w < 0 else 0``.
    """
    if a < 0 or b < 0:
        raise ValueError(f"arithmetic operands must be non-negative; got {a}, {b}")
    if op not in ("+", "-"):
        raise ValueError(f"arithmetic operator {op!r} is not valid; valid: '+', '-'")
    da, db = str(a)[::-1], str(b)[::-1]
    n = max(len(da), len(db))
    lines, c = [], 0
    for k in range(n):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        if op == "+":
            s = x + y + c
            lines.append(f"{x}+{y}+{c}={s}")
            c = s // 10
        else:
            d = x - y - c
            lines.append(f"{x}-{y}-{c}={d}")
            c = 1 if d < 0 else 0
    return lines


def reference_completion(prompt: str) -> str:
    """The fully correct completion of an arithmetic prompt (steps then ``A:<result>``)."""
    a, op, b = parse_problem(prompt)
    result = a + b if op == "+" else a - b
    return "\n".join(reference_steps(a, op, b) + [f"A:{result}"])


def split_steps(completion: str) -> list[str]:
    """The lines of a completion (its steps). A final newline does not open an empty last line."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str; got {type(completion).__name__}")
    if completion == "":
        return []
    lines = completion.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def step_index_of_chars(text: str) -> Tensor:
    """long [len(text)]: the step (line) index of each character; a newline belongs to the line it ends.

    index[i] = number of newlines in text[:i] (an exclusive cumulative count).
    """
    nl = torch.tensor([ch == "\n" for ch in text], dtype=torch.long)
    return torch.cumsum(nl, 0) - nl


def step_index_of_tokens(token_texts: Sequence[Sequence[str]], pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """Map the tokens of each completion to reasoning steps by newline.

    ``token_texts[b][t]`` is the decoded text of token t of completion b (ragged). A token's step is the
    number of newline characters in the tokens before it: step[b, t] = sum_{t' < t} count("\\n", token[b, t']).
    So a token that contains a newline still belongs to the step it ends, and a trailing newline does not
    open a new step, matching :func:`split_steps` and the step scores of this module.

    Returns (step long [B, T], mask bool [B, T]) with T the longest completion; padding gets ``pad_value``.
    """
    B = len(token_texts)
    T = max((len(t) for t in token_texts), default=0)
    counts = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, toks in enumerate(token_texts):  # string work, outside the core
        if toks:
            counts[b, : len(toks)] = torch.tensor([s.count("\n") for s in toks], dtype=torch.long)
            mask[b, : len(toks)] = True
    step = torch.cumsum(counts, 1) - counts
    return torch.where(mask, step, torch.full_like(step, pad_value)), mask


@dataclass
class ArithmeticVerdict:
    """The verifier's result for a batch.

    step_scores: float [B, S] (1 right step, 0 wrong, NaN answer line / no step); S = most lines in the batch.
    correct: float [B] (1 iff the answer is right); miracle: float [B] (right answer after a wrong step);
    all_steps_correct: float [B] (1 iff there is exactly one right step per column and the answer is right);
    num_steps: long [B] (lines of each completion).
    """

    step_scores: Tensor
    correct: Tensor
    miracle: Tensor
    all_steps_correct: Tensor
    num_steps: Tensor


def _score_lines(prompt: str, lines: Sequence[str]) -> tuple[list[float], bool, bool]:
    a, op, b = parse_problem(prompt)
    truth = a + b if op == "+" else a - b
    ref = reference_steps(a, op, b)
    scores: list[float] = []
    correct, answered, exact = False, False, True
    for k, line in enumerate(lines):
        s = line.strip()
        if answered:
            scores.append(0.0)
            exact = False
            continue
        m = _ANSWER_RE.match(s)
        if m is not None:
            answered = True
            # int() of over 4300 digits raises (CPython's limit); no true result is that long
            correct = len(m.group(1)) <= 1000 and int(m.group(1)) == truth
            scores.append(float("nan"))
            exact = exact and k == len(ref)
            continue
        ok = k < len(ref) and s == ref[k]
        exact = exact and ok
        scores.append(1.0 if ok else 0.0)
    return scores, correct, exact and answered and correct


def verify_arithmetic(prompts: Sequence[str], completions: Sequence[Sequence[str]] | Sequence[str],
                      num_steps: Optional[int] = None) -> ArithmeticVerdict:
    """Check every step and the answer of a batch of arithmetic completions (see the module docstring).

    ``completions``: B strings, or B lists of step lines (already split). ``num_steps``: the width S of
    ``step_scores`` (default: the most lines in the batch); a completion with more lines raises.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"verify_arithmetic: {len(prompts)} prompts but {len(completions)} completions")
    rows, correct, exact = [], [], []
    for p, c in zip(prompts, completions):  # string checks, outside the core
        lines = split_steps(c) if isinstance(c, str) else list(c)
        s, ok, ex = _score_lines(p, lines)
        rows.append(s)
        correct.append(ok)
        exact.append(ex)
    S = max((len(r) for r in rows), default=0) if num_steps is None else int(num_steps)
    if any(len(r) > S for r in rows):
        raise ValueError(f"verify_arithmetic: a completion has {max(len(r) for r in rows)} lines > num_steps={S}")
    scores = torch.full((len(rows), S), float("nan"))
    for b, r in enumerate(rows):
        if r:
            scores[b, : len(r)] = torch.tensor(r)
    correct_t = torch.tensor(correct, dtype=torch.float32)
    any_wrong = (scores == 0).any(dim=1)
    return ArithmeticVerdict(
        step_scores=scores,
        correct=correct_t,
        miracle=(correct_t.bool() & any_wrong).float(),
        all_steps_correct=torch.tensor(exact, dtype=torch.float32),
        num_steps=torch.tensor([len(r) for r in rows], dtype=torch.long),
    )


@register_reward("arithmetic")
class ArithmeticReward(Reward):
    """Outcome reward of the embedded arithmetic task: 1 iff the ``A:`` line holds the exact result.

    Parts (B = number of completions): ``arithmetic`` float [B] (the score), ``arithmetic/miracle``
    (right answer after a wrong step), ``arithmetic/all_steps_correct``, ``arithmetic/step_accuracy``
    (mean of the step scores over the scored lines; NaN when a completion has none).
    A prompt not of the form ``Q:<a>+<b>`` / ``Q:<a>-<b>`` raises (or, with on_error="mask", marks that sample invalid).
    """

    def score(self, samples: Sequence[str], prompts: Sequence[str], meta: Meta) -> Parts:
        v = verify_arithmetic(prompts, samples)
        scored = torch.isfinite(v.step_scores)
        n = scored.sum(1)
        acc = torch.where(scored, v.step_scores, torch.zeros_like(v.step_scores)).sum(1) / n.clamp(min=1)
        acc = torch.where(n > 0, acc, torch.full_like(acc, float("nan")))
        return {
            self.name: v.correct,
            f"{self.name}/miracle": v.miracle,
            f"{self.name}/all_steps_correct": v.all_steps_correct,
            f"{self.name}/step_accuracy": acc,
        }


@register_process_reward("arithmetic_steps")
class ArithmeticStepReward:
    """Process reward of the embedded arithmetic task: ``(prompts, steps, meta) -> float [B, S]``.

    ``steps[b]`` are the lines of completion b (:func:`split_steps`); a step scores 1 if it equals the
    reference line of its column, 0 otherwise, NaN for the answer line and past the last line.
    ``num_steps`` fixes S (default: the most lines in the batch).
    """

    name = "arithmetic_steps"

    def __init__(self, *, name: str = "arithmetic_steps", num_steps: Optional[int] = None):
        self.name = name
        self.num_steps = num_steps

    def __call__(self, prompts: Sequence[str], steps: Sequence[Sequence[str]], meta: Meta = None) -> Tensor:
        if any(isinstance(s, str) for s in steps):
            raise TypeError("arithmetic_steps: steps must be a list of step lists (use split_steps(completion))")
        return verify_arithmetic(prompts, steps, num_steps=self.num_steps).step_scores
