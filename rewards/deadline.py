"""Hard deadlines for calls that can run away: each call runs in a worker process that is killed at its deadline.

A thread timer cannot stop ``9**9**9`` (the big-integer power holds the GIL until it is done), and a
library's own ``signal.alarm`` timeout only works on the main thread. Here the call runs in a separate
process; the caller waits on a pipe with a timeout, and at the deadline SIGKILLs the worker's whole process
group and starts a replacement. The caller's process is never blocked for longer than the deadline.

    pool = DeadlinePool(2)                               # 2 worker processes
    pool.call(fn, *args, timeout_s=3.0, **kwargs)        # fn's result, or DeadlineExceeded / WorkerError
    pool.map(fn, items, timeout_s=3.0)                   # [Outcome] in order; a timed-out item is marked
    pool.close()

- ``fn`` must be importable by name (a module-level function) and its arguments picklable: they travel to
  the worker with pickle, which is safe in that direction (they come from the caller's own process).
- Results come back through a restricted unpickler that resolves no global at all, so a worker that ran
  hostile input cannot make the caller execute anything. Results must therefore be plain data: None, bool,
  int, float, complex, str, bytes, list/tuple/dict/set of these, numpy arrays (not object dtype) and torch
  tensors (returned on the CPU; bfloat16 comes back as float32). numpy scalars come back as Python numbers.
- An exception in ``fn`` comes back as :class:`WorkerError` with the exception's type name, message and the
  type names of its ``__cause__`` chain (exceptions themselves are not unpickled).
- ``initializer(*initargs)`` runs once in every worker (and in each replacement) before its first call;
  use it to build something expensive (a model) once per worker and keep it in a module global.
- As with any ``spawn``/``forkserver`` multiprocessing, a script that builds a pool must guard its entry point
  with ``if __name__ == "__main__":`` (the ``flowrl`` command does).
- Workers start with ``forkserver`` on Linux (each is a fork of a server process that has already imported
  numpy, torch and flowrl.rewards, so a replacement after a kill starts without re-importing them) and
  ``spawn`` elsewhere. Each worker makes itself a session (and process-group) leader, dies with its parent
  (``PR_SET_PDEATHSIG``) and ignores SIGINT.
"""
from __future__ import annotations

import atexit
import ctypes
import io
import math
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (its exit hook, which joins live children, must be registered before ours)
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np

_ARRAY_TAG = "\x00flowrl.deadline.ndarray"
_TENSOR_TAG = "\x00flowrl.deadline.tensor"
_POOLS: "weakref.WeakSet[DeadlinePool]" = weakref.WeakSet()


class DeadlineExceeded(TimeoutError):
    """A call did not finish within its deadline; its worker was killed and replaced."""


class WorkerError(RuntimeError):
    """The called function raised (``type_name``, ``message``, ``chain``: type names along ``__cause__``),
    the worker died (``type_name == "WorkerCrashed"``), or its initializer failed (``"WorkerInitError"``)."""

    def __init__(self, type_name: str, message: str, chain: tuple = (), detail: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.chain, self.detail = type_name, message, tuple(chain), detail


@dataclass
class Outcome:
    """One item of :meth:`DeadlinePool.map`: ``ok`` with ``value``, or ``error`` ("TypeName: message");
    ``timed_out`` marks an item whose worker was killed at the deadline. ``seconds``: its wall time."""

    ok: bool
    value: Any = None
    error: Optional[str] = None
    timed_out: bool = False
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- plain-data codec
def _to_plain(obj: Any) -> Any:
    """obj with arrays and tensors replaced by tagged tuples; TypeError for anything not plain data."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"array dtype {obj.dtype} cannot come back from a worker")
        a = obj.copy(order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        return (_ARRAY_TAG, a.dtype.str, a.shape, a.tobytes())
    if type(obj).__module__ == "torch" and type(obj).__name__ in ("Tensor", "Parameter"):
        import torch

        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        a = t.numpy().copy(order="C")
        return (_TENSOR_TAG, a.dtype.str, a.shape, a.tobytes())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_to_plain(v) for v in obj) if not isinstance(obj, tuple) else tuple(_to_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {_to_plain(k): _to_plain(v) for k, v in obj.items()}
    raise TypeError(f"a {type(obj).__module__}.{type(obj).__qualname__} cannot come back from a worker; "
                    "return plain data (numbers, strings, lists, dicts, arrays, tensors)")


def _from_plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        if len(obj) == 4 and obj[0] in (_ARRAY_TAG, _TENSOR_TAG):
            a = np.frombuffer(obj[3], dtype=np.dtype(obj[1])).reshape(obj[2]).copy()
            if obj[0] == _TENSOR_TAG:
                import torch

                return torch.from_numpy(a)
            return a
        return tuple(_from_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_from_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {_from_plain(k): _from_plain(v) for k, v in obj.items()}
    return obj


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Loads only pickle's built-in containers and scalars: any global (class, function) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a worker's answer may not name {module}.{name}; only plain data comes back")


def _load_answer(raw: bytes) -> Any:
    return _NoGlobalsUnpickler(io.BytesIO(raw)).load()


# --------------------------------------------------------------------------------------------- worker side
def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:  # no prctl: the pipe's EOF still ends an idle worker
            pass


def _worker_main(conn, initializer: Optional[Callable], initargs: tuple, max_memory_mb: Optional[int]) -> None:
    try:
        os.setsid()  # its own process group: a kill reaches whatever it started
    except OSError:
        pass
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides when a worker ends
    if max_memory_mb is not None:
        import resource

        lim = int(max_memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    def reply(msg: tuple) -> None:
        try:
            raw = pickle.dumps(_to_plain(msg), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # the result is not plain data: say so instead
            raw = pickle.dumps(("err", "TypeError", str(e), (), ""), protocol=pickle.HIGHEST_PROTOCOL)
        conn.send_bytes(raw)

    def err(e: BaseException) -> tuple:
        chain, c = [], e.__cause__ or e.__context__
        while c is not None and len(chain) < 8:
            chain.append(type(c).__name__)
            c = c.__cause__ or c.__context__
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-4))
        return ("err", type(e).__name__, str(e), tuple(chain), tb)

    try:
        if initializer is not None:
            initializer(*initargs)
        reply(("ready",))
    except BaseException as e:
        m = err(e)
        reply(("init_err",) + m[1:])
        return
    while True:
        try:
            task = conn.recv_bytes()
        except (EOFError, OSError):  # the owner closed the pipe or died
            return
        fn, args, kwargs = pickle.loads(task)  # from the owner's own process
        try:
            reply(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            reply(err(e))


# --------------------------------------------------------------------------------------------- owner side
class _Worker:
    def __init__(self, ctx, initializer, initargs, max_memory_mb):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, initializer, initargs, max_memory_mb),
                                name="flowrl-deadline-worker", daemon=False)  # may start its own workers
        self.proc.start()
        child.close()
        self.ready = False

    def kill(self) -> None:
        pid = self.proc.pid
        if pid is not None:
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                    break
                except (ProcessLookupError, PermissionError, OSError):
                    continue
        self.proc.join(timeout=5)
        self.conn.close()


class DeadlinePool:
    """``workers`` processes that run calls under a hard deadline (see the module docstring).

    start_method: "forkserver" (Linux default) or "spawn". initializer / initargs: run once per worker.
    start_timeout_s: how long a (re)started worker may take to become ready (its initializer included; not
    counted in a call's deadline). max_memory_mb: RLIMIT_AS of each worker (None: no limit; it breaks CUDA).
    Thread-safe: concurrent ``call``s each take a free worker, or wait for one.
    """

    def __init__(self, workers: int = 1, *, start_method: Optional[str] = None,
                 initializer: Optional[Callable] = None, initargs: tuple = (),
                 start_timeout_s: float = 600.0, max_memory_mb: Optional[int] = None):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"DeadlinePool: workers must be an int >= 1; got {workers!r}")
        if not (isinstance(start_timeout_s, (int, float)) and math.isfinite(start_timeout_s) and start_timeout_s > 0):
            raise ValueError(f"DeadlinePool: start_timeout_s must be a finite number > 0; got {start_timeout_s!r}")
        if max_memory_mb is not None and (not isinstance(max_memory_mb, int) or max_memory_mb <= 0):
            raise ValueError(f"DeadlinePool: max_memory_mb must be None or an int > 0; got {max_memory_mb!r}")
        if start_method is None:
            start_method = "forkserver" if sys.platform.startswith("linux") else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"DeadlinePool: start_method={start_method!r}; valid: ['forkserver', 'spawn'] "
                             "(fork would copy the caller's threads and locks)")
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["numpy", "torch", "flowrl.rewards"])
        self._spec = (initializer, tuple(initargs), max_memory_mb)
        self.start_timeout_s = float(start_timeout_s)
        self.workers = workers
        self._lock = threading.Lock()
        self._closed = False
        self._all: set[_Worker] = set()
        self._free: "queue.Queue[_Worker]" = queue.Queue()
        for _ in range(workers):
            self._free.put(self._new_worker())
        _POOLS.add(self)

    def _new_worker(self) -> _Worker:
        w = _Worker(self._ctx, *self._spec)
        with self._lock:
            self._all.add(w)
        return w

    def _retire(self, w: _Worker, replace: bool = True) -> None:
        w.kill()
        with self._lock:
            self._all.discard(w)
            closed = self._closed
        if replace and not closed:
            self._free.put(self._new_worker())

    def _acquire(self) -> _Worker:
        while True:
            if self._closed:
                raise RuntimeError("DeadlinePool is closed")
            try:
                w = self._free.get(timeout=0.5)
            except queue.Empty:
                continue
            if w.ready:
                return w
            try:  # a fresh worker: wait for its initializer, outside any call's deadline
                if not w.conn.poll(self.start_timeout_s):
                    raise WorkerError("WorkerInitError", f"worker not ready within {self.start_timeout_s} s")
                msg = _from_plain(_load_answer(w.conn.recv_bytes()))
            except (EOFError, OSError) as e:
                self._retire(w)
                raise WorkerError("WorkerInitError", f"worker died while starting ({type(e).__name__})") from None
            except WorkerError:
                self._retire(w)
                raise
            if msg[0] != "ready":
                self._retire(w)
                raise WorkerError("WorkerInitError", f"worker initializer failed: {msg[1]}: {msg[2]}", msg[3], msg[4])
            w.ready = True
            return w

    def _run(self, w: _Worker, fn: Callable, args: tuple, kwargs: dict, timeout_s: float) -> tuple:
        """("ok", value) | ("err", type, message, chain, detail) | ("timeout",) | ("crash", message);
        kills and replaces ``w`` on timeout or crash, returns it to the free queue otherwise."""
        try:
            task = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:  # arguments that do not pickle: the worker stays free and unharmed
            self._free.put(w)
            raise
        try:
            w.conn.send_bytes(task)
            del task
            if not w.conn.poll(timeout_s):
                self._retire(w)
                return ("timeout",)
            msg = _from_plain(_load_answer(w.conn.recv_bytes()))
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            code = w.proc.exitcode
            self._retire(w)
            return ("crash", f"worker died or answered garbage (exit code {code}; {type(e).__name__}: {e})")
        self._free.put(w)
        return msg

    @staticmethod
    def _check_timeout(timeout_s: Any) -> float:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
                math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"DeadlinePool: timeout_s must be a finite number > 0; got {timeout_s!r}")
        return float(timeout_s)

    def call(self, fn: Callable, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in a worker. Raises DeadlineExceeded after ``timeout_s`` seconds (the worker
        is killed), WorkerError if fn raised or the worker died."""
        timeout_s = self._check_timeout(timeout_s)
        msg = self._run(self._acquire(), fn, args, kwargs, timeout_s)
        if msg[0] == "ok":
            return msg[1]
        if msg[0] == "timeout":
            raise DeadlineExceeded(f"{getattr(fn, '__name__', fn)} did not finish within its deadline of "
                                   f"{timeout_s:g} s; its worker was killed")
        if msg[0] == "crash":
            raise WorkerError("WorkerCrashed", msg[1])
        raise WorkerError(msg[1], msg[2], msg[3], msg[4])

    def map(self, fn: Callable, items: Iterable[Any], *, timeout_s: float) -> list[Outcome]:
        """[Outcome of fn(item)] in the order of ``items``, each item under its own deadline of
        ``timeout_s`` seconds, spread over the pool's workers. Never raises for an item's failure."""
        timeout_s = self._check_timeout(timeout_s)
        items = list(items)
        out: list[Optional[Outcome]] = [None] * len(items)
        lock = threading.Lock()
        nxt = iter(range(len(items)))

        def drain() -> None:  # one thread per worker in use, each waiting on its own worker's pipe
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t0 = time.monotonic()
                try:
                    msg = self._run(self._acquire(), fn, (items[i],), {}, timeout_s)
                except WorkerError as e:  # a worker that could not start
                    msg = ("crash", str(e))
                dt = time.monotonic() - t0
                if msg[0] == "ok":
                    out[i] = Outcome(True, msg[1], seconds=dt)
                elif msg[0] == "timeout":
                    out[i] = Outcome(False, error=f"DeadlineExceeded: deadline of {timeout_s:g} s", timed_out=True, seconds=dt)
                elif msg[0] == "crash":
                    out[i] = Outcome(False, error=f"WorkerCrashed: {msg[1]}", seconds=dt)
                else:
                    out[i] = Outcome(False, error=f"{msg[1]}: {msg[2]}", seconds=dt)

        threads = [threading.Thread(target=drain, daemon=True) for _ in range(min(self.workers, len(items)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Kill every worker (idle or busy). Idempotent."""
        with self._lock:
            self._closed = True
            ws = list(self._all)
        for w in ws:
            self._retire(w, replace=False)

    def __enter__(self) -> "DeadlinePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


@atexit.register
def _close_all_pools() -> None:  # registered after multiprocessing's own exit hook, so it runs first
    for p in list(_POOLS):
        p.close()
