"""Per-sample scorers under a hard deadline: text scorers that can run away (math-verify's sympy on
``$9^{9^{9}}$``, a task scorer) run in worker processes that are killed at the deadline.

:class:`DeadlineScorer` owns a :class:`flowrl.rewards.deadline.DeadlinePool` (started on first use) and maps
a module-level function over the samples of a batch, each sample under its own deadline of ``timeout_s``
seconds. A sample whose deadline passes gets ``None`` and is marked timed out; the reward scores it 0 and
counts it in its part ``"<name>/timeout"`` (never a silent zero). A scorer that raises, or a worker that
dies, is an error naming the reward and the sample (the reward's ``on_error`` policy decides what follows).
The worker runs the call on its main thread, so a library's own ``signal.alarm`` timeouts work there too.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable, Optional, Sequence

from .deadline import DeadlinePool


class ScorerError(RuntimeError):
    """A per-sample scorer raised in its worker, or the worker died."""


class ScorerInputError(ScorerError, ValueError):
    """A per-sample scorer refused its input (it raised ValueError, TypeError, KeyError or IndexError): the
    sample's fault, not the scorer's (the reward server answers 422, not a retryable 500)."""


_INPUT_FAULTS = ("ValueError", "TypeError", "KeyError", "IndexError", "UnicodeError")


def check_timeout(timeout_s: Any, who: str) -> float:
    """``timeout_s`` as a float; anything but a finite number > 0 raises ValueError naming ``who``."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"{who}: timeout_s must be a finite number of seconds > 0; got {timeout_s!r}")
    return float(timeout_s)


def check_workers(workers: Any, who: str) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{who}: workers must be an integer >= 1; got {workers!r}")
    return workers


def _run_chunk(job: tuple[Callable[[Any], Any], list]) -> list:
    fn, items = job
    return [fn(x) for x in items]


class DeadlineScorer:
    """``map(fn, items) -> (values, timed_out)`` with each ``fn(item)`` in a worker process killed after
    ``timeout_s`` seconds. ``initializer`` runs once per worker (and per replacement) outside any deadline:
    use it to import heavy modules, so that a replacement does not spend the next sample's time importing.

    ``chunk`` > 1 sends up to that many samples per round trip (a scorer of microseconds would otherwise pay
    more for the trip than for the work): a chunk must finish within ``timeout_s`` as a whole, and a chunk that
    does not (or that fails) is scored again sample by sample, each under its own ``timeout_s``, so that only
    the samples that run away are marked."""

    def __init__(self, who: str, timeout_s: float, workers: int = 1, initializer: Optional[Callable[[], Any]] = None,
                 chunk: int = 1):
        self.who = who
        self.timeout_s = check_timeout(timeout_s, who)
        self.workers = check_workers(workers, who)
        self.initializer = initializer
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"{who}: chunk must be an integer >= 1; got {chunk!r}")
        self.chunk = chunk
        self._pool: Optional[DeadlinePool] = None
        self._lock = threading.Lock()

    def _get_pool(self) -> DeadlinePool:
        with self._lock:
            if self._pool is None:
                self._pool = DeadlinePool(self.workers, initializer=self.initializer)
            return self._pool

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> tuple[list[Any], list[bool]]:
        """(values, timed_out) in the order of ``items``; ``values[i]`` is None where ``timed_out[i]``."""
        if not items:
            return [], []
        pool = self._get_pool()
        values: list[Any] = [None] * len(items)
        late = [False] * len(items)
        single = list(range(len(items)))
        if self.chunk > 1:
            size = min(self.chunk, -(-len(items) // self.workers))  # every worker gets a share
            starts = list(range(0, len(items), size))
            done = pool.map(_run_chunk, [(fn, list(items[a: a + size])) for a in starts], timeout_s=self.timeout_s)
            single = []
            for a, o in zip(starts, done):
                n = min(size, len(items) - a)
                if o.ok and isinstance(o.value, list) and len(o.value) == n:
                    values[a: a + n] = o.value
                else:  # late or failed as a whole: find the samples responsible one by one
                    single.extend(range(a, a + n))
        if single:
            for i, o in zip(single, pool.map(fn, [items[i] for i in single], timeout_s=self.timeout_s)):
                if not o.ok and not o.timed_out:
                    kind = ScorerInputError if str(o.error).split(":", 1)[0] in _INPUT_FAULTS else ScorerError
                    raise kind(f"{self.who}: sample {i}: {o.error}")
                values[i], late[i] = (o.value if o.ok else None), bool(o.timed_out)
        return values, late

    def close(self) -> None:
        """Kill the workers (a later ``map`` starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def __getstate__(self) -> dict:  # a copy (pickled, deep-copied) starts its own workers
        state = dict(self.__dict__)
        state["_pool"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
