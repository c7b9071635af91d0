"""Code rewards: unit tests run in a sandboxed subprocess, with VeRPO's per-test difficulty weights.

Sandbox (:func:`run_tests`), per sample:

- **Process.** The tests run in a fresh ``python -I`` child (isolated mode: no user site, no PYTHON* env
  vars) in its own session (process group), in a fresh temporary directory (also its HOME and TMPDIR),
  with a minimal environment; the directory is removed afterwards. Code and tests reach the child on its
  stdin (never as a file in its directory); its stdout/stderr go to /dev/null and results come back on a
  private copy of the original stdout, one line per test, tagged with a random nonce.
- **Time.** Each test (and the loading of the solution) gets ``time_limit`` seconds, enforced in the child
  by ``signal.setitimer`` (a pure-Python infinite loop is interrupted and that test fails) and in the
  parent by a wall-clock deadline (``time_limit + grace``) after which the whole process group is killed
  with SIGKILL (a C-level hang, or code that catches the interrupt). RLIMIT_CPU bounds the child's CPU
  time in case the parent dies.
- **Memory.** ``resource.setrlimit(RLIMIT_AS, memory_limit_mb)`` in the child before the solution runs: a
  too-large allocation raises MemoryError in the tested code (that test fails) or kills the child.
  RLIMIT_CORE = 0 (no core dumps), RLIMIT_FSIZE bounds written files.
- **Network.** If ``unshare -n`` (or, unprivileged, ``unshare -rn``) works on this machine the child runs in
  a new network namespace with no interfaces (checked once per process, :func:`network_isolation`).
  In every case the child also replaces ``socket.socket``, ``_socket.socket``, ``socket.create_connection``,
  ``socket.getaddrinfo`` and ``socket.socketpair`` by functions that raise OSError before the solution runs.
  The monkeypatch alone is best effort (code could use ctypes); the namespace is the real barrier.
- **Crashes cost one test.** If the child dies (``os._exit``, a segfault) or is killed during test j,
  test j fails and a new child resumes at test j+1. If the solution itself fails to load (raises, hangs,
  crashes), every test of that sample fails. The parent is never harmed.
- **Parallel.** Samples run in a thread pool of ``workers`` (each thread waits on its own child).

This sandbox protects the trainer from broken code; it is **not** a defence against adversarial code that
inspects its own interpreter (the tested code shares the child's process with the test harness).

Tests of a sample are either Python snippets run in the solution's namespace (``"assert add(1, 2) == 3"``;
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

import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .base import Meta, Parts, Reward, register_reward

Test = Union[str, dict]

# ---------------------------------------------------------------------------------------- the child
# Runs inside the sandboxed interpreter. Reads one JSON line from stdin; writes "<nonce> R <ok>" once the
# solution is loaded (asserts mode) and "<nonce> T <j> <ok>" after each test.
_CHILD = r'''
import io, json, os, resource, signal, sys
cfg = json.loads(sys.stdin.readline())
nonce = cfg["nonce"]
res = os.fdopen(os.dup(1), "w", buffering=1)
dn = os.open(os.devnull, os.O_RDWR)
os.dup2(dn, 0); os.dup2(dn, 1); os.dup2(dn, 2)
sys.stdin = io.StringIO(""); sys.stdout = open(os.devnull, "w"); sys.stderr = sys.stdout
mem = int(cfg["memory_bytes"])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(cfg["fsize_bytes"]), int(cfg["fsize_bytes"])))
cpu = int(cfg["cpu_seconds"])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
import socket, _socket
def _deny(*a, **k):
    raise OSError("network access is disabled in the flowrl code sandbox")
class _NoSocket:
    def __init__(self, *a, **k):
        _deny()
socket.socket = _NoSocket; _socket.socket = _NoSocket; socket.SocketType = _NoSocket
socket.create_connection = _deny; socket.getaddrinfo = _deny; socket.socketpair = _deny
socket.create_server = _deny; socket.fromfd = _deny

class _Timeout(BaseException):
    pass
def _alarm(signum, frame):
    raise _Timeout()
signal.signal(signal.SIGALRM, _alarm)
limit = float(cfg["time_limit"])
def timed(fn):
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

code = compile(cfg["code"], "<solution>", "exec") if cfg["compiles"] else None
tests = cfg["tests"]
null_out = sys.stdout
def norm(s):
    lines = [l.rstrip() for l in s.replace("\r\n", "\n").split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    return lines
if cfg["mode"] == "asserts":
    ns = {"__name__": "solution"}
    def load():
        exec(code, ns)
    try:
        timed(load)
        ok = 1
    except BaseException:
        ok = 0
    res.write(f"{nonce} R {ok}\n")
    if not ok:
        os._exit(0)
    for j in range(cfg["start"], len(tests)):
        def run():
            exec(compile(tests[j], f"<test {j}>", "exec"), ns)
        try:
            timed(run)
            ok = 1
        except BaseException:
            ok = 0
        sys.stdout = null_out; sys.stderr = null_out
        res.write(f"{nonce} T {j} {ok}\n")
else:
    res.write(f"{nonce} R 1\n")
    for j in range(cfg["start"], len(tests)):
        case = tests[j]
        out = io.StringIO()
        def run():
            sys.stdin = io.StringIO(case["input"]); sys.stdout = out
            try:
                exec(code, {"__name__": "__main__"})
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
        try:
            timed(run)
            ok = int(norm(out.getvalue()) == norm(case["output"]))
        except BaseException:
            ok = 0
        sys.stdout = null_out; sys.stderr = null_out; sys.stdin = io.StringIO("")
        res.write(f"{nonce} T {j} {ok}\n")
res.flush()
os._exit(0)
'''

_NET_PREFIX: Optional[list[str]] = None
_NET_CHECKED = False


def network_isolation() -> str:
    """How the sandbox cuts the network here: ``"unshare -n"``, ``"unshare -rn"`` or ``"socket patch only"``."""
    return "socket patch only" if not _net_prefix() else " ".join(_net_prefix())


def _net_prefix() -> list[str]:
    global _NET_PREFIX, _NET_CHECKED
    if not _NET_CHECKED:
        _NET_CHECKED = True
        _NET_PREFIX = []
        exe = shutil.which("unshare")
        if exe is not None and sys.platform.startswith("linux"):
            for flags in (["-n"], ["-rn"]):
                try:
                    ok = subprocess.run([exe, *flags, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if ok:
                    _NET_PREFIX = [exe, *flags]
                    break
    return list(_NET_PREFIX or [])


@dataclass
class SandboxConfig:
    """Limits of one sandboxed run.

    time_limit: seconds per test (and for loading the solution). grace: extra wall-clock seconds the parent
    waits beyond ``time_limit`` before killing (covers interpreter start-up). memory_limit_mb: RLIMIT_AS of
    the child. fsize_mb: largest file the child may write. network: ``"auto"`` (namespace if available, plus
    the socket patch), ``"patch"`` (socket patch only).
    """

    time_limit: float = 2.0
    grace: float = 3.0
    memory_limit_mb: int = 1024
    fsize_mb: int = 16
    network: str = "auto"

    def __post_init__(self):
        if not self.time_limit > 0:
            raise ValueError(f"sandbox time_limit must be > 0 seconds; got {self.time_limit}")
        if not self.grace >= 0:
            raise ValueError(f"sandbox grace must be >= 0 seconds; got {self.grace}")
        if not self.memory_limit_mb >= 64:
            raise ValueError(f"sandbox memory_limit_mb must be >= 64 (the interpreter needs it); got {self.memory_limit_mb}")
        if self.network not in ("auto", "patch"):
            raise ValueError(f"sandbox network={self.network!r} is not valid; valid: 'auto', 'patch'")


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


def _read_line(proc: subprocess.Popen, buf: bytearray, deadline: float) -> Optional[bytes]:
    """The next line of the child's result pipe, or None at EOF or past ``deadline``."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                return None
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            buf.extend(chunk)
            if len(buf) > 1 << 20:  # a child that floods the pipe is broken
                return None
        i = buf.index(b"\n")
        line = bytes(buf[:i])
        del buf[: i + 1]
        return line
    finally:
        sel.close()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    for f in (proc.stdout, proc.stdin):
        if f is not None:
            f.close()


def run_sample(code: str, tests: Sequence[Test], cfg: Optional[SandboxConfig] = None) -> SampleResult:
    """Run one solution against its tests in the sandbox (module docstring). Never raises for a bad solution."""
    cfg = cfg or SandboxConfig()
    mode = _check_tests(tests)
    n = len(tests)
    t0 = time.monotonic()
    passed = [False] * n
    status = ["fail"] * n
    try:
        compile(code, "<solution>", "exec")
        compiles = True
    except (SyntaxError, ValueError):
        compiles = False
    if not compiles:
        return SampleResult(passed, ["not_loaded"] * n, 0, time.monotonic() - t0)
    prefix = _net_prefix() if cfg.network == "auto" else []
    workdir = tempfile.mkdtemp(prefix="flowrl-sandbox-")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start, restarts = 0, 0
    try:
        while start < n:
            nonce = secrets.token_hex(8)
            payload = {"nonce": nonce, "code": code, "tests": list(tests), "start": start, "mode": mode,
                       "compiles": True, "time_limit": cfg.time_limit,
                       "memory_bytes": int(cfg.memory_limit_mb) << 20, "fsize_bytes": int(cfg.fsize_mb) << 20,
                       "cpu_seconds": int(cfg.time_limit * (n - start + 1) + cfg.grace + 1)}
            proc = subprocess.Popen(prefix + [sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir, env=env,
                                    start_new_session=True)
            buf = bytearray()
            try:
                proc.stdin.write((json.dumps(payload) + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            budget = cfg.time_limit + cfg.grace
            line = _read_line(proc, buf, time.monotonic() + budget)
            if line is None or line != f"{nonce} R 1".encode():  # the solution did not load: every test fails
                for j in range(start, n):
                    status[j] = "not_loaded"
                _kill(proc)
                break
            j = start
            while j < n:
                line = _read_line(proc, buf, time.monotonic() + budget)
                m = re.fullmatch(rf"{nonce} T (\d+) ([01])".encode(), line) if line is not None else None
                if m is None or int(m.group(1)) != j:  # crashed, hung past the deadline, or garbled: test j fails
                    status[j] = "killed"
                    break
                passed[j] = m.group(2) == b"1"
                status[j] = "pass" if passed[j] else "fail"
                j += 1
            _kill(proc)
            if j < n:
                restarts += 1
            start = j + 1 if j < n else n
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
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

    Options: time_limit, memory_limit_mb, grace, network, workers, dense_weight (lam; 0 = all-pass outcome
    only), extract ("auto" | "fenced" | "none").
    """

    def __init__(self, *, name: Optional[str] = None, on_error: str = "raise", time_limit: float = 2.0,
                 memory_limit_mb: int = 1024, grace: float = 3.0, network: str = "auto", workers: int = 2,
                 dense_weight: float = 0.5, extract: str = "auto"):
        super().__init__(name=name, on_error=on_error)
        self.cfg = SandboxConfig(time_limit=time_limit, grace=grace, memory_limit_mb=memory_limit_mb, network=network)
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
