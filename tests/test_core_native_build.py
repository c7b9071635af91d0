"""The native kernels' build and switches: no compiler, a failing compiler, FLOWRL_NATIVE=0/1/auto and a bad value.
Each case runs in a fresh interpreter (the build is attempted once per process)."""
from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_build_failures_are_clear(tmp_path):
    code = ("import warnings, torch\nfrom flowrl.core import native, compute_advantages\n"
            "warnings.simplefilter('always')\nprint('lib', native.library() is not None)\n")
    # no compiler: a warning, and the torch path runs
    r = _run(code, CC="no-such-cc", FLOWRL_CACHE=str(tmp_path), FLOWRL_NATIVE="auto")
    assert r.returncode == 0, r.stderr
    assert "lib False" in r.stdout and "no-such-cc" in r.stderr and "torch path" in r.stderr
    # ... an error when the kernels are required
    r = _run(code, CC="no-such-cc", FLOWRL_CACHE=str(tmp_path), FLOWRL_NATIVE="1")
    assert r.returncode != 0 and "required but unavailable" in r.stderr and "no-such-cc" in r.stderr
    # an unknown setting names the valid ones
    r = _run(code, FLOWRL_NATIVE="yes")
    assert r.returncode != 0 and "FLOWRL_NATIVE='yes'" in r.stderr and "valid values" in r.stderr
    # a compiler that fails: its message comes through
    bad = tmp_path / "badcc"
    bad.write_text("#!/bin/sh\necho 'cc: internal error 42' >&2\nexit 3\n")
    bad.chmod(0o755)
    r = _run(code, CC=str(bad), FLOWRL_CACHE=str(tmp_path / "c2"), FLOWRL_NATIVE="1")
    assert r.returncode != 0 and "internal error 42" in r.stderr and "exit 3" in r.stderr
    # the off switch
    r = _run(code, FLOWRL_NATIVE="0")
    assert r.returncode == 0 and "lib False" in r.stdout
