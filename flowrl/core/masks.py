"""Fast reductions of bool action masks [B, T]: valid actions per row, first and last valid action, zeroing.

Every estimator needs one of these on the whole batch, and torch's generic kernels for them are slow on CPU:
a bool row sum converts to int64 element by element (about 25 ms at B = 16,384, T = 1,024, one thread), and
``masked_fill`` is several times slower than ``where``. Here a contiguous mask is read as int64 words of eight
bool bytes (SWAR: SIMD within a register): a row sum of words adds eight byte lanes at once (no lane carries
while a lane's total stays under 256, so at most 255 words, 2,040 actions, are added per block), and the
last / first non-zero word locates the last / first valid action. One pass over the mask's bytes, [B, T / 8]
temporaries. Byte order does not matter: a word is viewed back as its eight bytes in memory order.

Masks that are not contiguous, whose T is not a multiple of 8 or whose storage is not 8-byte aligned take the
plain torch path (same results). Everything runs unchanged on CUDA.
"""
from __future__ import annotations

import torch
from torch import Tensor

_LANE_MAX_WORDS = 255  # a byte lane holds totals up to 255


def _words(mask: Tensor) -> Tensor | None:
    """int64 [B, T / 8] view of a bool [B, T] mask, or None when the bytes cannot be viewed so."""
    if (mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[1] == 0 or mask.shape[1] % 8
            or not mask.is_contiguous() or mask.storage_offset() % 8):
        return None
    return mask.view(torch.uint8).view(torch.int64)


def row_counts(mask: Tensor) -> Tensor:
    """Valid actions per row: long [B] from bool [B, T]."""
    w = _words(mask)
    if w is None:
        return mask.sum(dim=1)
    B, W = w.shape
    total = None
    for j in range(0, W, _LANE_MAX_WORDS):  # blocks of columns (one block up to T = 2,040), not samples
        lanes = w[:, j:j + _LANE_MAX_WORDS].sum(dim=1)  # eight byte lanes, each a count of at most 255
        part = lanes.view(torch.uint8).view(B, 8).sum(dim=1)
        total = part if total is None else total + part
    return total


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last True action of each row: long [B] (-1 for a row with none)."""
    return _edges(_as_u8(mask))[1]


def first_valid_index(mask: Tensor) -> Tensor:
    """Index of the first True action of each row: long [B] (-1 for a row with none)."""
    return _edges(_as_u8(mask))[0]


def any_valid(mask: Tensor) -> Tensor:
    """bool [B]: the row has at least one True action (``mask.any(dim=1)``, much faster on CPU)."""
    w = _words(mask)
    return mask.any(dim=1) if w is None else w.amax(dim=1) != 0


def _as_u8(mask: Tensor) -> Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected bool [B, T]")
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def _edges(x: Tensor) -> tuple[Tensor, Tensor]:
    """(first, last) index of a non-zero entry in each row of a uint8 [B, K]: long [B] each, -1 for none.

    Where K is a multiple of 8 (and the bytes are aligned), the rows are read as int64 words: the first / last
    non-zero word is found the same way one level down (K / 8 flags), then the byte inside it (eight values).
    A [B, 1,024] mask costs one pass over its bytes plus passes over [B, 128] and [B, 16].
    """
    B, K = x.shape
    if K >= 64 and K % 8 == 0 and x.is_contiguous() and x.storage_offset() % 8 == 0:
        w = x.view(torch.int64)  # [B, K / 8]
        fw, lw = _edges((w != 0).view(torch.uint8))
        out = []
        for wi, last in ((fw, False), (lw, True)):
            word = w.gather(1, wi.clamp_min(0)[:, None]).view(torch.uint8)  # [B, 8], memory order
            f, l = _edges_small(word)
            bi = l if last else f
            out.append(torch.where(wi >= 0, wi * 8 + bi, wi))
        return out[0], out[1]
    return _edges_small(x)


def _edges_small(x: Tensor) -> tuple[Tensor, Tensor]:
    nz = (x != 0).view(torch.uint8)
    has, first = nz.max(dim=1)  # max returns the first maximal index
    _, back = nz.flip(1).max(dim=1)
    K = x.shape[1]
    none = torch.full_like(first, -1)
    return torch.where(has > 0, first, none), torch.where(has > 0, K - 1 - back, none)


def mask_runs(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(counts, first, last) of a bool [B, T] mask: valid actions per row and the first and last valid index,
    long [B] each (first = last = -1 for an empty row)."""
    first, last = _edges(_as_u8(mask))
    return row_counts(mask), first, last


def run_layout(mask: Tensor) -> tuple[bool, bool]:
    """(no_holes, right_aligned) of a bool [B, T] mask, as Python bools.

    no_holes: every row's valid actions are one contiguous run (or none); right_aligned: every such run starts
    at action 0 (right padding only). Estimators take exact shortcuts on these layouts.
    """
    return runs_layout(*mask_runs(mask))


def runs_layout(counts: Tensor, first: Tensor, last: Tensor) -> tuple[bool, bool]:
    """``run_layout`` from ``mask_runs``'s output (when the caller needs first / last too)."""
    holes = ((counts > 0) & (last - first + 1 != counts)).any()
    left = (first > 0).any()
    return not bool(holes), not bool(left)


def and_rows(mask: Tensor, rows: Tensor) -> Tensor:
    """``mask & rows[:, None]`` for bool [B, T] and bool [B], as a product of their bytes (a broadcast bool ``&``
    costs several times more on CPU). Returns a new bool [B, T]."""
    return (mask.view(torch.uint8) * rows.view(torch.uint8)[:, None]).view(torch.bool)


def zero_off_mask_(x: Tensor, mask: Tensor) -> Tensor:
    """x[~mask] = 0 in place (x contiguous float [B, T]); ``where`` with ``out`` is much faster than masked_fill_."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device), out=x)
