"""Fast paths behind the core's estimators: the same numbers as their formulas, in fewer passes over [B, T].

The estimators in ``flowrl.core.estimators`` read as their formulas in plain torch; what makes them fast sits
here, one module per kind of pass:

- ``native``: fused C kernels (``native_kernels.c``, built with the system compiler on first use) for CPU
  tensors: discounted scans with their reward, critic and whitening sums, row sums, broadcasts, per-step
  gathers and sums, masking with a finiteness count;
- ``scan``: discounted suffix sums over valid actions (REINFORCE++ returns, GAE) as matrix products, and the
  fused scan's calls;
- ``prime``: PRIME's token-level returns in closed form;
- ``rows``: the whitening's native sums, compute_advantages' final masking, per-step sums.

Which one runs is decided in one place, :func:`use_native`: the C kernels take a call when every tensor is on
the CPU with no autograd through it, ``FLOWRL_NATIVE`` is not 0 and the library built; otherwise the torch
code runs (CUDA always does). Both give the same results to float32 rounding (tests/test_core_native.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import native

__all__ = ["native", "use_native"]


def use_native(*tensors: Optional[Tensor]) -> bool:
    """True when the fused C kernels may take these tensors (None entries are ignored): all on the CPU, no
    autograd through them, kernels not switched off (``FLOWRL_NATIVE=0`` or ``native.enabled(False)``) and
    built. Every native-or-torch choice in the core asks this function."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()):
            return False
    return native.library() is not None
