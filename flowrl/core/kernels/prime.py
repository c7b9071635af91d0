"""PRIME's token-level advantages (granularity "token", gamma = 1) in closed form.

With d = (log pi_phi - log pi_ref) on valid actions, the process return of PRIME's RLOO'd implicit reward is
affine in the reverse cumsum Q_t = sum_{s >= t} d_s and the count N_t of valid actions at or after t, and the
outcome return is constant on a row. So the returns need one scan (native), or one cumsum (torch), and the
whitening's statistics follow from row sums. Three paths, one result: the fused native scan (any mask layout),
the torch closed form on one run per row (one-pass statistics in float64), and the torch closed form with holes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import native, use_native
from ..batch import TrajectoryBatch
from ..groups import group_index, segment_stats, whiten_zeroed_
from ..masks import and_rows, mask_runs, row_counts, runs_layout


def prime_token_advantages(batch: TrajectoryBatch, lp: Tensor, beta: float, rm_coef: float, outcome_coef: float,
                              batch_norm: bool, eps: float) -> Tensor:
    """PRIME's whitened advantages for granularity "token", gamma = 1, in closed form (the same numbers as the
    formula in ``flowrl.core.estimators.token.prime``, fewer passes over [B, T]).

    With d = (log pi_phi - log pi_ref) on valid actions, Q_t = sum_{s >= t} d_s and N_t = # valid actions at or
    after t, the process return is c_i Q_t - b_i N_t (c_i = rm_coef * scale * K/(K-1), b_i = rm_coef *
    sum_j m_j/(K-1), m_j = scale * mean_t d_{j,t}) and the outcome return is the RLOO of outcome_coef * r, v_i, on
    every valid action; then whitening over the valid actions. Every [B, T] step is in place after three allocations.
    """
    mask = batch.mask
    valid = batch.valid
    mv = mask if batch.sample_valid is None else and_rows(mask, valid)
    if use_native(lp, batch.ref_logp, mv):
        return _prime_token_native(batch, lp, mv, beta, rm_coef, outcome_coef, batch_norm, eps)
    counts, first, last = mask_runs(mv)
    if runs_layout(counts, first, last)[0]:
        return _prime_token_runs(batch, lp, mv, counts, first, last, beta, rm_coef, outcome_coef, batch_norm, eps)
    mf = mv.to(torch.float32)
    d = (lp.to(torch.float32) - batch.ref_logp.to(torch.float32)).mul_(mf)
    n = counts.to(torch.float32)
    dsum = d.sum(dim=1)
    Q = torch.cumsum(d, dim=1).neg_().add_(dsum[:, None]).add_(d)  # reverse cumsum
    scale = _prime_scale(Q, beta, batch_norm)
    c, b, v = _prime_coefficients(batch, n, dsum, scale, rm_coef, outcome_coef)
    N = torch.cumsum(mf, dim=1).neg_().add_(n[:, None]).add_(mf)
    R = Q.mul_(c[:, None]).sub_(N.mul_(b[:, None])).add_(v[:, None]).mul_(mf)
    return whiten_zeroed_(R, mv, eps=eps)


def _prime_token_native(batch: TrajectoryBatch, lp: Tensor, mv: Tensor, beta: float, rm_coef: float,
                        outcome_coef: float, batch_norm: bool, eps: float) -> Tensor:
    """``prime_token_advantages`` with the native kernels, any mask layout: the rows' sums of d (one pass), then
    R_t = sum_{s >= t valid} (c_i d_s - b_i) + v_i by one fused scan (coef c, bias -b, v at the last action), whose
    row sums feed the whitening (one more pass). ``batch_norm`` first scans d alone for max |Q|."""
    n = row_counts(mv).to(torch.float32)
    dsum = native.row_sums(mv, lp, batch.ref_logp)[0].to(torch.float32)
    scale = torch.full((), beta)
    if batch_norm:
        scale = _prime_scale(native.scan(mv, a=lp, b=batch.ref_logp)[0], beta, True)
    c, b, v = _prime_coefficients(batch, n, dsum, scale, rm_coef, outcome_coef)
    R, rs, rq = native.scan(mv, a=lp, b=batch.ref_logp, coef=c, bias=-b, end=v, stats=True)
    return whiten_zeroed_(R, mv, eps=eps, row_sums=(rs, rq))


def _prime_scale(Q: Tensor, beta: float, batch_norm: bool) -> Tensor:
    """beta, or with ``batch_norm`` beta / (beta * max |Q|) (PRIME's batch normalisation of the implicit reward;
    Q [B, T] is the reverse cumsum of the log-ratio, 0 or a valid action's value at padded positions)."""
    scale = torch.full((), beta, device=Q.device)
    if batch_norm:
        qlo, qhi = Q.aminmax()
        denom = beta * torch.maximum(qhi, -qlo)
        scale = torch.where(denom > 0, scale / torch.where(denom > 0, denom, torch.ones_like(denom)), scale)
    return scale


def _prime_coefficients(batch: TrajectoryBatch, n: Tensor, dsum: Tensor, scale: Tensor, rm_coef: float,
                        outcome_coef: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (c, b, v) of PRIME's closed form: process return c Q_t - b N_t, outcome return v. float [B] each."""
    valid = batch.valid
    rows = valid & (n > 0)
    inv, G = group_index(batch.group)
    m = scale * dsum / n.clamp_min(1)
    st = segment_stats(m, inv, G, rows)
    K = st.count[inv]
    Kc = (K - 1).clamp_min(1)
    on = rows & (K > 1)
    zero = torch.zeros((), dtype=torch.float32, device=n.device)
    c = torch.where(on, rm_coef * scale * K / Kc, zero)
    b = torch.where(on, rm_coef * st.sum[inv] / Kc, zero)
    r = torch.where(rows, outcome_coef * batch.outcome.to(torch.float32), zero)
    v = torch.where(on, r * K / Kc - segment_stats(r, inv, G, rows).sum[inv] / Kc, zero)
    return c, b, v


_ONE_PASS_MIN_KEEP = 1e-4  # the one-pass variance must keep this share of the sum of squares, else two passes


def _prime_token_runs(batch: TrajectoryBatch, lp: Tensor, mv: Tensor, counts: Tensor, first: Tensor, last: Tensor,
                      beta: float, rm_coef: float, outcome_coef: float, batch_norm: bool, eps: float) -> Tensor:
    """``prime_token_advantages`` when every row's valid actions are one run [first_i, last_i] (no holes).

    There N_t = last_i + 1 - t, so R_t = c_i Q_t - b_i (last_i + 1 - t) + v_i is affine in t given Q, and the
    whitening statistics follow from three row sums of Q (sum Q, sum Q^2, sum t Q) and sums of powers of
    N = 1..n_i, combined in float64. Q is written once and turned into the output by one affine pass and one
    masking pass. When the one-pass variance has lost more than four digits to the mean (near-constant
    returns), the two-pass whitening runs on the materialised returns instead.
    """
    B, T = mv.shape
    zero = torch.zeros((), dtype=torch.float32, device=mv.device)
    d = torch.sub(lp.to(torch.float32), batch.ref_logp.to(torch.float32))
    torch.where(mv, d, zero, out=d)
    n = counts.to(torch.float32)
    Q = torch.cumsum(d, dim=1)
    dsum = Q[:, -1].clone()  # the prefix sum's own total: after a row's last action Q below is exactly 0
    torch.sub(dsum[:, None], Q, out=Q).add_(d)  # Q_t = sum_{s >= t} d_s (total minus the prefix before t)
    del d
    if bool((first > 0).any()):  # left padding: Q there holds the row's total
        torch.where(mv, Q, zero, out=Q)
    scale = _prime_scale(Q, beta, batch_norm)
    c, b, v = _prime_coefficients(batch, n, dsum, scale, rm_coef, outcome_coef)
    t = torch.arange(T, device=mv.device, dtype=torch.float32)
    f64 = torch.float64
    sQ, sQQ, sQt = Q.sum(dim=1).to(f64), torch.linalg.vecdot(Q, Q, dim=1).to(f64), (Q @ t).to(f64)
    c64, b64, v64, n64 = c.to(f64), b.to(f64), v.to(f64), n.to(f64)
    L1 = last.to(f64) + 1
    sN, sNN = n64 * (n64 + 1) / 2, n64 * (n64 + 1) * (2 * n64 + 1) / 6
    sQN = L1 * sQ - sQt
    sR = c64 * sQ - b64 * sN + n64 * v64
    sRR = (c64 * c64 * sQQ - 2 * c64 * b64 * sQN + 2 * c64 * v64 * sQ + b64 * b64 * sNN - 2 * b64 * v64 * sN
           + n64 * v64 * v64)
    N = n64.sum()
    mean = sR.sum() / N.clamp_min(1)
    ss = sRR.sum() - N * mean * mean
    if bool(ss <= _ONE_PASS_MIN_KEEP * sRR.sum()):  # cancellation: whiten the materialised returns in two passes
        R = Q.mul_(c[:, None]).addcmul_(b[:, None], t[None, :]).add_((v - b * L1.to(torch.float32))[:, None])
        torch.where(mv, R, zero, out=R)
        return whiten_zeroed_(R, mv, eps=eps)
    # one affine pass: rho * (c Q + b t + v - b (last + 1) - mean), then 0 off the mask
    rho = torch.rsqrt(ss / (N - 1).clamp_min(1) + eps)
    R = Q.mul_((rho * c64).to(torch.float32)[:, None]).addcmul_((rho * b64).to(torch.float32)[:, None], t[None, :])
    R.add_((rho * (v64 - b64 * L1 - mean)).to(torch.float32)[:, None])
    return torch.where(mv, R, zero, out=R)
