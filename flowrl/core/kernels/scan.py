"""Discounted suffix sums over the valid actions of each row: y_t = x_t + c * y_{next valid action after t}.

REINFORCE++'s returns and GAE are such scans. A Python recurrence over T costs T small ops; here the scan is
two matrix products (``discounted_suffix_sum``), rows with holes (tool observations) are first compacted so
that "next valid" is "next" (``compaction_index`` / ``compact`` / ``expand``), and on CPU the fused C scan does
the reward, the critic's delta, the scan and the whitening's row sums in one pass (``native.scan``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import native, use_native
from ..batch import add_outcome_at_end_
from ..masks import mask_runs, run_layout, runs_layout, zero_off_mask_

RowSums = Optional[tuple[Tensor, Tensor]]


def masked_discounted_scan(x: Tensor, mask: Tensor, c: float, *, chunk: int = 32, overwrite: bool = False,
                           layout: tuple[bool, bool] | None = None, scale: float = 1.0) -> Tensor:
    """y_t = x_t + c * y_{next valid action after t} on valid actions (0 elsewhere), vectorised over T.

    Equivalently y_t = sum_{s >= t, mask_s} c^{k(s) - k(t)} x_s with k the rank of an action among its row's
    valid ones: masked actions (padding, tool observations) neither earn nor discount. x, mask: [B, T].
    When every row's valid actions are one run (no holes: the usual case), k(s) - k(t) = s - t and the sum is
    ``discounted_suffix_sum`` of the masked x (two matrix products, no loop). With holes, each row's valid actions
    are first moved to the front of the row in order (``compact``), where they form one run; the scan runs there
    and ``expand`` puts the results back. On CPU the fused native scan does all of it in one pass (``native.scan``).
    ``chunk``: the matrix scan's block size. ``overwrite=True`` lets it zero a contiguous
    float32 ``x`` off the mask in place instead of copying it; ``layout`` is ``run_layout(mask)`` when the caller
    has it; ``scale`` multiplies the result (for free, inside the scan's matrix).
    """
    zero = torch.zeros((), device=x.device)
    if c == 0.0:
        return torch.where(mask, x.to(torch.float32) * scale, zero)
    if use_native(x, mask):  # one fused pass, any layout (holes included)
        own = overwrite and x.dtype == torch.float32 and x.is_contiguous()
        return native.scan(mask, a=x, c=c, scale=scale, out=x if own else None)[0]
    no_holes, right_aligned = run_layout(mask) if layout is None else layout
    if no_holes:  # the usual case: each row's valid actions are one run, so no rank is needed
        own = overwrite and x.dtype == torch.float32 and x.is_contiguous()
        xf = zero_off_mask_(x, mask) if own else torch.where(mask, x.to(torch.float32), zero)
        y = discounted_suffix_sum(xf, c, scale=scale, chunk=chunk)
        # after a row's last action y is a sum of zeros; only left padding can hold a carry
        return y if right_aligned else zero_off_mask_(y, mask)
    # holes: each row's valid actions moved to its front (in order) form one run; scan there, then put back
    idx = compaction_index(mask)
    return expand(discounted_suffix_sum(compact(x, idx), c, scale=scale, chunk=chunk), idx)


def discounted_suffix_sum(x: Tensor, c: float, *, scale: float = 1.0, chunk: int = 32) -> Tensor:
    """y_t = scale * sum_{s >= t} c^{s - t} x_s along the last dim of a float32 [B, T], as two matrix products.

    T is cut into chunks of L = ``chunk``. Inside each chunk, local = x_chunk @ M with the L x L matrix
    M[s, t] = c^{s - t} for s >= t (0 above); the value at each chunk's start then collects the later chunks'
    starts, start = local[:, :, 0] @ C with C[k, j] = (c^L)^{k - j} for k >= j (n x n, n = T / L); and
    y = local + c^{L - i} * start of the next chunk, for position i of a chunk. No division and no running
    product, so any c in [0, 1] is exact to float32 rounding (powers that underflow are negligible terms).
    Cost: one [B, T] x [L, L] product (BLAS), one in-place pass, a [B, T / L] x [n, n] product. Runs in
    float32 outside autocast (a bf16 product would lose the sum's precision; TF32, when a user enables it on
    CUDA, rounds to about 1e-3). Returns a new float32 [B, T].
    """
    B, T = x.shape
    L = max(1, min(chunk, T))
    pad = (-T) % L
    xf = torch.nn.functional.pad(x, (0, pad)) if pad else x
    n = (T + pad) // L
    dev = x.device
    i = torch.arange(L, device=dev, dtype=torch.float64)
    d = i[:, None] - i[None, :]
    M = torch.where(d >= 0, torch.tensor(c, dtype=torch.float64, device=dev) ** d.clamp_min(0), 0.0)
    k = torch.arange(n, device=dev, dtype=torch.float64)
    dk = k[:, None] - k[None, :]
    C = torch.where(dk >= 0, torch.tensor(c, dtype=torch.float64, device=dev) ** (L * dk.clamp_min(0)), 0.0)
    w = torch.tensor(c, dtype=torch.float64, device=dev) ** (L - i)  # from position i to the next chunk's start
    with torch.autocast(device_type=dev.type, enabled=False):
        local = (xf.reshape(B * n, L) @ (scale * M).to(torch.float32)).view(B, n, L)
        start = local[:, :, 0] @ C.to(torch.float32)  # [B, n]: y at each chunk's first position
    nxt = torch.nn.functional.pad(start[:, 1:], (0, 1))  # y at the next chunk's start (0 after the last)
    y = local.addcmul_(nxt[:, :, None], w.to(torch.float32)[None, None, :]).view(B, n * L)
    return y[:, :T] if pad else y


def compaction_index(mask: Tensor) -> Tensor:
    """long [B, T]: for a valid action, its rank among its row's valid actions (0, 1, ...); T for the others.

    ``compact`` moves each row's valid actions to the front of the row in order (a right-padded run), so that
    recurrences over valid actions (returns, GAE) need no notion of holes; ``expand`` puts them back."""
    T = mask.shape[1]
    rank = torch.cumsum(mask, dim=1)
    return torch.where(mask, rank.sub_(1), torch.full((), T, dtype=rank.dtype, device=mask.device))


def compact(x: Tensor, idx: Tensor) -> Tensor:
    """float32 [B, T]: row b holds x's valid actions of row b in order, then zeros (``idx``: ``compaction_index``)."""
    B, T = idx.shape
    out = torch.zeros(B, T + 1, dtype=torch.float32, device=x.device)
    return out.scatter_(1, idx, x.to(torch.float32))[:, :T]


def expand(y: Tensor, idx: Tensor) -> Tensor:
    """Inverse of ``compact``: float32 [B, T] with y's first entries back on the valid actions, 0 elsewhere."""
    return torch.nn.functional.pad(y, (0, 1)).gather(1, idx)


# ----------------------------------------------------------------------------- token-level returns
def reinforce_pp_returns(mask: Tensor, outcome: Tensor, old_logp: Tensor, ref_logp: Optional[Tensor], *,
                         kl_coef: float, gamma: float) -> tuple[Tensor, RowSums]:
    """REINFORCE++'s returns G_t = sum_{s >= t valid} gamma^{rank(s) - rank(t)} r_s with
    r_t = kl_coef (ref - old)_t + [t last] outcome: float32 [B, T], 0 off the mask, and (on the native path) the
    rows' sums of G and G^2 (float64 [B] each) for the whitening; None on the torch path.

    Native: one fused pass. Torch: the reward built in one buffer (the KL term unscaled and the outcome divided by
    kl_coef, the scale applied inside the scan's matrix: one pass fewer), then ``masked_discounted_scan``."""
    if use_native(old_logp, ref_logp, mask):
        returns, rs, rq = _native_token_scan(mask, outcome, old_logp, ref_logp, kl_coef=kl_coef, c=gamma, stats=True)
        return returns, (rs, rq)
    counts, first, last = mask_runs(mask)
    if kl_coef != 0.0:
        x = torch.sub(ref_logp.to(torch.float32), old_logp.to(torch.float32))
        out, scale = outcome.to(torch.float32) / kl_coef, kl_coef
    else:
        x, out, scale = torch.zeros(mask.shape, device=mask.device), outcome, 1.0
    rewards = add_outcome_at_end_(x, out, mask, last=last)
    returns = masked_discounted_scan(rewards, mask, gamma, overwrite=True, scale=scale,
                                     layout=runs_layout(counts, first, last))  # 0 off the mask
    return returns, None


def gae_advantages(mask: Tensor, outcome: Tensor, value: Tensor, old_logp: Tensor, ref_logp: Optional[Tensor], *,
                   gamma: float, lam: float, kl_coef: float, row_sums: bool = False) -> tuple[Tensor, RowSums]:
    """Un-whitened GAE advantages float32 [B, T], 0 off the mask, and, from the native scan when ``row_sums``,
    the rows' sums of A and A^2 (float64 [B] each; None otherwise).

    r_t = [t last] outcome - kl_coef (old - ref)_t; delta_t = r_t + gamma V_next - V_t (V after the last valid
    action is 0); A_t = sum_{s >= t valid} (gamma lam)^{rank(s) - rank(t)} delta_s. Native: one fused pass, any
    layout. Torch: -delta in one pass, then ``discounted_suffix_sum`` (two matrix products), after compacting
    each row's valid actions to its front when the mask has holes."""
    if use_native(value, old_logp, ref_logp, mask):
        adv, rs, rq = _native_token_scan(mask, outcome, old_logp, ref_logp, kl_coef=kl_coef, value=value,
                                         gamma=gamma, c=gamma * lam, stats=row_sums)
        return adv, ((rs, rq) if row_sums else None)
    return _gae_torch(mask, outcome, value, old_logp, ref_logp, gamma=gamma, lam=lam, kl_coef=kl_coef), None


def _native_token_scan(mask: Tensor, outcome: Tensor, old_logp: Tensor, ref_logp: Optional[Tensor], *,
                       kl_coef: float, c: float, stats: bool, value: Tensor | None = None,
                       gamma: float = 1.0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """REINFORCE++'s returns (no ``value``, c = gamma) or GAE (c = gamma lambda) in one native pass: the reward
    kl (ref - old)_t + [t last] outcome, the critic's delta, the scan over valid actions, and the rows' sums."""
    kl = torch.full((mask.shape[0],), kl_coef) if kl_coef != 0.0 else None
    return native.scan(mask, a=ref_logp if kl is not None else None, b=old_logp if kl is not None else None,
                       coef=kl, end=outcome, value=value, gamma=gamma, c=c, stats=stats)


def _gae_torch(mask: Tensor, outcome: Tensor, value: Tensor, old_logp: Tensor, ref_logp: Optional[Tensor], *,
               gamma: float, lam: float, kl_coef: float) -> Tensor:
    """``gae_advantages`` in torch ops (CUDA, autograd, or no native kernels): float [B, T], 0 off the mask."""
    counts, first, last = mask_runs(mask)
    no_holes, right_aligned = runs_layout(counts, first, last)
    V = value.to(torch.float32)
    klr = None
    if kl_coef != 0.0:
        klr = (old_logp.to(torch.float32), ref_logp.to(torch.float32), kl_coef)
    if no_holes:
        adv = _gae_runs(V, mask, last, outcome, klr, gamma, lam)
        return adv if right_aligned else zero_off_mask_(adv, mask)  # only left padding can hold a carry
    # Holes (tool observations): V_{t+1} and A_{t+1} are those of the next valid action. Moving each row's
    # valid actions to its front, in order, makes "next valid" simply "next": GAE there, then back.
    idx = compaction_index(mask)
    T = mask.shape[1]
    cmask = torch.arange(T, device=mask.device)[None, :] < counts[:, None]
    klc = None if klr is None else (compact(klr[0], idx), compact(klr[1], idx), kl_coef)
    adv_c = _gae_runs(compact(V, idx), cmask, counts - 1, outcome, klc, gamma, lam)
    return expand(adv_c, idx)


def _gae_runs(V: Tensor, mask: Tensor, last: Tensor, outcome: Tensor, klr: tuple | None, gamma: float,
              lam: float) -> Tensor:
    """GAE when each row's valid actions are one run ending at ``last`` [B] (-1: none): the next valid action
    after t < last is t + 1, and V after the last is 0. -delta_t = V_t - gamma V_{t+1} - r_t is built in one pass
    (the sign goes into the scan's matrix), zeroed off the mask, and scanned. 0 after each row's last action.
    ``klr`` = (old_logp, ref_logp, kl_coef): the in-reward KL -kl (old - ref), added in place."""
    B, T = mask.shape
    neg = torch.empty((B, T), dtype=torch.float32, device=mask.device)
    torch.sub(V[:, :-1], V[:, 1:], alpha=gamma, out=neg[:, :-1])
    neg[:, -1] = V[:, -1]
    li = last.clamp_min(0)[:, None]
    r = torch.where(last >= 0, outcome.to(torch.float32), 0.0)
    neg.scatter_(1, li, V.gather(1, li) - r[:, None])  # at the last action: V_t - r (no V after it)
    if klr is not None:  # -delta gains + kl (old - ref), in two in-place passes
        old, ref, kl = klr
        neg.add_(old, alpha=kl).sub_(ref, alpha=kl)
    zero_off_mask_(neg, mask)
    return discounted_suffix_sum(neg, gamma * lam, scale=-1.0)
