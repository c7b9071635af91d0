"""Fused CPU kernels for the core's token-level passes, built from ``native_kernels.c`` on first use.

Eager torch pays one pass over [B, T] per operation; a token-level recurrence (GAE, REINFORCE++ returns,
PRIME's process returns) then costs 14-18 passes, and a per-step gather or sum several. The C kernels here do
each of these in one pass: a fused discounted scan with its reward, critic and whitening sums; the
whitening's apply step; per-trajectory broadcasts, per-step gathers and sums; and compute_advantages' final
masking with its finiteness check.

When they run (decided per call by ``flowrl.core.kernels.use_native``, the one dispatch): CPU tensors, no autograd through the inputs, and a C compiler (``$CC`` or ``cc``) that built
the library (once per source version, cached in ``$FLOWRL_CACHE`` or ``~/.cache/flowrl``; about a second).
Otherwise the torch path runs (CUDA always does), with the same results to float32 rounding;
``tests/test_core_native.py`` checks both against loop references. ``FLOWRL_NATIVE=0`` turns the kernels
off, ``FLOWRL_NATIVE=1`` makes a failed build an error instead of a warning. Rows are split over
``torch.get_num_threads()`` threads (ctypes releases the GIL during a call).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

_SRC = Path(__file__).with_name("native_kernels.c")
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno"]
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_tried = False
_forced: Optional[bool] = None  # set by ``enabled(...)`` (tests compare both paths)
_pool: Optional[ThreadPoolExecutor] = None
_pool_pid = -1
_MIN_ROWS_PER_THREAD = 256  # below this a thread costs more than it saves

_i64, _f32, _p = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "flowrl_scan": ([_i64, _i64, _i64] + [_p] * 7 + [_f32, _f32, _f32, _p, _p, _p], None),
    "flowrl_row_sums": ([_i64, _i64, _i64, _p, _p, _p, _p, _p], None),
    "flowrl_affine_masked": ([_i64, _i64, _i64, _p, _p, _f32, _f32], None),
    "flowrl_zero_off_mask_count_nonfinite": ([_i64, _i64, _i64, _p, _p], _i64),
    "flowrl_broadcast_rows": ([_i64, _i64, _i64, _p, _p, _p], None),
    "flowrl_gather_steps": ([_i64, _i64, _i64, _i64, _p, _p, _p, _p], None),
    "flowrl_step_sums": ([_i64, _i64, _i64, _i64, _p, _p, _p, _p, _p], None),
    "flowrl_simd": ([ctypes.c_int], ctypes.c_int),
}


def _mode() -> str:
    v = os.environ.get("FLOWRL_NATIVE", "auto").strip().lower()
    if v not in ("0", "1", "auto", ""):
        raise ValueError(f"FLOWRL_NATIVE={v!r}; valid values are 0 (off), 1 (required) and auto (default)")
    return v or "auto"


def _cache_dir() -> Path:
    root = os.environ.get("FLOWRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowrl")
    return Path(root) / "native"


def _build() -> ctypes.CDLL:
    """Compile native_kernels.c into the cache (keyed by source, flags, compiler and machine) and load it."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH (set CC, or FLOWRL_NATIVE=0 for the torch path)")
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join([cc] + _FLAGS + [platform.machine(), sys.platform]).encode()).hexdigest()[:16]
    target = None
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"flowrl-native-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            target = d / f"kernels-{key}.so"
            break
        except OSError:
            continue
    if target is None:
        raise RuntimeError(f"no writable cache directory for the native kernels (tried {_cache_dir()})")
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            res = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SRC), "-lm"], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed to build {_SRC.name} (exit {res.returncode}):\n{res.stderr[-2000:]}")
            os.replace(tmp, target)  # atomic: concurrent processes (ranks) may build at once
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, building them on first call; None when off or when the build failed (with a warning;
    an error under FLOWRL_NATIVE=1)."""
    global _lib, _tried
    if _forced is False or (_forced is None and _mode() == "0"):
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as e:
                if _forced or _mode() == "1":
                    raise RuntimeError(f"flowrl native kernels required but unavailable: {e}") from e
                warnings.warn(f"flowrl: native CPU kernels unavailable, using the torch path ({e})", RuntimeWarning)
                _lib = None
            _tried = True
    return _lib


@contextlib.contextmanager
def enabled(flag: bool):
    """Within the block, use the kernels (True; an error if they cannot be built) or never (False)."""
    global _forced
    prev = _forced
    _forced = flag
    try:
        if flag and library() is None:
            raise RuntimeError("flowrl native kernels are not available")
        yield
    finally:
        _forced = prev


def simd(flag: Optional[bool] = None) -> bool:
    """Whether the AVX2 paths run (x86-64 CPUs with AVX2 and FMA); ``flag`` False forces the portable code,
    True restores the default (tests run both)."""
    lib = library()
    if lib is None:
        return False
    return bool(lib.flowrl_simd(-1 if flag is None else int(flag)))


# ----------------------------------------------------------------------------- calling convention
def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _f32c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _maskc(mask: Tensor) -> Tensor:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask has dtype {mask.dtype}; expected torch.bool")
    return mask.contiguous()


def _run_rows(fn, B: int, *args) -> list:
    """fn(r0, r1, *args) over row blocks, on up to torch.get_num_threads() threads; returns each call's result."""
    global _pool, _pool_pid
    n = max(1, min(torch.get_num_threads(), B // _MIN_ROWS_PER_THREAD))
    if n == 1:
        return [fn(0, B, *args)]
    if _pool is None or _pool._max_workers < n or _pool_pid != os.getpid():  # a forked child has no pool threads
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="flowrl-native")
        _pool_pid = os.getpid()
    # cuts on multiples of 8 rows: the kernels step rows in blocks of 8 and take the rest one by one, so every
    # row takes the same code (and rounding) whatever the number of threads
    cuts = [min(B, (B * k // n) // 8 * 8) for k in range(n)] + [B]
    futs = [_pool.submit(fn, cuts[k], cuts[k + 1], *args) for k in range(n)]
    return [f.result() for f in futs]


# ----------------------------------------------------------------------------- kernels
def scan(mask: Tensor, *, a: Optional[Tensor] = None, b: Optional[Tensor] = None, coef: Optional[Tensor] = None,
         bias: Optional[Tensor] = None, end: Optional[Tensor] = None, value: Optional[Tensor] = None,
         gamma: float = 1.0, c: float = 1.0, scale: float = 1.0, out: Optional[Tensor] = None,
         stats: bool = False) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The fused scan (see ``flowrl_scan`` in native_kernels.c): on valid actions,
    r_t = coef_i (a_t - b_t) + bias_i + [t last] end_i (b None: coef_i a_t; coef None: 1), delta_t = r_t + gamma V_next - V_t,
    y_t = scale * sum_{s >= t valid} c^{rank(s) - rank(t)} delta_s; 0 off the mask.

    mask bool [B, T]; a, b, value float [B, T] or None; coef, bias, end float [B] or None. ``out``: a contiguous
    float32 [B, T] to write into; it may be one of the inputs (position t is read before it is written, and
    positions are visited once, from the end).
    Returns (y float32 [B, T], rowsum, rowsq) with the row sums float64 [B] when ``stats``.
    """
    lib = library()
    mask = _maskc(mask)
    B, T = mask.shape
    if b is not None and a is None:
        raise ValueError("native.scan: b without a (the term is coef * (a - b))")
    a, b, value = _f32c(a), _f32c(b), _f32c(value)
    coef, bias, end = _f32c(coef), _f32c(bias), _f32c(end)
    if out is None:
        out = torch.empty(B, T, dtype=torch.float32)
    rs = torch.empty(B, dtype=torch.float64) if stats else None
    rq = torch.empty(B, dtype=torch.float64) if stats else None
    _run_rows(lib.flowrl_scan, B, T, _ptr(mask), _ptr(a), _ptr(b), _ptr(coef), _ptr(bias), _ptr(end), _ptr(value),
              float(gamma), float(c), float(scale), _ptr(out), _ptr(rs), _ptr(rq))
    return out, rs, rq


def row_sums(mask: Tensor, x: Tensor, y: Optional[Tensor] = None, *, squares: bool = False
             ) -> tuple[Tensor, Optional[Tensor]]:
    """(sum, sum of squares or None) over each row's valid actions of x - y (or x): float64 [B] each."""
    lib = library()
    mask = _maskc(mask)
    x, y = _f32c(x), _f32c(y)
    B, T = mask.shape
    s = torch.empty(B, dtype=torch.float64)
    q = torch.empty(B, dtype=torch.float64) if squares else None
    _run_rows(lib.flowrl_row_sums, B, T, _ptr(mask), _ptr(x), _ptr(y), _ptr(s), _ptr(q))
    return s, q


def affine_masked_(x: Tensor, mask: Tensor, mu: float, inv: float) -> Tensor:
    """x = (x - mu) * inv on the mask and 0 off it, in place (x contiguous float32 [B, T]). Returns x."""
    _check_inplace(x, mask)
    lib = library()
    mask = _maskc(mask)
    B, T = mask.shape
    _run_rows(lib.flowrl_affine_masked, B, T, _ptr(mask), _ptr(x), float(mu), float(inv))
    return x


def zero_off_mask_count_nonfinite_(x: Tensor, mask: Tensor) -> int:
    """x = 0 off the mask, in place; returns how many values on the mask are NaN or inf."""
    _check_inplace(x, mask)
    lib = library()
    mask = _maskc(mask)
    B, T = mask.shape
    return int(sum(_run_rows(lib.flowrl_zero_off_mask_count_nonfinite, B, T, _ptr(mask), _ptr(x))))


def broadcast_rows(values: Tensor, mask: Tensor) -> Tensor:
    """float32 [B, T]: values[i] (float [B]) on row i's valid actions, 0 elsewhere."""
    lib = library()
    mask = _maskc(mask)
    B, T = mask.shape
    v = _f32c(values)
    out = torch.empty(B, T, dtype=torch.float32)
    _run_rows(lib.flowrl_broadcast_rows, B, T, _ptr(mask), _ptr(v), _ptr(out))
    return out


def gather_steps(per_step: Tensor, step: Tensor, mask: Tensor) -> Tensor:
    """float32 [B, T]: per_step[i, clamp(step[i, t])] on valid actions, 0 elsewhere (per_step float [B, S], finite;
    step long [B, T])."""
    lib = library()
    mask = _maskc(mask)
    B, T = mask.shape
    per = _f32c(per_step)
    st = step.to(torch.int64).contiguous()
    out = torch.empty(B, T, dtype=torch.float32)
    _run_rows(lib.flowrl_gather_steps, B, T, per.shape[1], _ptr(mask), _ptr(st), _ptr(per), _ptr(out))
    return out


def step_sums(step: Tensor, mask: Tensor, values: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """(count, total) float32 [B, S]: valid actions of each step and the sum of ``values`` over them."""
    lib = library()
    mask = _maskc(mask)
    B, T = mask.shape
    st = step.to(torch.int64).contiguous()
    x = _f32c(values)
    cnt = torch.empty(B, S, dtype=torch.float32)
    tot = torch.empty(B, S, dtype=torch.float32)
    _run_rows(lib.flowrl_step_sums, B, T, S, _ptr(mask), _ptr(st), _ptr(x), _ptr(cnt), _ptr(tot))
    return cnt, tot


def _check_inplace(x: Tensor, mask: Tensor) -> None:
    if x.dtype != torch.float32 or not x.is_contiguous() or tuple(x.shape) != tuple(mask.shape):
        raise ValueError(f"expected a contiguous float32 tensor of the mask's shape {tuple(mask.shape)}; "
                         f"got {x.dtype} {tuple(x.shape)} (contiguous={x.is_contiguous()})")
