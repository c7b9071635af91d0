"""Code rewards: unit tests run in an isolating sandbox, with VeRPO's per-test difficulty weights.

Sandbox (:func:`run_tests`), per sample. Processes and the file system view are set up in
rewards/sandbox_bwrap.py; the code that runs inside is rewards/sandbox_runtime.py.

- **Isolation** (``sandbox="bwrap"``, the default): bubblewrap gives each sandboxed interpreter its own PID,
  network, IPC and UTS namespaces, an unprivileged uid with no capabilities, a read-only view of /usr and the
  interpreter's standard library (not the repository, /etc, /root, /home or the trainer's environment), one
  writable size-limited tmpfs at /tmp, and RLIMIT_NPROC. Where bubblewrap is missing or does not work the
  sandbox refuses to run (:class:`SandboxUnavailable`); ``sandbox="unsafe-process"`` opts into a plain child
  process that survives accidents, not attacks.
- **An unforgeable result.** The solution runs in one sandbox (the *solution server*); the tests run in another
  (the *judge*, its own uid and PID namespace), which reaches the solution's names only through handles: a call
  sends its arguments as data and gets data back (only builtin values cross, decoded by the judge; a handle
  compares by identity, so an "always equal" object cannot pass ``assert f(x) == 3``). The test text never
  enters the solution's sandbox, the judge reports to this process on a pipe the solution does not hold, and
  nothing the solution does to its own interpreter (``__main__``, builtins, printed lines, ``os._exit``)
  reaches the judge. Stdin/stdout tests: the solution's sandbox gets only the inputs and sends back what the
  program printed; this process compares it with the expected output.
  Limits of the handle protocol: arguments are copied, so a test cannot see the solution mutate a list it
  passed; lambdas cannot be passed; the solution's module-level values are read once, after it loads.
- **Time.** Each test (and the loading of the solution) gets ``time_limit`` seconds: the judge and the solution
  server both run an interval timer (a pure-Python loop is interrupted and that test fails); a solution that
  swallows the interrupt is declared stuck ``grace / 2`` later, and this process kills any sandbox that has not
  answered ``time_limit + grace`` after its last answer. Killing a bubblewrap sandbox kills its PID namespace's
  init, so every process in it dies (a ``setsid`` grandchild, a fork bomb). RLIMIT_CPU bounds CPU time.
- **Memory and files.** RLIMIT_AS (``memory_limit_mb``: a too-large allocation raises MemoryError, that test
  fails), RLIMIT_CORE = 0, RLIMIT_FSIZE (``fsize_mb``), a ``tmp_mb`` tmpfs, RLIMIT_NPROC (``max_procs``).
- **Crashes cost one test.** If the solution dies (``os._exit``, a segfault) or is killed during test j, test j
  fails and fresh sandboxes resume at test j+1. If the solution fails to load (raises, hangs, crashes), every
  test of that sample fails. The trainer is never harmed.
- **Parallel.** Samples run in a thread pool of ``workers`` (each thread waits on its own sandboxes).

Tests of a sample are either Python snippets run with the solution's names in scope (``"assert add(1, 2) == 3"``;
a test passes iff it raises nothing), or stdin/stdout cases ``{"input": str, "output": str}`` (the solution
runs as ``__main__`` with that stdin; it passes iff its stdout equals ``output`` up to trailing whitespace
on each line and trailing blank lines).

Reward (VeRPO, "Verifiable Dense Reward Policy Optimization for Code Generation", arXiv 2601.03525):
with pass matrix ``P[i, j] = 1[sample i passes test j]`` over the samples of one group (same prompt, same
tests), the group pass rate of test j is ``rho_j = mean_{i in g} P[i, j]``, and the difficulty weights are

    w_j = (1 - rho_j) / sum_k (1 - rho_k)            (uniform 1/J when every test is passed by the whole group)
    dense_i = sum_j w_j P[i, j]                       in [0, 1]
    allpass_i = 1[P[i, j] = 1 for all j]
    r_i = (allpass_i + lam * dense_i) / (1 + lam)      (lam = ``dense_weight``, default 0.5)

An all-pass sample has dense_i = 1, so r_i = 1; any other sample has r_i <= lam / (1 + lam) (< 1/2 for
lam < 1): full correctness always dominates partial success. A group of one sample gets w_j on its own
failed tests, hence dense_i = 0 unless it passes all (r_i = allpass_i).
"""
from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .base import Meta, Parts, Reward, register_reward
from .sandbox_bwrap import SANDBOXES, Proc, SandboxUnavailable, check_sandbox, sandbox_status
from .sandbox_runtime import Lines

Test = Union[str, dict]
__all__ = ["SandboxConfig", "SampleResult", "SandboxUnavailable", "sandbox_status", "run_sample", "run_tests",
           "verpo_reward", "extract_code", "CodeTestsReward", "SANDBOXES"]


@dataclass
class SandboxConfig:
    """Limits of one sandboxed run.

    time_limit: seconds per test (and for loading the solution). grace: extra wall-clock seconds before a
    silent sandbox is killed (covers start-up). memory_limit_mb: RLIMIT_AS of each sandboxed process.
    fsize_mb: largest file it may write. tmp_mb: size of its writable /tmp. max_procs: RLIMIT_NPROC (processes
    and threads of the sandbox's uid). sandbox: ``"bwrap"`` (isolating; refuses to run where bubblewrap does not
    work) or ``"unsafe-process"`` (a plain child process: no isolation, for code you trust).
    """

    time_limit: float = 2.0
    grace: float = 3.0
    memory_limit_mb: int = 1024
    fsize_mb: int = 16
    tmp_mb: int = 64
    max_procs: int = 64
    sandbox: str = "bwrap"

    def __post_init__(self):
        if not self.time_limit > 0:
            raise ValueError(f"sandbox time_limit must be > 0 seconds; got {self.time_limit}")
        if not self.grace > 0:
            raise ValueError(f"sandbox grace must be > 0 seconds; got {self.grace}")
        if not self.memory_limit_mb >= 64:
            raise ValueError(f"sandbox memory_limit_mb must be >= 64 (the interpreter needs it); got {self.memory_limit_mb}")
        for key in ("fsize_mb", "tmp_mb"):
            if not getattr(self, key) >= 1:
                raise ValueError(f"sandbox {key} must be >= 1; got {getattr(self, key)}")
        if not self.max_procs >= 4:
            raise ValueError(f"sandbox max_procs must be >= 4 (the sandbox itself needs a few); got {self.max_procs}")
        check_sandbox(self.sandbox)


@dataclass
class SampleResult:
    """Per-test outcome of one sample: ``passed[j]``; ``status[j]`` in {"pass", "fail", "killed", "not_loaded"}."""

    passed: list[bool]
    status: list[str] = field(default_factory=list)
    restarts: int = 0
    seconds: float = 0.0


def _check_tests(tests: Sequence[Test]) -> str:
    if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence):
        raise TypeError(f"tests must be a list of test snippets or {{'input','output'}} dicts; got {type(tests).__name__}")
    if len(tests) == 0:
        raise ValueError("a sample has no tests; a code reward needs at least one test per sample")
    if all(isinstance(t, str) for t in tests):
        return "asserts"
    if all(isinstance(t, dict) and set(t) == {"input", "output"} and all(isinstance(v, str) for v in t.values())
           for t in tests):
        return "stdio"
    raise TypeError("tests of one sample must be all strings (asserts) or all {'input': str, 'output': str} dicts")


def _recv(lines: Lines, deadline: float):
    """The next JSON message from a sandbox; None at EOF, past the deadline, or if it is malformed."""
    try:
        return lines.recv(deadline)
    except (ValueError, RecursionError, OSError):
        return None


def _norm(s: str) -> list[str]:
    lines = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _limits(cfg: SandboxConfig, remaining: int) -> dict:
    return {"time_limit": cfg.time_limit, "memory_bytes": int(cfg.memory_limit_mb) << 20,
            "fsize_bytes": int(cfg.fsize_mb) << 20, "max_procs": int(cfg.max_procs),
            "cpu_seconds": int(cfg.time_limit * (remaining + 1) + cfg.grace + 1)}


def _run_once(code: str, tests: Sequence[Test], mode: str, start: int, cfg: SandboxConfig,
              passed: list, status: list) -> int:
    """Run tests ``start..`` in fresh sandboxes; fills passed/status; returns the index of the test that was
    killed (the caller resumes after it), ``len(tests)`` when all ran, or -1 when the solution did not load."""
    n, budget, tmp = len(tests), cfg.time_limit + cfg.grace, int(cfg.tmp_mb) << 20
    lim = _limits(cfg, n - start)
    procs: list[Proc] = []
    try:
        if mode == "stdio":
            inputs = [[j, tests[j]["input"]] for j in range(start, n)]
            sol = Proc("solution", dict(lim, code=code, mode="stdio", inputs=inputs), cfg.sandbox, tmp, read=True)
            procs.append(sol)
            reader = sol.stdout
        else:
            r1, w1 = os.pipe()  # judge -> solution: requests
            r2, w2 = os.pipe()  # solution -> judge: replies
            try:
                procs.append(Proc("solution", dict(lim, code=code, mode="asserts", rfd=r1, wfd=w2), cfg.sandbox, tmp,
                                  pass_fds=(r1, w2)))
                procs.append(Proc("judge", dict(lim, tests=list(tests), start=start, rfd=r2, wfd=w1,
                                                wait=cfg.grace / 2), cfg.sandbox, tmp, pass_fds=(r2, w1), read=True))
            finally:
                for fd in (r1, w1, r2, w2):
                    os.close(fd)
            reader = procs[1].stdout
        lines = Lines(reader, None)
        first = _recv(lines, time.monotonic() + budget)
        if not isinstance(first, dict) or first.get("ready" if mode == "stdio" else "loaded") not in (1, True):
            for j in range(start, n):
                status[j] = "not_loaded"
            return -1
        for j in range(start, n):
            msg = _recv(lines, time.monotonic() + budget)
            if not isinstance(msg, dict) or msg.get("j") != j:
                status[j] = "killed"  # crashed, hung past the deadline, or garbled
                return j
            if mode == "stdio":
                out = msg.get("out")
                passed[j] = isinstance(out, str) and _norm(out) == _norm(tests[j]["output"])
                status[j] = "pass" if passed[j] else "fail"
            else:
                st = msg.get("status")
                status[j] = st if st in ("pass", "fail", "killed") else "killed"
                passed[j] = status[j] == "pass"
                if status[j] == "killed":
                    return j
        return n
    finally:
        for p in procs:
            p.kill()


def run_sample(code: str, tests: Sequence[Test], cfg: Optional[SandboxConfig] = None) -> SampleResult:
    """Run one solution against its tests in the sandbox (module docstring). Never raises for a bad solution;
    raises SandboxUnavailable where the configured sandbox cannot run."""
    cfg = cfg or SandboxConfig()
    mode = _check_tests(tests)
    n = len(tests)
    t0 = time.monotonic()
    passed = [False] * n
    status = ["fail"] * n
    try:
        compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError):
        return SampleResult(passed, ["not_loaded"] * n, 0, time.monotonic() - t0)
    start, restarts = 0, 0
    while start < n:
        j = _run_once(code, tests, mode, start, cfg, passed, status)
        if j < 0:
            break
        if j < n:
            restarts += 1
        start = j + 1
    return SampleResult(passed, status, restarts, time.monotonic() - t0)


def run_tests(codes: Sequence[str], tests: Sequence[Sequence[Test]], cfg: Optional[SandboxConfig] = None,
              workers: int = 2) -> tuple[Tensor, Tensor, list[SampleResult]]:
    """Run B solutions against their tests in parallel sandboxes.

    Returns (passed float [B, J] with 0 on padding, test_mask bool [B, J], per-sample results); J = the most tests.
    """
    if len(codes) != len(tests):
        raise ValueError(f"run_tests: {len(codes)} solutions but {len(tests)} test lists")
    if workers < 1:
        raise ValueError(f"run_tests: workers must be >= 1; got {workers}")
    for i, c in enumerate(codes):
        if not isinstance(c, str):
            raise TypeError(f"run_tests: solution {i} is {type(c).__name__}, not str")
    for t in tests:
        _check_tests(t)
    cfg = cfg or SandboxConfig()
    with ThreadPoolExecutor(max_workers=min(workers, max(1, len(codes)))) as pool:
        results = list(pool.map(lambda ct: run_sample(ct[0], ct[1], cfg), zip(codes, tests)))
    J = max(len(t) for t in tests) if tests else 0
    passed = torch.zeros(len(codes), J)
    mask = torch.zeros(len(codes), J, dtype=torch.bool)
    for i, r in enumerate(results):
        passed[i, : len(r.passed)] = torch.tensor(r.passed, dtype=torch.float32)
        mask[i, : len(r.passed)] = True
    return passed, mask, results


def verpo_reward(passed: Tensor, test_mask: Tensor, group: Tensor, dense_weight: float = 0.5) -> dict[str, Tensor]:
    """VeRPO dense reward from a pass matrix (arXiv 2601.03525; exact form in the module docstring).

    passed: float [B, J] in {0, 1}; test_mask: bool [B, J] (test j exists for sample i; equal within a group);
    group: long [B]. Returns {"reward", "dense", "all_pass", "pass_rate"} each float [B] and "weights" float [B, J].

        rho[g, j] = sum_{i in g} P[i, j] / |g|;  w[i, j] = (1 - rho[g(i), j]) M[i, j] / sum_k (1 - rho[g(i), k]) M[i, k]
        (w[i, j] = M[i, j] / J_i when the sum is 0);   dense_i = sum_j w[i, j] P[i, j]
        r_i = (allpass_i + lam * dense_i) / (1 + lam)
    """
    if passed.shape != test_mask.shape or passed.dim() != 2:
        raise ValueError(f"verpo_reward: passed {tuple(passed.shape)} and test_mask {tuple(test_mask.shape)} must both be [B, J]")
    if group.shape != passed.shape[:1]:
        raise ValueError(f"verpo_reward: group must be long [B={passed.shape[0]}]; got {tuple(group.shape)}")
    if not dense_weight >= 0:
        raise ValueError(f"verpo_reward: dense_weight must be >= 0; got {dense_weight}")
    M = test_mask.to(passed.dtype)
    n_tests = M.sum(1)
    if bool((n_tests == 0).any()):
        raise ValueError("verpo_reward: a sample has no tests")
    P = passed * M
    _, inv = torch.unique(group, return_inverse=True)
    G = int(inv.max()) + 1
    sums = torch.zeros(G, P.shape[1], dtype=P.dtype, device=P.device).index_add_(0, inv, P)
    cnt = torch.zeros(G, P.shape[1], dtype=P.dtype, device=P.device).index_add_(0, inv, M)
    size = torch.bincount(inv, minlength=G).to(P.dtype)
    if bool(((cnt != 0) & (cnt != size[:, None])).any()):
        raise ValueError("verpo_reward: samples of one group have different test sets; a group must share its tests")
    rho = (sums / cnt.clamp(min=1))[inv]  # [B, J]
    raw = (1 - rho) * M
    Z = raw.sum(1, keepdim=True)
    w = torch.where(Z > 0, raw / Z.clamp(min=torch.finfo(P.dtype).tiny), M / n_tests[:, None])
    dense = (w * P).sum(1)
    all_pass = (P.sum(1) == n_tests).to(P.dtype)
    reward = (all_pass + dense_weight * dense) / (1 + dense_weight)
    return {"reward": reward, "dense": dense, "all_pass": all_pass, "pass_rate": P.sum(1) / n_tests, "weights": w}


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str, mode: str = "auto") -> str:
    """The code of a completion: ``"auto"``: the last fenced block (```python ... ```) if there is one, else
    the whole text; ``"fenced"``: the last fenced block or "" (then the sample fails to load); ``"none"``: the text."""
    if mode not in ("auto", "fenced", "none"):
        raise ValueError(f"extract_code mode={mode!r} is not valid; valid: 'auto', 'fenced', 'none'")
    if mode == "none":
        return text
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1]
    return text if mode == "auto" else ""


def _groups_from(meta: Meta, prompts: Sequence[str], B: int) -> Tensor:
    if meta is not None and "group" in meta:
        g = torch.as_tensor(meta["group"]).to(torch.long).reshape(-1)
        if g.shape[0] != B:
            raise ValueError(f"code reward: meta['group'] has {g.shape[0]} entries for {B} samples")
        return g.cpu()
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts], dtype=torch.long)


@register_reward("code_tests")
class CodeTestsReward(Reward):
    """Unit-test reward for code completions, VeRPO-weighted (module docstring gives the sandbox and formula).

    ``meta["tests"]``: B lists of tests (snippets or ``{"input", "output"}``), the same within a group;
    ``meta["group"]`` (optional, long [B]): group ids; without it samples with equal prompts form a group.
    Parts: ``<name>`` (r_i), ``<name>/all_pass``, ``<name>/dense``, ``<name>/pass_rate``, ``<name>/killed``
    (tests that crashed or hung).

    Options: time_limit, memory_limit_mb, grace, workers, dense_weight (lam; 0 = all-pass outcome only),
    extract ("auto" | "fenced" | "none"), sandbox ("bwrap", the default, isolates and is checked when the reward
    is built: SandboxUnavailable names the fix; "unsafe-process" runs untrusted code without isolation).
    """

    def __init__(self, *, name: Optional[str] = None, on_error: str = "raise", time_limit: float = 2.0,
                 memory_limit_mb: int = 1024, grace: float = 3.0, sandbox: str = "bwrap", workers: int = 2,
                 dense_weight: float = 0.5, extract: str = "auto"):
        super().__init__(name=name, on_error=on_error)
        self.cfg = SandboxConfig(time_limit=time_limit, grace=grace, memory_limit_mb=memory_limit_mb, sandbox=sandbox)
        if sandbox == "bwrap" and sandbox_status(sandbox) != "ok":  # refuse before training starts, not mid-run
            raise SandboxUnavailable(sandbox_status(sandbox))
        if workers < 1:
            raise ValueError(f"code_tests workers must be >= 1; got {workers}")
        if not dense_weight >= 0:
            raise ValueError(f"code_tests dense_weight must be >= 0; got {dense_weight}")
        extract_code("", extract)
        self.workers, self.dense_weight, self.extract = workers, dense_weight, extract

    def score(self, samples: Sequence[str], prompts: Sequence[str], meta: Meta) -> Parts:
        B = len(samples)
        if meta is None or "tests" not in meta:
            raise ValueError("code_tests: meta['tests'] (one list of tests per sample) is required")
        tests = meta["tests"]
        if len(tests) != B:
            raise ValueError(f"code_tests: meta['tests'] has {len(tests)} entries for {B} samples")
        codes = [extract_code(s, self.extract) for s in samples]
        passed, mask, results = run_tests(codes, tests, self.cfg, self.workers)
        out = verpo_reward(passed, mask, _groups_from(meta, prompts, B), self.dense_weight)
        killed = torch.tensor([sum(s == "killed" for s in r.status) for r in results], dtype=torch.float32)
        return {self.name: out["reward"], f"{self.name}/all_pass": out["all_pass"], f"{self.name}/dense": out["dense"],
                f"{self.name}/pass_rate": out["pass_rate"], f"{self.name}/killed": killed}
