"""Attacks on the code sandbox (rewards/code_sandbox.py): each test is an attack that must not work.

Every probe is a solution whose function reports what it managed ("blocked" when the attack failed); the
sandboxed test asserts it was blocked. Where a probe needs a target (a listening socket, a secret, a host
path), the test creates it and, where it matters, first shows that the same probe succeeds outside the
sandbox, so the test can fail. Attacks that would hurt the test runner itself run in a throw-away process.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flowrl.rewards.code_sandbox import SandboxConfig, run_sample

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the code sandbox needs Linux")

REPO = Path(__file__).resolve().parents[1]
CFG = SandboxConfig(time_limit=2.0, grace=1.5, memory_limit_mb=512)
BYPASS = textwrap.dedent("""
    import os, ctypes, _socket
    # the C socket type, whatever the harness did to the socket module
    RAW = _socket.socket
    if getattr(RAW, '__module__', None) != '_socket':
        RAW = next(c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket')
    def connect(family, addr):
        s = RAW(family, 1)  # SOCK_STREAM
        s.settimeout(1.0)
        try:
            s.connect(addr)
            return True
        except OSError:
            return False
        finally:
            s.close()
""")


def sandboxed(probe: str, call: str, expect: str = "blocked", cfg: SandboxConfig = CFG) -> list[str]:
    """Run ``assert <call> == expect`` against the solution ``probe``; returns the status list."""
    r = run_sample(BYPASS + textwrap.dedent(probe), [f"assert {call} == {expect!r}"], cfg)
    return r.status


def outside(probe: str, call: str):
    ns: dict = {}
    exec(BYPASS + textwrap.dedent(probe), ns)
    return eval(call, ns)


# ------------------------------------------------------------------------------------------ files
READ = """
def probe(paths):
    got = []
    for p in paths:
        try:
            got.append(os.listdir(p) if os.path.isdir(p) else open(p).read(64))
        except OSError:
            pass
    return 'blocked' if not got else repr(got)
"""


def test_cannot_read_passwd_the_repository_or_host_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    paths = ["/etc/passwd", "/etc/shadow", str(REPO), str(REPO / "rewards" / "code_sandbox.py"), str(secret),
             str(Path.home() / ".bashrc"), "/work", "/home"]
    assert outside(READ, f"probe({paths!r})") != "blocked"
    assert sandboxed(READ, f"probe({paths!r})") == ["pass"]


WRITE = """
def probe(paths):
    done = []
    for p in paths:
        try:
            with open(p, 'w') as f:
                f.write('pwned')
            done.append(p)
        except OSError:
            pass
    # the one writable place: its own temporary directory
    with open('mine.txt', 'w') as f:
        f.write('ok')
    assert open('mine.txt').read() == 'ok' and os.getcwd() == os.environ['HOME']
    return 'blocked' if all(p.startswith('/tmp/') for p in done) else repr(done)
"""


def test_writes_stay_inside_its_directory(tmp_path):
    host_tmp = Path("/tmp") / f"flowrl-pwned-{secrets.token_hex(4)}"
    targets = [tmp_path / "pwned.txt", host_tmp, REPO / f"flowrl-pwned-{secrets.token_hex(4)}.txt"]
    try:
        status = sandboxed(WRITE, f"probe({[str(t) for t in targets]!r})")
        leaked = [str(t) for t in targets if t.exists()]
    finally:
        for t in targets:
            t.unlink(missing_ok=True)
    assert leaked == [] and status == ["pass"], (leaked, status)
    assert not (Path.cwd() / "mine.txt").exists()


# ---------------------------------------------------------------------------------------- network
NET = """
def probe(port):
    libc = ctypes.CDLL(None, use_errno=True)
    if connect(2, ('127.0.0.1', port)):
        return 'connected'
    # leave the network namespace: setns into every namespace it can name (needs CAP_SYS_ADMIN)
    for pid in [os.getppid(), 1] + [int(p) for p in os.listdir('/proc') if p.isdigit()]:
        try:
            fd = os.open(f'/proc/{pid}/ns/net', os.O_RDONLY)
        except OSError:
            continue
        ok = libc.setns(fd, 0x40000000) == 0  # CLONE_NEWNET
        os.close(fd)
        if ok and connect(2, ('127.0.0.1', port)):
            return f'connected after setns into {pid}'
    return 'blocked'
"""


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]
    srv.close()


def test_cannot_reach_a_listening_port_even_through_setns(listener):
    assert outside(NET, f"probe({listener})") == "connected"
    assert sandboxed(NET, f"probe({listener})") == ["pass"]


UNIX = """
def probe(paths):
    hits = [p for p in paths if connect(1, p)]  # AF_UNIX
    return 'blocked' if not hits else repr(hits)
"""


def test_cannot_reach_unix_sockets(tmp_path):
    path = str(tmp_path / "s.sock")
    abstract = f"\0flowrl-test-{secrets.token_hex(4)}"
    servers = []
    for addr in (path, abstract):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr)
        s.listen(4)
        servers.append(s)
    try:
        assert outside(UNIX, f"probe({[path, abstract]!r})") != "blocked"
        assert sandboxed(UNIX, f"probe({[path, abstract]!r})") == ["pass"]
    finally:
        for s in servers:
            s.close()


# -------------------------------------------------------------------------------------- processes
def _marked(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker.encode() in (p / "cmdline").read_bytes():
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def _gone(marker: str, wait: float = 2.0) -> list[int]:
    end = time.monotonic() + wait
    while _marked(marker) and time.monotonic() < end:
        time.sleep(0.05)
    left = _marked(marker)
    for pid in left:  # do not leave them behind, whatever the verdict
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return left


ESCAPE = """
import sys
def probe(marker):
    if os.fork() == 0:
        os.setsid()  # a new session: out of the sandbox's process group
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', marker])
        os._exit(0)
    time.sleep(0.3)
    return 'blocked'
import time
"""


HANG = """
def stuck(marker):
    probe(marker)
    while True:  # swallow the time-out: only the kill at the deadline ends this
        try:
            while True:
                pass
        except BaseException:
            pass
"""


@pytest.mark.parametrize("ending", ["returns", "killed_at_deadline"])
def test_setsid_grandchild_does_not_outlive_the_sandbox(ending):
    marker = f"flowrl-escape-{secrets.token_hex(4)}"
    if ending == "returns":
        status = sandboxed(ESCAPE, f"probe({marker!r})")
    else:
        quick = SandboxConfig(time_limit=1.0, grace=1.0, memory_limit_mb=512)
        status = sandboxed(ESCAPE + HANG, f"stuck({marker!r})", cfg=quick)
    assert _gone(marker) == [], status
    assert status == (["pass"] if ending == "returns" else ["killed"])


BOMB = """
import time
def probe(marker, n):
    made = 0
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            try:
                os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', marker])
            finally:
                os._exit(0)
        made += 1
    return 'blocked' if made < 100 else f'forked {made}'
import sys
"""


def test_fork_bomb_is_contained_and_cleaned_up():
    marker = f"flowrl-bomb-{secrets.token_hex(4)}"
    slow = SandboxConfig(time_limit=15.0, grace=1.5, memory_limit_mb=512)  # forking 60 interpreters takes seconds
    status = sandboxed(BOMB, f"probe({marker!r}, 150)", cfg=slow)
    assert _gone(marker) == [] and status == ["pass"], status


def test_cannot_kill_the_trainer_or_read_its_environment():
    """A throw-away 'trainer' with a secret in its environment runs two sandboxed attacks and must survive."""
    token = secrets.token_hex(8)
    steal = BYPASS + textwrap.dedent("""
        def probe(trainer, token):
            found = [k for k, v in os.environ.items() if token in v]
            for pid in {trainer, os.getppid(), 1, *[int(p) for p in os.listdir('/proc') if p.isdigit()]}:
                try:
                    if token.encode() in open(f'/proc/{pid}/environ', 'rb').read():
                        found.append(pid)
                except OSError:
                    pass
            return 'blocked' if not found else repr(found)
    """)
    kill = "import os, signal, time\ndef probe(trainer):\n" \
           "    for pid in (os.getppid(), trainer):\n        try:\n            os.kill(pid, signal.SIGKILL)\n" \
           "        except OSError:\n            pass\n    time.sleep(0.2)\n    return 'blocked'\n"
    script = textwrap.dedent(f"""
        import json, os
        from flowrl.rewards.code_sandbox import SandboxConfig, run_sample
        cfg = SandboxConfig(time_limit=2.0, grace=1.5, memory_limit_mb=512)
        me = os.getpid()
        r = run_sample({steal!r}, [f"assert probe({{me}}, {token!r}) == 'blocked'"], cfg)
        print(json.dumps(["environ", r.status]), flush=True)
        r = run_sample({kill!r}, [f"assert probe({{me}}) == 'blocked'"], cfg)
        print(json.dumps(["kill", r.status]), flush=True)
        print(json.dumps(["alive", True]), flush=True)
    """)
    env = dict(os.environ, FLOWRL_TRAINER_SECRET=token)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=str(REPO))
    got = dict(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    assert got.get("environ") == ["pass"], (got, out.stderr[-2000:])
    assert got.get("alive") is True and out.returncode == 0, (got, out.returncode, out.stderr[-2000:])
    assert got.get("kill") == ["pass"], got


# ------------------------------------------------------------------------------------------- forgery
# Wrong solutions that try to make the harness report passes. None computes add correctly, so every test
# must fail (TESTS has no case whose answer is None or what these return).
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
FORGERIES = {
    # write result lines in every format a harness might use on every descriptor, via __main__ and blindly
    "result_lines_via_main_and_fds": """
        import os, sys
        m = sys.modules['__main__']
        try:
            m.res.write(f"{m.nonce} R 1\\n")
            for j in range(len(m.tests)):
                m.res.write(f"{m.nonce} T {j} 1\\n")
            m.res.flush()
        except Exception:
            pass
        fake = ['{"loaded": true, "names": {}}', '{"ready": 1}'] + [
            f'{{"j": {j}, "status": "pass", "id": {j}, "ok": ["i", "3"]}}' for j in range(3)]
        for fd in range(0, 64):
            try:
                os.write(fd, ("\\n".join(fake) + "\\n").encode())
            except OSError:
                pass
        print("0 T 0 1\\n0 T 1 1\\n0 T 2 1")
        os._exit(0)
    """,
    "always_equal_object": """
        class Eq:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            __hash__ = object.__hash__
        def add(a, b):
            return Eq()
    """,
    "always_equal_str_subclass": """
        class S(str):
            def __eq__(self, other):
                return True
            __hash__ = str.__hash__
        def add(a, b):
            return S('nope')
    """,
    "patched_builtins": """
        import builtins
        builtins.exec = lambda *a, **k: None
        builtins.compile = lambda *a, **k: None
        def add(a, b):
            return None
    """,
    "patched_main_harness_functions": """
        import sys
        m = sys.modules['__main__']
        for name in list(vars(m)):
            if callable(getattr(m, name)) and not isinstance(getattr(m, name), type):
                try:
                    setattr(m, name, lambda *a, **k: None)
                except Exception:
                    pass
        def add(a, b):
            return None
    """,
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_results_do_not_pass(name):
    r = run_sample(textwrap.dedent(FORGERIES[name]), TESTS, CFG)
    assert r.passed == [False, False, False], (name, r.status)


def test_stdio_solution_cannot_print_the_expected_output_it_reads_from_the_harness():
    cases = [{"input": "3 4\n", "output": "7\n"}, {"input": "1 1", "output": "2\n"}]
    steal = textwrap.dedent("""
        import gc, sys
        m = sys.modules['__main__']
        found = getattr(m, 'case', {}).get('output') if isinstance(getattr(m, 'case', None), dict) else None
        for o in gc.get_objects():
            if found is None and isinstance(o, dict) and 'output' in o and isinstance(o['output'], str):
                found = o['output']
        print(found if found is not None else 'nothing')
    """)
    assert run_sample(steal, cases, CFG).passed == [False, False]
