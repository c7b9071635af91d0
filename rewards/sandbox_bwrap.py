"""Starting and killing the code sandbox's processes: bubblewrap, or (opted into by name) a bare process.

``sandbox="bwrap"`` (the default) runs each sandboxed interpreter under bubblewrap
(https://github.com/containers/bubblewrap; Debian/Ubuntu package ``bubblewrap``) with:

- new PID, network, IPC, UTS and (where possible) cgroup namespaces: the sandbox sees only its own processes
  in ``/proc``, has no network interface but a downed loopback, and cannot signal or read the trainer;
- an unprivileged uid with no capabilities. As root, bubblewrap runs privileged (no user namespace) keeping
  only CAP_SETUID/CAP_SETGID, and the runtime's first act is to become a uid of its own (one per live sandbox,
  from ``UID_BASE``), which clears every capability; so RLIMIT_NPROC holds (the kernel never applies it to
  uid 0) and one sandbox's fork bomb cannot starve another's. As a normal user, bubblewrap makes a user
  namespace with uid/gid 65534 and forbids nested user namespaces (``--disable-userns``, bubblewrap >= 0.8);
- a read-only view of ``/usr`` (with the ``/bin``, ``/lib*`` links or directories) and of the interpreter's
  prefix; the prefix's ``site-packages`` is hidden behind an empty tmpfs. No ``/etc``, ``/home``, ``/root``
  (beyond the path down to the prefix), ``/run``, ``/var``, no working directory of the trainer;
- a fresh ``/proc`` and a minimal ``/dev``; one writable tmpfs at ``/tmp`` (mode 1777, size-limited), which is
  the cwd, HOME and TMPDIR, and is gone with the sandbox;
- ``--die-with-parent`` and ``--new-session``; the environment is cleared (only PATH, HOME, TMPDIR, LANG and
  thread-count variables are set), so nothing of the trainer's environment enters.

:func:`Proc.kill` sends SIGKILL to the PID namespace's init (its pid comes from ``--info-fd``) and then waits
for bubblewrap: the kernel kills every process of a PID namespace when its init dies, and bubblewrap exits only
after that, so a ``setsid`` grandchild or a fork bomb is gone when ``kill`` returns.

``sandbox="unsafe-process"`` runs the same runtime as a plain ``python -I -S`` child in its own session with
rlimits and a temporary cwd: it stops accidents (hangs, crashes, memory) but not an attacker.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Optional

SANDBOXES = ("bwrap", "unsafe-process")
UID_BASE = 200_000  # sandbox uids when running as root: UID_BASE + (pid % 8000) * 256 + slot
_RUNTIME = (Path(__file__).with_name("sandbox_runtime.py")).read_text()
_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SandboxUnavailable(RuntimeError):
    """The isolating sandbox cannot run here; untrusted code is refused."""


def python_executable() -> str:
    """The base interpreter (not a virtual environment's wrapper), which needs only its prefix and /usr."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def find_bwrap() -> Optional[str]:
    return shutil.which("bwrap")


def _version(bwrap: str) -> tuple[int, ...]:
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)


def _readonly_view(python: str) -> list[str]:
    """bwrap arguments for the read-only file system: /usr, the /bin and /lib* entries, the interpreter's prefix."""
    args = ["--ro-bind", "/usr", "/usr"]
    for p in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(p):
            args += ["--symlink", os.readlink(p), p]
        elif os.path.isdir(p):
            args += ["--ro-bind", p, p]
    roots = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python))}
    made = set()
    for root in sorted(roots):
        if root in ("/", "/usr") or root.startswith("/usr/"):
            continue
        parts = Path(root).parts
        for i in range(2, len(parts)):  # the path down to the prefix: fresh 0755 directories (not /root's 0700)
            d = str(Path(*parts[:i]))
            if d not in made:
                made.add(d)
                args += ["--perms", "0755", "--dir", d]
        args += ["--ro-bind", root, root]
    for site in {sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})[k]
                 for k in ("purelib", "platlib")}:
        if os.path.isdir(site):
            args += ["--tmpfs", site, "--remount-ro", site]
    return args


class _Setup:
    """What was found out once per process: the bwrap argument prefix, or why there is none."""

    lock = threading.Lock()
    prefix: Optional[list[str]] = None
    error: Optional[str] = None
    checked = False


def bwrap_prefix(tmp_bytes: int) -> list[str]:
    """The bubblewrap options (everything before ``--``); raises SandboxUnavailable where bwrap does not work."""
    with _Setup.lock:
        if not _Setup.checked:
            _Setup.checked = True
            try:
                _Setup.prefix = _probe()
            except SandboxUnavailable as e:
                _Setup.error = str(e)
    if _Setup.prefix is None:
        raise SandboxUnavailable(_Setup.error)
    return _Setup.prefix + ["--perms", "1777", "--size", str(int(tmp_bytes)), "--tmpfs", "/tmp", "--chdir", "/tmp"]


def _refusal(why: str) -> str:
    return (f"the flowrl code sandbox needs bubblewrap, and {why}. Install it (Debian/Ubuntu: "
            "`apt-get install bubblewrap`) or, to run untrusted code WITHOUT isolation (it could read and write your "
            "files, reach the network and kill the trainer), opt in by name with sandbox='unsafe-process' "
            "(code_tests option `sandbox: unsafe-process`)")


def _probe() -> list[str]:
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(_refusal(f"bubblewrap runs only on Linux (this is {sys.platform})"))
    bwrap = find_bwrap()
    if bwrap is None:
        raise SandboxUnavailable(_refusal("`bwrap` is not on PATH"))
    version = _version(bwrap)
    if version < (0, 5):
        raise SandboxUnavailable(_refusal(f"bubblewrap {'.'.join(map(str, version))} is older than 0.5"))
    python = python_executable()
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL"]
        if version >= (0, 8):
            args += ["--disable-userns"]
    for k, v in _ENV.items():
        args += ["--setenv", k, v]
    args += _readonly_view(python)
    args += ["--proc", "/proc", "--dev", "/dev"]
    test = args + ["--perms", "1777", "--size", str(1 << 20), "--tmpfs", "/tmp", "--chdir", "/tmp",
                   "--", python, "-I", "-S", "-c", "import os, json; print(json.dumps([os.getcwd(), os.listdir('/')]))"]
    try:
        out = subprocess.run(test, capture_output=True, text=True, timeout=30, env=dict(_ENV), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(_refusal(f"running it failed ({e})")) from None
    if out.returncode != 0 or not out.stdout.startswith('["/tmp"'):
        why = (out.stderr.strip() or out.stdout.strip() or f"exit status {out.returncode}")[-500:]
        raise SandboxUnavailable(_refusal(f"it does not work on this machine: {why}"))
    return args


def sandbox_status(sandbox: str = "bwrap") -> str:
    """``"ok"`` if ``sandbox`` can run untrusted code here, else the message it would refuse with."""
    check_sandbox(sandbox)
    if sandbox != "bwrap":
        return "ok"
    try:
        bwrap_prefix(1 << 20)
        return "ok"
    except SandboxUnavailable as e:
        return str(e)


def check_sandbox(sandbox: str) -> None:
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox={sandbox!r} is not valid; valid: {', '.join(map(repr, SANDBOXES))} "
                         "('unsafe-process' does not isolate: use it only for code you trust)")


class _Uids:
    lock = threading.Lock()
    free = list(range(255, -1, -1))


def _take_uid() -> int:
    with _Uids.lock:
        if not _Uids.free:
            raise RuntimeError("more than 256 code sandboxes at once in one process; lower `workers`")
        slot = _Uids.free.pop()
    return UID_BASE + (os.getpid() % 8000) * 256 + slot


def _give_uid(uid: int) -> None:
    with _Uids.lock:
        _Uids.free.append((uid - UID_BASE) % 256)


class Proc:
    """One sandboxed runtime: ``role`` is "solution" or "judge"; ``cfg`` goes to it as one JSON line on stdin.

    ``pass_fds`` keep their numbers inside. ``stdout`` is a pipe (``self.stdout``, raw fd) when ``read=True``.
    """

    def __init__(self, role: str, cfg: dict, sandbox: str, tmp_bytes: int, pass_fds=(), read: bool = False):
        check_sandbox(sandbox)
        self.sandbox, self.uid, self.workdir, self.info_r = sandbox, None, None, None
        src = f"ROLE = {role!r}\n" + _RUNTIME
        python = python_executable()
        fds = list(pass_fds)
        if sandbox == "bwrap":
            prefix = bwrap_prefix(tmp_bytes)
            if os.geteuid() == 0:
                self.uid = _take_uid()
            self.info_r, info_w = os.pipe()
            fds.append(info_w)
            argv = prefix + ["--info-fd", str(info_w), "--", python, "-I", "-S", "-c", src]
            cwd, env = "/", dict(_ENV)
            cfg = dict(cfg, uid=self.uid)
        else:
            self.workdir = tempfile.mkdtemp(prefix="flowrl-sandbox-")
            argv, cwd = [python, "-I", "-S", "-c", src], self.workdir
            env = dict(_ENV, HOME=self.workdir, TMPDIR=self.workdir)
            cfg = dict(cfg, uid=None, max_procs=None, patch_socket=True)
        try:
            self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE if read else subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, cwd=cwd, env=env, pass_fds=fds,
                                          start_new_session=True)
        except BaseException:
            self._release()
            raise
        finally:
            if self.info_r is not None:
                os.close(info_w)
        self.stdout = self.popen.stdout.fileno() if read else None
        try:
            self.popen.stdin.write((json.dumps(cfg) + "\n").encode())
            self.popen.stdin.close()
        except BrokenPipeError:
            pass

    def _init_pid(self) -> Optional[int]:
        """The PID namespace's init, as bwrap reported it on --info-fd (None if it has not yet)."""
        if self.info_r is None or not select.select([self.info_r], [], [], 0)[0]:
            return None
        try:
            pid = json.loads(os.read(self.info_r, 65536).decode()).get("child-pid")
            return pid if isinstance(pid, int) and pid > 1 else None
        except (OSError, ValueError, AttributeError):
            return None

    def kill(self) -> None:
        """SIGKILL the whole tree and reap it; returns once every process of the sandbox is gone (bwrap)."""
        if self.popen.poll() is None:
            init = self._init_pid()
            if init is not None:
                try:
                    os.kill(init, signal.SIGKILL)  # the kernel then kills every process in its PID namespace
                except ProcessLookupError:
                    pass
            else:
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        if self.sandbox == "unsafe-process":  # no PID namespace: the session's group is all we can reach
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._release()

    def _release(self) -> None:
        if self.info_r is not None:
            os.close(self.info_r)
            self.info_r = None
        if self.uid is not None:
            _give_uid(self.uid)
            self.uid = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
