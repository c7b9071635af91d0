"""Code sandbox and the VeRPO-weighted code reward (rewards/code_sandbox.py).

Every bad solution (fails, hangs, hangs while swallowing the interrupt, exits the interpreter, segfaults,
allocates too much, touches the network, does not compile) must cost exactly the tests it breaks, within
bounded time, with the test runner unharmed. The VeRPO formula is checked against a loop reference.
Attacks on the sandbox are in tests/test_code_sandbox_attacks.py.
"""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from flowrl.rewards import RewardError, build_reward
from flowrl.rewards.code_sandbox import (
    SandboxConfig,
    extract_code,
    run_sample,
    run_tests,
    verpo_reward,
)

# bad input raises ValueError, or RewardError naming the reward when it comes through Reward.__call__
BAD_INPUT = (ValueError, RewardError)

TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
CFG = SandboxConfig(time_limit=1.0, grace=1.5, memory_limit_mb=512)

GOOD = "def add(a, b):\n    return a + b\n"
BAD = {  # each breaks only the test with a negative argument (test 1)
    "fails": "def add(a, b):\n    return a + b if a >= 0 else 7\n",
    "hangs": "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n",
    "hangs_swallowing_interrupt": (
        "def add(a, b):\n    while a < 0:\n        try:\n            while True:\n                pass\n"
        "        except BaseException:\n            pass\n    return a + b\n"
    ),
    "os_exit": "import os\ndef add(a, b):\n    if a < 0:\n        os._exit(3)\n    return a + b\n",
    "segfault": "import ctypes\ndef add(a, b):\n    if a < 0:\n        ctypes.string_at(0)\n    return a + b\n",
    "too_much_memory": "def add(a, b):\n    if a < 0:\n        x = bytearray(8 << 30)\n    return a + b\n",
    "network": (
        "import socket\ndef add(a, b):\n    if a < 0:\n        socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "    return a + b\n"
    ),
}
EXPECTED_STATUS = {
    "fails": "fail", "hangs": "fail", "hangs_swallowing_interrupt": "killed", "os_exit": "killed",
    "segfault": "killed", "too_much_memory": "fail", "network": "fail",
}


def test_each_bad_solution_costs_only_its_test_and_runner_survives():
    names = ["good"] + list(BAD)
    codes = [GOOD] + list(BAD.values())
    t0 = time.monotonic()
    passed, mask, results = run_tests(codes, [TESTS] * len(codes), CFG, workers=2)
    wall = time.monotonic() - t0
    assert mask.all()
    assert passed[0].tolist() == [1, 1, 1]
    for i, name in enumerate(names[1:], start=1):
        assert passed[i].tolist() == [1, 0, 1], name
        assert results[i].status == ["pass", EXPECTED_STATUS[name], "pass"], (name, results[i].status)
        assert results[i].restarts == (1 if EXPECTED_STATUS[name] == "killed" else 0), name
    # bounded: a hang costs time_limit (interrupted in the child) or time_limit + grace (killed by the parent)
    worst = CFG.time_limit + CFG.grace
    for i, r in enumerate(results):
        assert r.seconds < worst + 2.0, (names[i], r.seconds)
    assert wall < 15.0, wall
    # the runner is unharmed: this process still runs code, and a fresh sandbox still works
    assert run_sample(GOOD, TESTS, CFG).passed == [True, True, True]


def test_solution_that_fails_to_load_fails_every_test():
    for code in ["def add(a, b) return", "raise RuntimeError('boom')", "while True:\n    pass\n", "import os\nos._exit(0)\n"]:
        r = run_sample(code, TESTS, CFG)
        assert r.passed == [False, False, False] and r.status == ["not_loaded"] * 3, code
        assert r.seconds < CFG.time_limit + CFG.grace + 2.0


def test_solution_sees_a_fresh_dir_and_a_clean_environment():
    probe = (
        "import os\n"
        "def probe():\n"
        "    fresh = os.listdir('.') == [] and os.environ['HOME'] == os.getcwd()\n"
        "    with open('x.txt', 'w') as f:\n"
        "        f.write('hi')\n"
        "    caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapAmb'))]\n"
        "    return [fresh, open('x.txt').read(), 'FLOWRL_SECRET_TEST' in os.environ, os.getuid() != 0, set(caps)]\n"
    )
    os.environ["FLOWRL_SECRET_TEST"] = "1"
    try:
        r = run_sample(probe, ["assert probe() == [True, 'hi', False, True, {'0000000000000000'}]"], CFG)
    finally:
        del os.environ["FLOWRL_SECRET_TEST"]
    assert r.status == ["pass"]
    assert not os.path.exists("x.txt")  # the sandbox's files never reach our cwd


# What crosses between the tests and the solution: data both ways, handles for everything else.
PROTOCOL = """
from fractions import Fraction
N = 5
TABLE = {(1, 2): {3, 4}, 'k': [b'x', None, 1.5, 2j]}
class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
    def pop(self):
        return self.items.pop()
    def __len__(self):
        return len(self.items)
class Oops(Exception):
    pass
def gen(n):
    return (i for i in range(n))
def pair(a, b=0, *, c=1):
    print('noise on stdout')
    return (a, b, c)
def check(x):
    if x < 0:
        raise ValueError('negative')
    if x == 0:
        raise Oops('zero')
    return Fraction(1, x)
def size(s):
    return len(s)
def big(n):
    return [7 ** 3000, -2 ** 1200, float('inf'), float('nan'), True, 1.5] + list(range(n))
"""
PROTOCOL_TESTS = [
    "assert N == 5 and TABLE == {(1, 2): {3, 4}, 'k': [b'x', None, 1.5, 2j]}",
    "assert pair(1, c=3) == (1, 0, 3) and type(pair(1)) is tuple",
    "s = Stack(); s.push([1, 2]); s.push('a')\nassert len(s) == 2 and s.pop() == 'a' and s.items == [[1, 2]]",
    "s = Stack(); s.push(1)\nassert size(s) == 1",  # a handle passed back to the solution
    "assert list(gen(3)) == [0, 1, 2]",
    "try:\n    check(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n    raise AssertionError",
    "try:\n    check(0)\nexcept Exception:\n    pass\nelse:\n    raise AssertionError",
    "assert check(4) == 0.25 and str(check(4)) == '1/4'",
    "a = big(50000)\nassert a[:3] + a[4:] == [7 ** 3000, -2 ** 1200, float('inf'), True, 1.5] + list(range(50000))"
    "\nassert a[3] != a[3] and type(a[4]) is bool",
    "assert Stack() != Stack()",  # handles compare by identity
    "assert check(lambda: 1) == 1",  # a function cannot be passed: this test fails
]


def test_protocol_values_handles_and_exceptions():
    r = run_sample(PROTOCOL, PROTOCOL_TESTS, CFG)
    assert r.status == ["pass"] * 10 + ["fail"], r.status


def test_missing_bubblewrap_refuses_unless_the_weak_mode_is_named(monkeypatch):
    from flowrl.rewards import sandbox_bwrap
    from flowrl.rewards.code_sandbox import SandboxUnavailable, sandbox_status

    monkeypatch.setattr(sandbox_bwrap, "find_bwrap", lambda: None)
    monkeypatch.setattr(sandbox_bwrap._Setup, "checked", False)
    monkeypatch.setattr(sandbox_bwrap._Setup, "prefix", None)
    with pytest.raises(SandboxUnavailable, match="not on PATH.*sandbox='unsafe-process'"):
        run_sample(GOOD, TESTS, CFG)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        build_reward("code_tests")
    assert "unsafe-process" in sandbox_status("bwrap")
    with pytest.raises(ValueError, match="valid: 'bwrap', 'unsafe-process'"):
        SandboxConfig(sandbox="none")
    weak = SandboxConfig(time_limit=1.0, grace=1.5, memory_limit_mb=512, sandbox="unsafe-process")
    assert run_sample(GOOD, TESTS, weak).passed == [True, True, True]
    assert run_sample(BAD["os_exit"], TESTS, weak).status == ["pass", "killed", "pass"]
    r = build_reward("code_tests", sandbox="unsafe-process")
    assert r([GOOD], ["p"], {"tests": [TESTS]})["code_tests"].tolist() == [1.0]


def test_stdio_tests():
    cases = [{"input": "3 4\n", "output": "7\n"}, {"input": "1 1", "output": "2  \n\n"}, {"input": "-2 2", "output": "0"}]
    good = "a, b = map(int, input().split())\nprint(a + b)\n"
    mult = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a * b)\n"
    exits = "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0 if a >= 0 else 1)\n"
    quits = "a, b = map(int, input().split())\nprint(a + b)\nexit()\nprint('unreachable')\n"
    crash = "import os\na, b = map(int, input().split())\nif a == 1:\n    os._exit(1)\nprint(a + b)\n"
    assert run_sample(good, cases, CFG).passed == [True, True, True]
    assert run_sample(mult, cases, CFG).passed == [False, False, False]
    assert run_sample(exits, cases, CFG).passed == [True, True, False]
    assert run_sample(quits, cases, CFG).passed == [True, True, True]
    r = run_sample(crash, cases, CFG)
    assert r.status == ["pass", "killed", "pass"] and r.restarts == 1


def test_bad_tests_raise_clearly():
    with pytest.raises(ValueError, match="no tests"):
        run_sample(GOOD, [], CFG)
    with pytest.raises(TypeError, match="all strings"):
        run_sample(GOOD, ["assert 1", {"input": "", "output": ""}], CFG)
    with pytest.raises(ValueError, match="time_limit"):
        SandboxConfig(time_limit=0)


# --------------------------------------------------------------------------------- VeRPO weighting
def verpo_slow(P, group, lam):
    """Loops over the formula: rho_j per group, w_j = (1 - rho_j) / sum_k (1 - rho_k), r = (all + lam*dense)/(1+lam)."""
    out = []
    for i in range(len(P)):
        members = [k for k in range(len(P)) if group[k] == group[i]]
        J = len(P[i])
        rho = [sum(P[k][j] for k in members) / len(members) for j in range(J)]
        z = sum(1 - r for r in rho)
        w = [(1 - r) / z for r in rho] if z > 0 else [1 / J] * J
        dense = sum(w[j] * P[i][j] for j in range(J))
        allp = float(all(P[i][j] == 1 for j in range(J)))
        out.append(((allp + lam * dense) / (1 + lam), dense, allp))
    return out


def test_verpo_hand_worked():
    P = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    out = verpo_reward(P, torch.ones_like(P, dtype=torch.bool), torch.zeros(4, dtype=torch.long), dense_weight=0.5)
    # rho = (3/4, 1/2, 1/4) -> w = (1/6, 1/3, 1/2)
    torch.testing.assert_close(out["weights"][0], torch.tensor([1 / 6, 1 / 3, 1 / 2]))
    torch.testing.assert_close(out["dense"], torch.tensor([1.0, 0.5, 1 / 6, 0.0]))
    torch.testing.assert_close(out["reward"], torch.tensor([1.0, 0.5 * 0.5 / 1.5, 0.5 / 6 / 1.5, 0.0]))
    assert out["all_pass"].tolist() == [1, 0, 0, 0]


def test_verpo_random_against_loops():
    rng = random.Random(3)
    sizes = [1, 4, 3, 1, 5, 2, 4]  # mixed group sizes with singletons
    P_rows, group, J_of = [], [], {}
    for g, n in enumerate(sizes):
        J = rng.randint(1, 5)  # ragged: each group has its own number of tests
        J_of[g] = J
        kind = g % 3
        for _ in range(n):
            if kind == 0:  # all-equal group: everyone passes everything
                P_rows.append([1] * J)
            else:
                P_rows.append([rng.randint(0, 1) for _ in range(J)])
            group.append(g)
    perm = list(range(len(group)))
    rng.shuffle(perm)  # groups interleaved in the batch
    P_rows = [P_rows[i] for i in perm]
    group = [group[i] for i in perm]
    Jmax = max(len(r) for r in P_rows)
    P = torch.zeros(len(P_rows), Jmax)
    M = torch.zeros(len(P_rows), Jmax, dtype=torch.bool)
    for i, r in enumerate(P_rows):
        P[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        M[i, : len(r)] = True
    P[~M] = 1.0  # garbage on padding must be ignored
    for lam in (0.0, 0.5, 0.9):
        out = verpo_reward(P, M, torch.tensor(group), dense_weight=lam)
        ref = verpo_slow(P_rows, group, lam)
        torch.testing.assert_close(out["reward"], torch.tensor([r[0] for r in ref]))
        torch.testing.assert_close(out["dense"], torch.tensor([r[1] for r in ref]))
        assert out["all_pass"].tolist() == [r[2] for r in ref]
        # full correctness dominates: every all-pass sample beats every other sample
        ap = out["all_pass"].bool()
        assert out["reward"][ap].min() > out["reward"][~ap].max()


def test_verpo_rejects_inconsistent_groups():
    P = torch.ones(2, 3)
    M = torch.tensor([[True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match="different test sets"):
        verpo_reward(P, M, torch.zeros(2, dtype=torch.long))


def test_registered_code_reward_end_to_end():
    r = build_reward("code_tests", time_limit=1.0, grace=1.5, memory_limit_mb=512, workers=2)
    samples = [
        "Here is my code:\n```python\n" + GOOD + "```\n",
        BAD["fails"],
        BAD["os_exit"],
        "```python\ndef add(a, b):\n    return 0\n```",
        GOOD,  # a second prompt, a singleton group
    ]
    prompts = ["write add"] * 4 + ["write add again"]
    tests = [TESTS] * 4 + [["assert add(2, 2) == 4"]]
    parts = r(samples, prompts, {"tests": tests})
    P = [[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 1, 0]]
    ref = verpo_slow(P, [0, 0, 0, 0], 0.5) + [(1.0, 1.0, 1.0)]
    torch.testing.assert_close(parts["code_tests"], torch.tensor([x[0] for x in ref]))
    torch.testing.assert_close(parts["code_tests/pass_rate"], torch.tensor([1, 2 / 3, 2 / 3, 1 / 3, 1]))
    assert parts["code_tests/killed"].tolist() == [0, 0, 1, 0, 0]
    with pytest.raises(BAD_INPUT, match="meta\\['tests'\\]"):
        r(samples, prompts, None)
    assert extract_code("```py\nx=1\n```\ntext\n```python\ny=2\n```") == "y=2\n"
    assert extract_code("no fence", "fenced") == ""
