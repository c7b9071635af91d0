"""Row-wise fast paths: the whitening's sums, compute_advantages' final masking, and per-step sums.

Each function keeps its torch form next to the native call, so the choice between them (``use_native``) is the
only thing that differs between CPU and CUDA.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import native, use_native
from ..masks import row_counts, zero_off_mask_

_NATIVE_MIN_KEEP = 1e-6  # the one-pass variance must keep this share of the float64 sum of squares


def whiten_native_(out: Tensor, mask: Tensor, row_sums: Optional[tuple[Tensor, Tensor]], eps: float,
                   reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Masked whitening of a contiguous float32 ``out`` [B, T] that is 0 off ``mask``, in place, with the native
    kernels: the count, sum and sum of squares over the valid actions in float64 (``row_sums`` = (sum, sum of
    squares) float64 [B] when the caller has them, e.g. from the fused scan; else one pass), then one in-place pass
    (x - mean) * rsqrt(var + eps), unbiased variance. When the sum of squares has lost more than six of float64's
    digits to the mean, the variance is taken again around the mean (two passes, as the torch path).
    ``reduce``: the sum over ranks of a small tensor (None on one process). Returns ``out``."""
    rs, rq = native.row_sums(mask, out, squares=True) if row_sums is None else row_sums
    f64 = torch.float64
    stats = torch.stack([row_counts(mask).sum().to(f64), rs.sum(), rq.sum()])
    if reduce is not None:
        stats = reduce(stats)
    n, s1, s2 = stats.tolist()
    mean = s1 / max(n, 1.0)
    ss = s2 - n * mean * mean
    if ss <= _NATIVE_MIN_KEEP * s2 and s2 > 0:  # cancellation: centre (in float32), then sums again
        native.affine_masked_(out, mask, mean, 1.0)
        rs, rq = native.row_sums(mask, out, squares=True)
        st = torch.stack([rs.sum(), rq.sum()])
        s1, s2 = (reduce(st) if reduce is not None else st).tolist()
        mean = s1 / max(n, 1.0)  # what rounding the mean to float32 left
        ss = s2 - n * mean * mean
    inv = 1.0 / math.sqrt(max(ss, 0.0) / max(n - 1.0, 1.0) + eps)
    return native.affine_masked_(out, mask, mean, inv)


def zero_off_mask_all_finite_(adv: Tensor, mask: Tensor) -> tuple[Tensor, bool]:
    """(adv with 0 off ``mask``, whether every value on the mask is finite): float32 [B, T] ``adv``, zeroed in
    place when contiguous. Native: one fused pass that masks and counts. Torch: ``where``, then one ``aminmax``
    (NaN propagates through it: no [B, T] temporaries, where ``isfinite`` builds two)."""
    if adv.is_contiguous() and use_native(adv, mask):
        return adv, native.zero_off_mask_count_nonfinite_(adv, mask) == 0
    adv = zero_off_mask_(adv, mask) if adv.is_contiguous() else torch.where(mask, adv, 0.0)
    lo, hi = adv.aminmax()
    return adv, bool(torch.isfinite(lo) & torch.isfinite(hi))


def step_sums(step: Tensor, mask: Tensor, values: Tensor, S: int, *, fused: Optional[bool] = None
              ) -> tuple[Tensor, Tensor]:
    """(count, total) float [B, S] each: the valid actions of each step and the sum of ``values`` over them.

    step: long [B, T] already in [0, S); mask: bool [B, T]; values: float [B, T]. On CPU with the native kernels
    (``fused`` None): one pass (``native.step_sums``). ``fused`` (default: on CPU without them)
    accumulates both in one ``scatter_add_`` of complex numbers, value + 1j on valid actions, since a CPU scatter
    costs per index read (two float scatters read the int64 index twice); off, two float scatters.
    """
    B = mask.shape[0]
    zero = torch.zeros((), device=mask.device)
    if fused is None and S > 0 and use_native(step, mask, values):
        return native.step_sums(step, mask, values, S)  # one pass, both sums
    if fused is None:
        fused = mask.device.type == "cpu"
    if fused:
        pair = torch.empty(mask.shape + (2,), dtype=torch.float32, device=mask.device)
        torch.where(mask, values.to(torch.float32), zero, out=pair[..., 0])
        pair[..., 1].copy_(mask)
        acc = torch.zeros(B, S, dtype=torch.complex64, device=mask.device)
        acc.scatter_add_(1, step, torch.view_as_complex(pair))
        return acc.imag.contiguous(), acc.real.contiguous()
    mf = mask.to(torch.float32)
    cnt = torch.zeros(B, S, device=mask.device).scatter_add_(1, step, mf)
    tot = torch.zeros(B, S, device=mask.device).scatter_add_(1, step, torch.where(mask, values.to(torch.float32), zero))
    return cnt, tot
