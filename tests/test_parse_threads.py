"""Parsing from many threads at once (the reward server's handler threads, the client's threads).

On CPython before 3.11.8 two threads in ``ast.parse`` at once, with the garbage collector running a ``__del__``
in the middle of one, raise ``SystemError: AST constructor recursion depth mismatch``; numpy reads every .npy
header with ``ast.literal_eval``. These tests make the collector run often (a low threshold, objects in cycles
with a ``__del__``) and switch threads as often as the interpreter allows.
"""
from __future__ import annotations

import gc
import sys
import threading
from fractions import Fraction

import numpy as np

from flowrl.rewards.safe_eval import safe_eval
from flowrl.rewards.wire import decode_npy_bytes, npy_bytes


class _Cycle:
    def __init__(self):
        self.me = self  # only the cyclic collector frees it, mid-parse in some other thread

    def __del__(self):
        total = 0
        for i in range(50):  # Python code, so the interpreter may switch threads here
            total += i


def _hammer(fn, threads: int = 8, calls: int = 600, switch_s: float = 1e-6) -> list[str]:
    errors: list[str] = []

    def work():
        for _ in range(calls):
            try:
                fn()
                [_Cycle() for _ in range(20)]
            except Exception as e:  # reported by the caller
                errors.append(repr(e))
                return

    old_threshold, old_interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(50)
    sys.setswitchinterval(switch_s)
    try:
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_interval)
        gc.collect()
    return errors


def test_npy_headers_decode_from_many_threads():
    arr = np.arange(48, dtype=np.float32).reshape(3, 1, 4, 4)
    raw = npy_bytes(arr)

    def decode():
        assert np.array_equal(decode_npy_bytes(raw, "samples"), arr)

    errors = _hammer(decode)
    assert not errors, (len(errors), errors[:2])


def test_safe_eval_from_many_threads():
    def evaluate():
        assert safe_eval("+".join(["((1+2)*3-4/8)"] * 24)) == 24 * Fraction(17, 2)

    errors = _hammer(evaluate, threads=4, calls=150)
    assert not errors, (len(errors), errors[:2])
