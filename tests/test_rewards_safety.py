"""No evaluation of untrusted text, and rewards under a hard deadline (rewards/safe_eval.py, rewards/scoring.py,
the reasoning_gym and math_verify rewards).

Every attack here is an answer (or a request's ``meta.entry``) that, scored by reasoning-gym's or sympy's own
code, runs a command, changes the interpreter or holds it for hours; each test asserts that nothing ran, that
the sample scored 0 with its reason counted, and that scoring returned in bounded time. Attacks that would
freeze the interpreter (``9**9**9``, ``$9^{9^{9}}$``) run in a child process with a time limit, so that a
regression fails the test instead of hanging the suite.
"""
from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import textwrap
import time
from fractions import Fraction

import pytest

from flowrl.rewards import RewardError, build_reward

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _entry(task, answer="", **metadata):
    return {"question": "q", "answer": answer, "metadata": {"source_dataset": task, **metadata}}


def _touch(path) -> str:
    """Python that creates ``path`` if anything evaluates it."""
    return f"__import__('os').system('touch {path}')"


# --------------------------------------------------------------------------------- the safe evaluator
def test_safe_eval_values_are_exact():
    from flowrl.rewards.safe_eval import safe_eval

    cases = {
        "(25+50)*7/3": Fraction(175), "1/3 + 1/6": Fraction(1, 2), "0.1 + 0.2": Fraction(3, 10),
        "2**-3": Fraction(1, 8), "-(2**2)": Fraction(-4), "-2**2": Fraction(-4), "(-2)**2": Fraction(4),
        "+7 - -3": Fraction(10), "1e3 / 8": Fraction(125), ".5*4": Fraction(2), "2**100": Fraction(2**100),
        "  6 * (7)  ": Fraction(42), "(1/3)**3": Fraction(1, 27),
        # literals on later lines (a line ends at \\r\\n, \\r or \\n): each read from its own line's columns
        "(1 +\n 2\r\n*3\r+ (\n1e2\n))": Fraction(107), "(0.5\r\n+\r\n.25)": Fraction(3, 4),
    }
    for text, want in cases.items():
        got = safe_eval(text)
        assert got == want and isinstance(got, Fraction), (text, got)


@pytest.mark.parametrize("text, reason", [
    ("9**9**9", "exponent"),                   # 9**387420489: hours of big-integer work
    ("2**2**2**2**2", "exponent"),             # 2**65536, then its power
    ("(9**64)**64", "digits"),                 # each exponent small, the result 3900 digits
    ("99999999999**10", "digits"),             # refused before computing
    ("10**60 * 10**60", "digits"),             # intermediate product
    ("1/" + "7" * 101, "digits"),              # a long literal
    ("1e999", "digits"),                       # a literal's exponent
    ("1e-999", "digits"),
    ("4**0.5", "exponent"),                    # only integer powers
    ("-" * 150 + "1", "depth"),                # unary chain
    ("1+" * 150 + "1", "depth"),               # a long left-leaning sum
    ("(" * 30 + "1+" * 300 + "1" + ")" * 30, "length"),
    ("1/0", "zero_division"), ("0**-1", "zero_division"),
    ("x + 1", "node"), ("abs(-1)", "node"), ("(1).real", "node"), ("[1][0]", "node"), ("1 < 2", "node"),
    ("'1'", "node"), ("True + 1", "node"), ("0x10", "node"), ("1_000", "node"), ("2j", "node"),
    ("(1\n+\r\n0x10)", "node"), ("(1 +\r 1_0)", "node"), ("1 + 'é'", "node"),
    ("lambda: 1", "node"), ("3 7", "syntax"), ("", "syntax"), ("1;2", "syntax"), ("(1", "syntax"),
])
def test_safe_eval_refuses_with_reason(text, reason):
    from flowrl.rewards.safe_eval import UnsafeExpression, safe_eval

    t0 = time.perf_counter()
    with pytest.raises(UnsafeExpression) as e:
        safe_eval(text)
    assert e.value.reason == reason, (text, e.value)
    assert time.perf_counter() - t0 < 0.05  # refused before the work, not after


def test_safe_eval_limits_bound_the_work_of_any_input():
    """Loops written from the grammar: the worst inputs of the default limits still finish in milliseconds."""
    from flowrl.rewards.safe_eval import Limits, UnsafeExpression, safe_eval

    worst = [
        "*".join(["9" * 100] * 2),              # largest literals multiplied
        "*".join(["(9**100)"] * 40),            # powers at the exponent limit, multiplied
        "/".join(["7"] * 200),                  # a long chain of divisions
        "(" * 20 + "+".join(["1/" + str(p) for p in (3, 7, 11, 13, 17, 19, 23, 29, 31, 37)] * 4) + ")" * 20,
        "2**100**100", "(2**100)**100", "((2**10)**10)**10",
    ]
    for text in worst:
        t0 = time.perf_counter()
        try:
            v = safe_eval(text[:512])
            assert max(len(str(v.numerator)), len(str(v.denominator))) <= Limits().max_digits + 1
        except UnsafeExpression:
            pass
        assert time.perf_counter() - t0 < 0.05, text[:40]


def test_safe_eval_runs_no_code():
    from flowrl.rewards.safe_eval import UnsafeExpression, safe_eval

    for attack in [_touch("/nonexistent/never"), "__import__('builtins').setattr(__import__('builtins'), 'PWN', 1)",
                   "().__class__.__base__.__subclasses__()", "[x for x in (1,)]", "(lambda: 1)()"]:
        with pytest.raises(UnsafeExpression) as e:
            safe_eval(attack)
        assert e.value.reason in ("node", "syntax")
    assert not hasattr(builtins, "PWN")


def test_safe_eval_limits_are_validated():
    from flowrl.rewards.safe_eval import Limits, UnsafeExpression, safe_eval

    assert safe_eval("2**10", Limits(max_exponent=10)) == 1024
    with pytest.raises(UnsafeExpression, match="exponent"):
        safe_eval("2**11", Limits(max_exponent=10))
    with pytest.raises(UnsafeExpression, match="length"):
        safe_eval("1+1", Limits(max_length=2))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_depth"):
            Limits(max_depth=bad)


# --------------------------------------------------------------------------------- reasoning-gym attacks
def test_reasoning_gym_attacks_run_nothing_and_score_zero(tmp_path):
    """The policy's (or a client's) answer goes to puzzle24's and countdown's scorers; reasoning-gym's own would
    hand it to sympy's parse_expr, i.e. eval."""
    r = build_reward("reasoning_gym")
    marks = [tmp_path / f"m{i}" for i in range(3)]
    cd = _entry("countdown", numbers=[3, 7, 25, 50], target=175)
    p24 = _entry("puzzle24", "10*(8 - 5) - 6", numbers=[8, 5, 10, 6])
    samples = [f"<answer>{_touch(marks[0])}</answer>", f"<answer>{_touch(marks[1])}</answer>",
               f"<answer>(lambda: {_touch(marks[2])})()</answer>", "<answer>10*(8 - 5) - 6</answer>"]
    parts = r(samples, [""] * 4, {"entry": [p24, cd, p24, p24]})
    assert not any(m.exists() for m in marks)
    assert parts["reasoning_gym"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert parts["reasoning_gym/rejected"].tolist() == [1, 1, 1, 0]


def test_reasoning_gym_unsafe_tasks_are_refused(tmp_path):
    """A request's meta.entry names the scorer: a task whose reasoning-gym scorer evaluates text is refused,
    whatever the answer (polynomial_multiplication's parse_expr, number_sorting's eval of the entry)."""
    r = build_reward("reasoning_gym")
    mark = tmp_path / "poly"
    with pytest.raises(RewardError, match="'polynomial_multiplication' is not exposed.*countdown"):
        r([f"<answer>{_touch(mark)}</answer>"], [""], {"entry": [_entry("polynomial_multiplication", "x**2")]})
    for task in ("intermediate_integration", "propositional_logic", "codeio", "no_such_task", None, 3):
        with pytest.raises(RewardError, match="is not exposed"):
            r(["<answer>1</answer>"], [""], {"entry": [_entry(task, "1")]})
    assert not mark.exists()


def test_number_sorting_never_evaluates_the_entry(tmp_path):
    r = build_reward("reasoning_gym")
    mark = tmp_path / "ns"
    bad = _entry("number_sorting", _touch(mark), direction="ascending")
    with pytest.raises(RewardError, match="number_sorting.*list literal"):
        r(["<answer>[1, 2]</answer>"], [""], {"entry": [bad]})
    assert not mark.exists()
    good = _entry("number_sorting", "['-1.5', '2.0', '30.0']", direction="ascending")
    parts = r(["<answer>['-1.5', '2.0', '30.0']</answer>", "<answer>[-1.5, 2, 30.4]</answer>",
               "<answer>[2, -1.5, 30]</answer>", f"<answer>{_touch(mark)}</answer>", "<answer>" + "[" * 5000 + "</answer>"],
              [""] * 5, {"entry": [good] * 5})
    assert parts["reasoning_gym"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert not mark.exists()


def _run_child(code: str, limit_s: float) -> dict:
    """Run ``code`` in a fresh interpreter (it prints one JSON line last); fail if it does not end in time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                             timeout=limit_s, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scoring did not return within {limit_s} s (the interpreter was held)")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_countdown_power_tower_is_refused_at_once():
    """``9**9**9`` passes a character filter of digits and operators; evaluated it holds the interpreter
    (and its GIL) for hours. Scored from a thread, as a server does, while the main thread keeps ticking."""
    res = _run_child("""
        import json, threading, time
        from flowrl.rewards import build_reward
        r = build_reward("reasoning_gym")
        e = {"question": "q", "answer": "", "metadata": {"source_dataset": "countdown", "numbers": [9, 9, 9], "target": 1}}
        r(["<answer>1</answer>"], [""], {"entry": [e]})  # warm: the worker process is up
        out, t0 = {}, time.monotonic()
        th = threading.Thread(target=lambda: out.update(r(["<answer>9**9**9</answer>"], [""], {"entry": [e]})), daemon=True)
        th.start()
        ticks = 0
        while th.is_alive() and time.monotonic() - t0 < 20:
            time.sleep(0.01); ticks += 1
        print(json.dumps({"done": not th.is_alive(), "s": time.monotonic() - t0, "ticks": ticks,
                          "parts": {k: v.tolist() for k, v in out.items()}}))
    """, limit_s=90)
    assert res["done"] and res["s"] < 5, res
    assert res["parts"]["reasoning_gym"] == [0.0] and res["parts"]["reasoning_gym/rejected"] == [1.0]


@pytest.mark.slow
def test_math_verify_runaway_is_stopped_at_the_deadline():
    """math-verify hands ``$9^{9^{9}}$`` to sympy, which computes 9**387420489; its own timeouts are signals
    that only work on the main thread. The reward runs each sample in a worker killed at ``timeout_s``: the
    call returns after about that long, the sample scores 0 and is counted in ``math_verify/timeout``, and the
    calling process keeps running meanwhile (its main thread ticks)."""
    res = _run_child("""
        import json, threading, time
        from flowrl.rewards import build_reward
        r = build_reward("math_verify")
        r(["<answer>1</answer>"], [""], {"answer": ["1"]})  # warm: the worker process is up
        out, t0 = {}, time.monotonic()
        batch = ["<answer>$9^{9^{9}}$</answer>", "<answer>2</answer>"]
        th = threading.Thread(target=lambda: out.update(r(batch, ["", ""], {"answer": ["1", "2"]})), daemon=True)
        th.start()
        ticks = 0
        while th.is_alive() and time.monotonic() - t0 < 40:
            time.sleep(0.01); ticks += 1
        print(json.dumps({"done": not th.is_alive(), "s": time.monotonic() - t0, "ticks": ticks,
                          "parts": {k: v.tolist() for k, v in out.items()}}))
    """, limit_s=120)
    assert res["done"], res
    assert 4.5 < res["s"] < 15, res  # the default deadline is 5 s; then a fresh worker scores the second sample
    assert res["ticks"] > 100 * res["s"] / 4, res  # the caller's main thread was not held (10 ms ticks)
    assert res["parts"]["math_verify"] == [0.0, 1.0]
    assert res["parts"]["math_verify/timeout"] == [1.0, 0.0]


def test_deadline_scorer_marks_the_late_sample_and_reports_errors():
    from flowrl.rewards.scoring import DeadlineScorer, ScorerError

    s = DeadlineScorer("test", timeout_s=1.0)
    s.map(time.sleep, [0.0])  # the worker is up
    t0 = time.monotonic()
    values, late = s.map(time.sleep, [0.0, 60.0, 0.0])
    assert late == [False, True, False] and values == [None, None, None]
    assert time.monotonic() - t0 < 10
    with pytest.raises(ScorerError, match="sample 1: ValueError"):
        s.map(time.sleep, [0.0, -1.0])  # sleep(-1) raises in the worker
    s.close()
    # many samples per round trip: a late (or failing) chunk is scored again sample by sample
    c = DeadlineScorer("test", timeout_s=1.0, chunk=3)
    t0 = time.monotonic()
    values, late = c.map(time.sleep, [0.0, 0.0, 0.0, 0.0, 60.0, 0.0, 0.0])
    assert late == [False, False, False, False, True, False, False]
    assert time.monotonic() - t0 < 12
    with pytest.raises(ScorerError, match="sample 5: ValueError"):
        c.map(time.sleep, [0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    c.close()
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        DeadlineScorer("test", timeout_s=1.0, chunk=0)


def test_timeouts_and_refusals_are_counted_in_the_metrics():
    import torch

    from flowrl.rewards import CombinedReward

    parts = {"a": torch.tensor([1.0, 0.0, 0.0, 0.0]), "a/timeout": torch.tensor([0.0, 1.0, 1.0, 0.0]),
             "a/rejected": torch.tensor([0.0, 0.0, 0.0, 1.0])}
    outcome, valid, metrics = CombinedReward({}, {"a": 1.0}).combine(parts)
    assert metrics["reward/a/timeout/count"] == 2.0 and metrics["reward/a/rejected/count"] == 1.0
    assert metrics["reward/a/timeout"] == 0.5


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), "3", True])
def test_timeout_option_is_validated(bad):
    for name in ("reasoning_gym", "math_verify"):
        with pytest.raises(ValueError, match="timeout_s must be a finite number"):
            build_reward(name, timeout_s=bad)


def test_format_regex_backtracking_is_stopped_at_the_deadline():
    """A pattern with nested quantifiers backtracks exponentially on a near-match (2**40 steps here); with
    ``timeout_s`` the sample is stopped, scores 0 and is counted, and the others are scored."""
    r = build_reward("format_regex", pattern=r"(a+)+$", mode="fullmatch", timeout_s=1.0)
    r(["aa"], [""])  # warm: the worker process is up
    t0 = time.monotonic()
    parts = r(["a" * 40 + "!", "aaa", "b"], [""] * 3)
    assert time.monotonic() - t0 < 8
    assert parts["format_regex"].tolist() == [0.0, 1.0, 0.0]
    assert parts["format_regex/timeout"].tolist() == [1.0, 0.0, 0.0]
    quick = build_reward("format_regex", pattern=r"a+", name="quick")  # default: in this process
    assert quick(["aaa", "ab"], ["", ""])["quick/timeout"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="timeout_s must be a finite number"):
        build_reward("format_regex", pattern="a", timeout_s=0)


def test_arithmetic_answer_of_many_digits_is_wrong_not_an_error():
    """int() refuses more than 4300 digits (CPython's guard); a policy that writes that many is wrong, not a crash."""
    r = build_reward("arithmetic")
    parts = r(["7+5+0=12\n4+8+1=13\n3+9+1=13\nA:" + "1" * 5000, "7+5+0=12\n4+8+1=13\n3+9+1=13\nA:1332"],
              ["Q:347+985\n"] * 2)
    assert parts["arithmetic"].tolist() == [0.0, 1.0]


def test_a_scorer_that_refuses_its_input_is_the_samples_fault_not_the_servers():
    """A scorer's ValueError (a malformed answer or entry) is a ScorerInputError, which the reward server answers
    with 422 (not retried); any other failure stays a plain ScorerError (500, retried)."""
    import time

    from flowrl.rewards.scoring import DeadlineScorer, ScorerError, ScorerInputError
    from flowrl.rewards.server import INPUT_ERRORS

    s = DeadlineScorer("test", timeout_s=5.0)
    try:
        with pytest.raises(ScorerInputError, match="sample 1: ValueError"):
            s.map(time.sleep, [0.0, -1.0])
        with pytest.raises(ScorerError) as e:
            s.map(_raise_runtime, [0])
        assert not isinstance(e.value, ValueError)
    finally:
        s.close()
    assert "ScorerInputError" in INPUT_ERRORS


def _raise_runtime(_):
    raise RuntimeError("a scorer bug")
