"""Weight schedules: a training step (a Python number) in, a weight (a Python float) out.

Process-to-outcome decay (Atom-Searcher), a trust weight's decay (Trust-GRPO), delayed rewards and warm-ups
(GRPO-PTR, SophiaVL-R1, AC-Flow, OREAL). They run on the host, outside the tensor path, and are found by name in
``SCHEDULES`` (``schedule(name, step, **params)``).
"""
from __future__ import annotations

import math

from .registry import Registry

__all__ = ["SCHEDULES", "schedule", "linear_schedule", "cosine_schedule", "exponential_schedule", "warmup_gate"]

SCHEDULES = Registry("schedule", skip=1)


@SCHEDULES.register("linear")
def linear_schedule(step: float, *, start: float, end: float, steps: float, delay: float = 0.0) -> float:
    """w(t) = start + (end - start) * clip((t - delay) / steps, 0, 1) (Atom-Searcher's process-to-outcome decay)."""
    if steps <= 0:
        raise ValueError(f"linear_schedule: steps={steps} must be > 0")
    x = min(max((float(step) - delay) / steps, 0.0), 1.0)
    return start + (end - start) * x


@SCHEDULES.register("cosine")
def cosine_schedule(step: float, *, start: float, end: float, steps: float, delay: float = 0.0) -> float:
    """w(t) = end + (start - end) * (1 + cos(pi * x)) / 2, x = clip((t - delay) / steps, 0, 1)."""
    if steps <= 0:
        raise ValueError(f"cosine_schedule: steps={steps} must be > 0")
    x = min(max((float(step) - delay) / steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * x))


@SCHEDULES.register("exponential")
def exponential_schedule(step: float, *, start: float, tau: float, end: float = 0.0, delay: float = 0.0) -> float:
    """w(t) = end + (start - end) * exp(-max(t - delay, 0) / tau) (Trust-GRPO: start = 0.3, tau = 500, end = 0)."""
    if tau <= 0:
        raise ValueError(f"exponential_schedule: tau={tau} must be > 0")
    return end + (start - end) * math.exp(-max(float(step) - delay, 0.0) / tau)


@SCHEDULES.register("warmup")
def warmup_gate(step: float, *, warmup: float, ramp: float = 0.0, value: float = 1.0) -> float:
    """0 before ``warmup`` steps, then ``value`` (linearly over ``ramp`` steps when ramp > 0).

    Used for delayed rewards (GRPO-PTR, SophiaVL-R1), critic warm-up (AC-Flow) and OREAL's RM-only
    steps (weight 0 for the actor during its first ``warmup`` steps).
    """
    if warmup < 0 or ramp < 0:
        raise ValueError(f"warmup_gate: warmup={warmup} and ramp={ramp} must be >= 0")
    t = float(step)
    if t < warmup:
        return 0.0
    if ramp == 0:
        return value
    return value * min((t - warmup) / ramp, 1.0)


def schedule(name: str, step: float, **params) -> float:
    """Value of the named schedule at training ``step``; an unknown name (``UnknownNameError``) or parameter
    (``ParameterError``) is an error that lists the valid ones."""
    return SCHEDULES.build(name, step, **params)
