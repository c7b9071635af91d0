"""DeadlinePool: a GIL-holding runaway is killed at its deadline, the pool keeps working after a kill,
results equal a direct call, failures come back typed, and answers cannot smuggle a global past the pipe."""
from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch

from flowrl.rewards.deadline import DeadlineExceeded, DeadlinePool, Outcome, WorkerError, _load_answer


def _power(a: int, b: int) -> int:
    return a ** b  # 9 ** (9 ** 9) holds the GIL for minutes: no thread timer can interrupt it


def _stats(x: torch.Tensor, scale: float = 1.0) -> dict:
    return {"sum": x.sum() * scale, "arr": np.arange(4, dtype=np.int16), "t": (1, "a", None), "n": np.float32(2.5)}


def _boom(x):
    try:
        raise KeyError(x)
    except KeyError as e:
        raise ValueError(f"bad {x}") from e


def _pid(_=None) -> int:
    return os.getpid()


def _not_plain():
    return object()


def _sleep(s: float) -> float:
    time.sleep(s)
    return s


_STATE = {}


def _init(v):
    _STATE["v"] = v


def _get_state():
    return _STATE["v"]


@pytest.fixture(scope="module")
def pool():
    p = DeadlinePool(2)
    yield p
    p.close()


def test_results_equal_a_direct_call(pool):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    got = pool.call(_stats, x, timeout_s=60, scale=3.0)
    want = _stats(x, scale=3.0)
    torch.testing.assert_close(got["sum"], want["sum"], rtol=0, atol=0)
    assert isinstance(got["arr"], np.ndarray) and got["arr"].dtype == np.int16 and got["arr"].tolist() == [0, 1, 2, 3]
    assert got["t"] == (1, "a", None) and got["n"] == 2.5
    assert pool.call(_power, 3, 40, timeout_s=60) == 3 ** 40


def test_gil_holding_runaway_killed_at_deadline_and_pool_keeps_working(pool):
    pool.call(_pid, timeout_s=60)  # both workers ready
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline of 1 s"):
        pool.call(_power, 9, 9 ** 9, timeout_s=1.0)
    assert time.monotonic() - t0 < 1.0 + 1.0
    # the pool answers after the kill, with a fresh worker, and gives the right result
    assert pool.call(_power, 2, 100, timeout_s=60) == 2 ** 100




def _pow_item(ab):
    return ab[0] ** ab[1]


def test_map_marks_timeouts_and_errors(pool):
    t0 = time.monotonic()
    outs = pool.map(_pow_item, [(2, 10), (9, 9 ** 9), (3, 3), (7, 2)], timeout_s=1.0)
    assert time.monotonic() - t0 < 1.0 + 3.0
    assert [o.ok for o in outs] == [True, False, True, True]
    assert [o.value for o in outs if o.ok] == [1024, 27, 49]
    assert outs[1].timed_out and "DeadlineExceeded" in outs[1].error
    bad = pool.map(_boom, ["q"], timeout_s=30)[0]
    assert isinstance(bad, Outcome) and not bad.ok and not bad.timed_out and bad.error == "ValueError: bad q"


def test_errors_come_back_typed(pool):
    with pytest.raises(WorkerError) as ei:
        pool.call(_boom, "z", timeout_s=30)
    assert ei.value.type_name == "ValueError" and ei.value.message == "bad z" and ei.value.chain == ("KeyError",)
    with pytest.raises(WorkerError, match="cannot come back from a worker"):
        pool.call(_not_plain, timeout_s=30)
    with pytest.raises(WorkerError, match="WorkerCrashed"):
        pool.call(os._exit, 3, timeout_s=30)
    assert pool.call(_power, 2, 5, timeout_s=30) == 32
    with pytest.raises(ValueError, match="timeout_s"):
        pool.call(_pid, timeout_s=-5)
    with pytest.raises(ValueError, match="workers"):
        DeadlinePool(0)


def test_answers_cannot_name_a_global():
    evil = pickle.dumps(os.system)  # what a hijacked worker could send
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        _load_answer(evil)
    assert _load_answer(pickle.dumps({"a": [1, 2.0, b"x", (None,)]})) == {"a": [1, 2.0, b"x", (None,)]}


def test_initializer_runs_in_each_worker_and_after_a_kill():
    with DeadlinePool(1, initializer=_init, initargs=("hello",)) as p:
        pid = p.call(_pid, timeout_s=60)
        assert p.call(_get_state, timeout_s=60) == "hello"
        with pytest.raises(DeadlineExceeded):
            p.call(_sleep, 30, timeout_s=0.5)
        assert p.call(_get_state, timeout_s=60) == "hello" and p.call(_pid, timeout_s=60) != pid
    with pytest.raises(RuntimeError, match="closed"):
        p.call(_pid, timeout_s=1)
