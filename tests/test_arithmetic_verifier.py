"""The embedded arithmetic step verifier (rewards/arithmetic.py): exact step scores, outcome, miracles,
step segmentation, against hand-worked cases and a slow column-by-column reference written here."""
from __future__ import annotations

import math
import random
import re

import pytest
import torch

from flowrl.rewards import RewardError, build_process_reward, build_reward
from flowrl.rewards.arithmetic import (
    parse_problem,
    reference_completion,
    split_steps,
    step_index_of_chars,
    step_index_of_tokens,
    verify_arithmetic,
)

# bad input raises ValueError, or RewardError naming the reward when it comes through Reward.__call__
BAD_INPUT = (ValueError, RewardError)

NAN = float("nan")


def assert_same(a: torch.Tensor, b) -> None:
    b = torch.as_tensor(b, dtype=a.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), (a, b)
    assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), (a, b)


# --------------------------------------------------------------------------------- hand-worked cases
def test_hand_worked_addition_cases():
    p = "Q:347+985\n"
    comps = [
        "7+5+0=12\n4+8+1=13\n3+9+1=13\nA:1332",  # all right
        "7+5+0=12\n4+8+0=12\n3+9+1=13\nA:1332\n",  # forgot the carry at column 2, still right answer: miracle
        "7+5+0=12\n4+8+0=12\n3+9+1=13\nA:1322",  # wrong step and wrong answer
        "7+5+0=12\nA:1332",  # skipped steps, right answer: no wrong step, not a miracle
        "7+5+0=12\n4+8+1=13",  # no answer line
        "",  # nothing
        "hello\nA:1332\nextra",  # malformed line, right answer, garbage after the answer
    ]
    v = verify_arithmetic([p] * len(comps), comps)
    assert_same(v.step_scores, [
        [1, 1, 1, NAN],
        [1, 0, 1, NAN],
        [1, 0, 1, NAN],
        [1, NAN, NAN, NAN],
        [1, 1, NAN, NAN],
        [NAN, NAN, NAN, NAN],
        [0, NAN, 0, NAN],
    ])
    assert_same(v.correct, [1, 1, 0, 1, 0, 0, 1])
    assert_same(v.miracle, [0, 1, 0, 0, 0, 0, 1])
    assert_same(v.all_steps_correct, [1, 0, 0, 0, 0, 0, 0])
    assert v.num_steps.tolist() == [4, 4, 4, 2, 2, 0, 3]


def test_hand_worked_subtraction_and_uneven_lengths():
    assert reference_completion("Q:985-347\n") == "5-7-0=-2\n8-4-1=3\n9-3-0=6\nA:638"
    assert reference_completion("Q:3-8\n") == "3-8-0=-5\nA:-5"
    assert reference_completion("Q:47+985\n") == "7+5+0=12\n4+8+1=13\n0+9+1=10\nA:1032"
    assert reference_completion("Q:1000-1\n") == "0-1-0=-1\n0-0-1=-1\n0-0-1=-1\n1-0-1=0\nA:999"
    v = verify_arithmetic(
        ["Q:985-347\n", "Q:985-347\n", "Q:3-8"],
        ["5-7-0=-2\n8-4-0=4\n9-3-0=6\nA:638", "5-7-0=8\n8-4-1=3\n9-3-0=6\nA:648", "3-8-0=-5\nA:-5"],
    )
    assert_same(v.step_scores, [[1, 0, 1, NAN], [0, 1, 1, NAN], [1, NAN, NAN, NAN]])
    assert_same(v.correct, [1, 0, 1])
    assert_same(v.miracle, [1, 0, 0])


def test_registered_reward_and_process_reward():
    r = build_reward("arithmetic")
    parts = r(["7+5+0=12\n4+8+0=12\n3+9+1=13\nA:1332", "A:5"], ["Q:347+985\n", "Q:2+3\n"])
    assert_same(parts["arithmetic"], [1, 1])
    assert_same(parts["arithmetic/miracle"], [1, 0])
    assert_same(parts["arithmetic/step_accuracy"], [2 / 3, NAN])
    pr = build_process_reward("arithmetic_steps", num_steps=5)
    s = pr(["Q:347+985\n"], [split_steps("7+5+0=12\n4+8+0=12\n")])
    assert_same(s, [[1, 0, NAN, NAN, NAN]])
    with pytest.raises(TypeError):
        pr(["Q:347+985\n"], ["7+5+0=12"])  # a string, not a list of steps


def test_bad_prompt_raises_or_masks():
    r = build_reward("arithmetic")
    with pytest.raises(BAD_INPUT, match="Q:<digits>"):
        r(["A:3"], ["what is 1+2?"])
    rm = build_reward("arithmetic", on_error="mask")
    parts = rm(["A:3", "A:3"], ["what is 1+2?", "Q:1+2\n"])
    assert parts["arithmetic/valid"].tolist() == [False, True]
    assert math.isnan(parts["arithmetic"][0]) and parts["arithmetic"][1] == 1.0
    with pytest.raises(ValueError):
        parse_problem("Q:3*4")


# --------------------------------------------------------------------------------- slow reference
def slow_reference(prompt: str, completion: str):
    """Column arithmetic by hand: parse each line, recompute the column from the digits and the true carry."""
    m = re.match(r"Q:(\d+)([+-])(\d+)", prompt.strip())
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    truth = a + b if op == "+" else a - b
    ncol = max(len(str(a)), len(str(b)))
    carry = [0]
    for k in range(ncol):
        x, y = (a // 10**k) % 10, (b // 10**k) % 10
        if op == "+":
            carry.append((x + y + carry[k]) // 10)
        else:
            carry.append(1 if x - y - carry[k] < 0 else 0)
    lines = completion.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    scores, correct, answered = [], 0.0, False
    for k, line in enumerate(lines):
        line = line.strip()
        if answered:
            scores.append(0.0)
            continue
        if line.startswith("A:") and re.fullmatch(r"-?\d+", line[2:]):
            answered = True
            correct = float(int(line[2:]) == truth)
            scores.append(NAN)
            continue
        mm = re.fullmatch(r"(\d)([+-])(\d)\2(\d)=(-?\d+)", line)
        ok = False
        if mm and k < ncol and mm.group(2) == op:
            x, y, c, s = int(mm.group(1)), int(mm.group(3)), int(mm.group(4)), int(mm.group(5))
            want_x, want_y = (a // 10**k) % 10, (b // 10**k) % 10
            res = x + y + c if op == "+" else x - y - c
            ok = (x, y, c) == (want_x, want_y, carry[k]) and s == res and str(s) == mm.group(5)
        scores.append(1.0 if ok else 0.0)
    miracle = float(correct == 1.0 and any(s == 0.0 for s in scores))
    return scores, correct, miracle


def corrupt(rng: random.Random, text: str) -> str:
    lines = text.split("\n")
    for _ in range(rng.randint(0, 2)):
        k = rng.randrange(len(lines))
        kind = rng.random()
        if kind < 0.3:  # change one character to a digit
            s = lines[k]
            if s:
                j = rng.randrange(len(s))
                lines[k] = s[:j] + str(rng.randint(0, 9)) + s[j + 1:]
        elif kind < 0.5:  # drop the carry
            lines[k] = re.sub(r"([+-])1=", r"\g<1>0=", lines[k])
        elif kind < 0.7:
            del lines[k]
            if not lines:
                lines = [""]
        elif kind < 0.85:
            lines.insert(k, "garbage")
        else:
            lines = lines[: k + 1]
    return "\n".join(lines) + ("\n" if rng.random() < 0.3 else "")


def test_random_against_slow_reference():
    rng = random.Random(0)
    prompts, comps = [], []
    for _ in range(300):
        a, b = rng.randint(0, 99999), rng.randint(0, 9999)
        if rng.random() < 0.5:
            a, b = b, a
        op = rng.choice("+-")
        p = f"Q:{a}{op}{b}\n"
        prompts.append(p)
        comps.append(corrupt(rng, reference_completion(p)))
    v = verify_arithmetic(prompts, comps)
    S = v.step_scores.shape[1]
    n_miracle = 0
    for i, (p, c) in enumerate(zip(prompts, comps)):
        scores, correct, miracle = slow_reference(p, c)
        assert_same(v.step_scores[i], scores + [NAN] * (S - len(scores)))
        assert v.correct[i].item() == correct and v.miracle[i].item() == miracle, (p, c)
        n_miracle += miracle
    assert n_miracle > 5  # the corruptions do produce miracles


# --------------------------------------------------------------------------------- segmentation
def test_step_segmentation_matches_lines():
    text = "7+5+0=12\n4+8+1=13\nA:1332\n"
    idx = step_index_of_chars(text)
    lines = split_steps(text)
    assert len(lines) == 3
    for k, line in enumerate(lines):  # every character of line k (and its newline) is in step k
        start = sum(len(l) + 1 for l in lines[:k])
        assert idx[start: start + len(line) + 1].tolist() == [k] * (len(line) + 1)
    # tokens: multi-character tokens, a token that contains a newline inside, ragged batch
    toks = [["7+", "5+0", "=12\n", "4", "+8+1=13", "\nA", ":1332"], ["A:", "5"]]
    step, mask = step_index_of_tokens(toks, pad_value=0)
    assert step.tolist() == [[0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[True] * 7, [True, True] + [False] * 5]
    # slow reference: newlines in the concatenated text before each token's first character
    for b, ts in enumerate(toks):
        for t in range(len(ts)):
            assert step[b, t].item() == "".join(ts[:t]).count("\n")
