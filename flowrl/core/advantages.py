"""Registry of advantage / credit-assignment estimators.

Every estimator is a pure function ``fn(batch: TrajectoryBatch, **params) -> float [B, T]``,
registered by name with ``@register_advantage(name, requires=...)``. ``compute_advantages`` looks it
up, checks the batch and the parameter names, and zeroes the result off ``batch.mask``.

Outcome estimators broadcast a per-trajectory advantage to every action; token/step estimators place
rewards on actions. Rewards "at the end" sit on the last valid action of a trajectory.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from . import native
from .batch import TrajectoryBatch, broadcast_to_actions, gather_steps
from .groups import group_advantages, group_step_stats, masked_whiten, whiten_rows, whiten_zeroed_
from .masks import and_rows, last_valid_index, mask_runs, row_counts, run_layout, runs_layout, zero_off_mask_

AdvantageFn = Callable[..., Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}
_REQUIRES: dict[str, tuple[str, ...]] = {}


def register_advantage(name: str, *, requires: tuple[str, ...] = ()):
    """Decorator: register ``fn(batch, **params) -> float [B, T]`` under ``name``.

    ``requires`` names the optional ``TrajectoryBatch`` fields the estimator reads (e.g. ``("value",)``);
    ``compute_advantages`` raises a clear error when one is None. Registering a name twice is an error.
    """

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES and ADVANTAGES[name] is not fn:
            raise KeyError(f"advantage estimator {name!r} is already registered ({ADVANTAGES[name].__module__})")
        ADVANTAGES[name] = fn
        _REQUIRES[name] = tuple(requires)
        return fn

    return deco


def get_advantage(name: str) -> AdvantageFn:
    if name not in ADVANTAGES:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name]


def check_params(kind: str, name: str, fn: Callable, params: dict, skip: int) -> None:
    """Raise TypeError naming the unknown keyword(s) and the valid ones (``skip`` positional args)."""
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [p for p in list(sig.parameters)[skip:]]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(f"{kind} {name!r} got unknown parameter(s) {unknown}; valid: {valid}")


def compute_advantages(name: str, batch: TrajectoryBatch, **params) -> Tensor:
    """Advantages float32 [B, T] of estimator ``name`` on ``batch``; exactly 0 where ``batch.mask`` is False
    and on samples whose ``batch.sample_valid`` is False (their actions join no statistic either).

    Raises KeyError for an unknown name (listing the registered ones), TypeError for an unknown
    parameter, ValueError for a malformed batch, a missing field the estimator needs, or a
    non-finite result.
    """
    fn = get_advantage(name)
    check_params("advantage estimator", name, fn, params, skip=1)
    if not batch.is_validated():  # the trainer validates once per rollout; do not pay for it twice
        batch = batch.validate()
    if batch.sample_valid is not None:  # an invalid sample has no actions: it takes part in no statistic
        batch = batch.with_mask(and_rows(batch.mask, batch.sample_valid))
    for field in _REQUIRES[name]:
        if getattr(batch, field) is None or (field == "outcome_parts" and not batch.outcome_parts):
            raise ValueError(f"advantage estimator {name!r} needs batch.{field}, which is not set")
    adv = fn(batch, **params)
    if tuple(adv.shape) != tuple(batch.mask.shape):
        raise ValueError(f"advantage estimator {name!r} returned shape {tuple(adv.shape)}; expected [B, T] = {tuple(batch.mask.shape)}")
    adv = adv.to(torch.float32)
    if adv.is_contiguous() and native.usable(adv, batch.mask):  # one fused pass: mask and count non-finite
        ok = native.zero_off_mask_count_nonfinite_(adv, batch.mask) == 0
    else:
        adv = zero_off_mask_(adv, batch.mask) if adv.is_contiguous() else torch.where(batch.mask, adv, 0.0)
        lo, hi = adv.aminmax()  # NaN propagates: one pass, no [B, T] temporaries (isfinite builds two)
        ok = bool(torch.isfinite(lo) & torch.isfinite(hi))
    if not ok:
        raise ValueError(f"advantage estimator {name!r} produced NaN or inf; check its inputs (rewards, values, log-probs)")
    return adv


# ----------------------------------------------------------------------------- token-level helpers
def last_action_index(mask: Tensor) -> Tensor:
    """Index of the last True action of each row: long [B] (0 for a row with none)."""
    return last_valid_index(mask).clamp_min(0)


def outcome_at_end(outcome: Tensor, mask: Tensor) -> Tensor:
    """float [B, T]: ``outcome`` [B] on each row's last valid action, 0 elsewhere (and on empty rows)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return add_outcome_at_end_(out, outcome, mask)


def add_outcome_at_end_(rewards: Tensor, outcome: Tensor, mask: Tensor, *, last: Tensor | None = None) -> Tensor:
    """rewards[b, last valid action of b] += outcome[b], in place (rows without actions unchanged); ``last`` is
    ``last_valid_index(mask)`` when the caller has it."""
    last = last_valid_index(mask) if last is None else last
    r = torch.where(last >= 0, outcome.to(torch.float32), torch.zeros((), device=mask.device))
    return rewards.scatter_add_(1, last.clamp_min(0)[:, None], r[:, None])


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
    if native.usable(x, mask):  # one fused pass, any layout (holes included)
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


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Return-to-go G_t = sum_{s >= t, mask_s} gamma^{(# valid actions between t and s)} r_s, float [B, T].

    Masked actions (padding, tool observations) neither earn nor discount: the return passes through
    them (as verl's REINFORCE++). Computed by ``masked_discounted_scan`` (vectorised over time in chunks).
    """
    return masked_discounted_scan(rewards, mask, gamma)


def kl_penalty_rewards(batch: TrajectoryBatch, kl_coef: float) -> Tensor:
    """-kl_coef * (old_logp - ref_logp) per action (k1, the in-reward KL of REINFORCE++/PPO): float [B, T]."""
    if kl_coef == 0.0:
        return torch.zeros(batch.mask.shape, device=batch.device)
    if batch.ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs batch.ref_logp (reference log-probs), which is not set")
    diff = torch.sub(batch.ref_logp.to(torch.float32), batch.old_logp.to(torch.float32))
    return diff if kl_coef == 1.0 else diff.mul_(kl_coef)


# ----------------------------------------------------------------------------- outcome estimators
@register_advantage("grpo")
def grpo(batch: TrajectoryBatch, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al., 2024, DeepSeekMath).

    A_i = (r_i - mean_{g(i)} r) / (std_{g(i)} r + eps), broadcast to every action of trajectory i.
    ``scale="batch"`` divides by the std of the whole batch's rewards instead (TRL's scale_rewards),
    ``scale="none"`` by nothing. Unbiased std; singleton and all-equal groups get 0.

    batch.outcome: float [B]; batch.group: long [B]; batch.mask: bool [B, T]. Returns float [B, T].
    """
    adv = group_advantages(batch.outcome, batch.group, baseline="mean", scale=scale, eps=eps, valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


@register_advantage("dr_grpo")
def dr_grpo(batch: TrajectoryBatch) -> Tensor:
    """Dr.GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training").

    A_i = r_i - mean_{g(i)} r (no division by the std), broadcast to the actions. Pair it with the
    ``seq_mean_token_sum_norm`` aggregation (constant normaliser) to remove the length bias as well.

    Returns float [B, T].
    """
    adv = group_advantages(batch.outcome, batch.group, baseline="mean", scale="none", valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


@register_advantage("rloo")
def rloo(batch: TrajectoryBatch) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al., 2024).

    A_i = r_i - (1 / (n_g - 1)) * sum_{j in g(i), j != i} r_j, broadcast to every action of trajectory i.
    A group of one sample gets 0.

    batch.outcome: float [B]; batch.group: long [B]; batch.mask: bool [B, T]. Returns float [B, T].
    """
    adv = group_advantages(batch.outcome, batch.group, baseline="loo", scale="none", valid=batch.valid)
    return broadcast_to_actions(adv, batch.mask)


@register_advantage("reinforce_pp")
def reinforce_pp(batch: TrajectoryBatch, *, kl_coef: float = 0.0, gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ (Hu, 2025).

    r_t = 1[t = last action] * r - kl_coef * (log pi_old - log pi_ref)_t;  G_t = sum_{s >= t} gamma^{s-t} r_s;
    A_t = (G_t - mu_B) / sqrt(var_B + eps), whitened over every valid action of the (global) batch; no critic,
    no group baseline. ``kl_coef > 0`` needs ``batch.ref_logp``.

    Returns float [B, T].
    """
    if kl_coef == 0.0 and gamma == 1.0:
        # outcome only: G_t = r on every valid action up to the last one, so the return is row-constant and
        # its whitening over actions is exact in [B] (token-weighted), with one broadcast at the end
        r = torch.where(batch.valid, batch.outcome.to(torch.float32), 0.0)
        return broadcast_to_actions(whiten_rows(r, row_counts(batch.mask), eps=eps), batch.mask)
    if kl_coef != 0.0 and batch.ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs batch.ref_logp (reference log-probs), which is not set")
    if native.usable(batch.old_logp, batch.ref_logp, batch.mask):
        # one fused pass: r_t = kl (ref - old)_t + [t last] r, the discounted scan and the whitening's sums
        returns, rs, rq = _native_token_scan(batch, kl_coef=kl_coef, c=gamma, stats=True)
        return whiten_zeroed_(returns, batch.mask, eps=eps, row_sums=(rs, rq))
    counts, first, last = mask_runs(batch.mask)
    if kl_coef != 0.0:  # scan (ref - old + r / kl) scaled by kl: one pass fewer than scaling the KL term
        x = kl_penalty_rewards(batch, 1.0)
        out, scale = batch.outcome.to(torch.float32) / kl_coef, kl_coef
    else:
        x, out, scale = torch.zeros(batch.mask.shape, device=batch.device), batch.outcome, 1.0
    rewards = add_outcome_at_end_(x, out, batch.mask, last=last)
    returns = masked_discounted_scan(rewards, batch.mask, gamma, overwrite=True, scale=scale,
                                     layout=runs_layout(counts, first, last))  # 0 off the mask
    return whiten_zeroed_(returns, batch.mask, eps=eps)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(batch: TrajectoryBatch, *, eps: float = 1e-8) -> Tensor:
    """REINFORCE++-baseline (Hu, 2025): the group mean as baseline, then whitening over the batch.

    A_{i,t} = whiten_B(r_i - mean_{g(i)} r), where whitening runs over every valid action of the (global)
    batch (so longer completions weigh more, as in verl/OpenRLHF). The KL term goes into the loss.

    Returns float [B, T].
    """
    centred = group_advantages(batch.outcome, batch.group, baseline="mean", scale="none", valid=batch.valid)
    # row-constant: whitened over the valid actions exactly in [B] (token-weighted), then one broadcast
    return broadcast_to_actions(whiten_rows(centred, row_counts(batch.mask), eps=eps), batch.mask)


@register_advantage("gae", requires=("value",))
def gae(
    batch: TrajectoryBatch, *, gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.0, whiten: bool = True
) -> Tensor:
    """Generalised Advantage Estimation (Schulman et al., 2016), for PPO with a critic.

    r_t = 1[t = last action] * r - kl_coef * (log pi_old - log pi_ref)_t;
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last action is 0);  A_t = delta_t + gamma * lam * A_{t+1}.
    Masked actions are skipped: V_{t+1} and A_{t+1} are those of the next *valid* action.
    On CPU: one fused native pass (``native.scan``: delta, the scan and the whitening's sums), any mask layout.
    Elsewhere without a loop: -delta in one pass, then A = sum_{s >= t} (gamma lam)^{s - t} delta_s by
    ``discounted_suffix_sum`` (two matrix products), after moving each row's valid actions to its front when the
    mask has holes. ``whiten`` normalises over the batch's valid actions (in place).
    Returns float [B, T]; ``gae_advantages_and_returns`` also gives the critic targets A + V.
    """
    adv, sums = _gae_advantages(batch, gamma=gamma, lam=lam, kl_coef=kl_coef, row_sums=whiten)
    return whiten_zeroed_(adv, batch.mask, row_sums=sums) if whiten else adv


def gae_advantages_and_returns(
    batch: TrajectoryBatch, *, gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Un-whitened GAE advantages and returns (A + V), each float [B, T], 0 off the mask."""
    adv = _gae_advantages(batch, gamma=gamma, lam=lam, kl_coef=kl_coef)[0]
    values = batch.value.to(torch.float32)
    return adv, torch.where(batch.mask, adv + values, torch.zeros((), device=adv.device))


def _gae_advantages(batch: TrajectoryBatch, *, gamma: float, lam: float, kl_coef: float, row_sums: bool = False
                    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Un-whitened GAE advantages float [B, T], 0 off the mask (see ``gae``), and, from the native scan when
    ``row_sums``, the rows' sums of A and A^2 (float64 [B] each; None otherwise)."""
    if batch.value is None:
        raise ValueError("GAE needs batch.value (critic values), which is not set")
    if kl_coef != 0.0 and batch.ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef} needs batch.ref_logp (reference log-probs), which is not set")
    mask = batch.mask
    if native.usable(batch.value, batch.old_logp, batch.ref_logp, mask):  # one fused pass, any layout
        adv, rs, rq = _native_token_scan(batch, kl_coef=kl_coef, value=batch.value, gamma=gamma, c=gamma * lam,
                                         stats=row_sums)
        return adv, ((rs, rq) if row_sums else None)
    return _gae_advantages_torch(batch, gamma=gamma, lam=lam, kl_coef=kl_coef), None


def _native_token_scan(batch: TrajectoryBatch, *, kl_coef: float, c: float, stats: bool, value: Tensor | None = None,
                       gamma: float = 1.0) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """REINFORCE++'s returns (no ``value``, c = gamma) or GAE (c = gamma lambda) in one native pass: the reward
    kl (ref - old)_t + [t last] outcome, the critic's delta, the scan over valid actions, and the rows' sums."""
    kl = torch.full((batch.batch_size,), kl_coef) if kl_coef != 0.0 else None
    return native.scan(batch.mask, a=batch.ref_logp if kl is not None else None,
                       b=batch.old_logp if kl is not None else None, coef=kl, end=batch.outcome, value=value,
                       gamma=gamma, c=c, stats=stats)


def _gae_advantages_torch(batch: TrajectoryBatch, *, gamma: float, lam: float, kl_coef: float) -> Tensor:
    """``_gae_advantages`` in torch ops (CUDA, autograd, or no native kernels): float [B, T], 0 off the mask."""
    mask = batch.mask
    counts, first, last = mask_runs(mask)
    no_holes, right_aligned = runs_layout(counts, first, last)
    V = batch.value.to(torch.float32)
    klr = None
    if kl_coef != 0.0:
        klr = (batch.old_logp.to(torch.float32), batch.ref_logp.to(torch.float32), kl_coef)
    if no_holes:
        adv = _gae_runs(V, mask, last, batch.outcome, klr, gamma, lam)
        return adv if right_aligned else zero_off_mask_(adv, mask)  # only left padding can hold a carry
    # Holes (tool observations): V_{t+1} and A_{t+1} are those of the next valid action. Moving each row's
    # valid actions to its front, in order, makes "next valid" simply "next": GAE there, then back.
    idx = compaction_index(mask)
    T = mask.shape[1]
    cmask = torch.arange(T, device=mask.device)[None, :] < counts[:, None]
    klc = None if klr is None else (compact(klr[0], idx), compact(klr[1], idx), kl_coef)
    adv_c = _gae_runs(compact(V, idx), cmask, counts - 1, batch.outcome, klc, gamma, lam)
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


@register_advantage("stepwise_grpo", requires=("step_reward",))
def stepwise_grpo(batch: TrajectoryBatch, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Per-step group normalisation (TurningPoint-GRPO's per-timestep trackers; Euphonium's process advantage).

    A_{i,s} = (r_{i,s} - mean_{j in g(i)} r_{j,s}) / (std_{j in g(i)} r_{j,s} + eps), each step s normalised
    within its own (group, step) cell, then mapped to the actions of step s through ``batch.step``.
    NaN step rewards (no reward) are left out of the statistics and give 0; cells of one sample or of
    equal rewards give 0. ``scale="none"`` skips the division.

    batch.step_reward: float [B, S]; batch.step: long [B, T]. Returns float [B, T].
    """
    if scale not in ("group", "none"):
        raise ValueError(f"stepwise_grpo: scale={scale!r}; valid values are ('group', 'none')")
    r = batch.step_reward
    valid = batch.valid[:, None] & ~torch.isnan(r)
    count, mean, std, constant = group_step_stats(r, batch.group, valid=valid)
    a = r.to(torch.float32) - mean
    if scale == "group":
        a = a / (std + eps)
    a = torch.where(valid & ~constant, a, torch.zeros((), device=a.device))
    return gather_steps(a, batch.step, batch.mask)


@register_advantage("gdpo", requires=("outcome_parts",))
def gdpo(batch: TrajectoryBatch, *, weights: dict[str, float] | None = None, eps: float = 1e-4) -> Tensor:
    """GDPO (group reward-decoupled normalisation for multi-reward RL; TRL's ``normalize_then_sum``).

    For each named part k: A^k_i = (r^k_i - mean_{g(i)} r^k) / (std_{g(i)} r^k + eps); then
    A_i = whiten_B(sum_k w_k A^k_i) over the batch's valid samples, broadcast to the actions.
    ``weights`` maps part names to w_k (default 1 each); a name that is not a part is an error.

    batch.outcome_parts: dict[str, float [B]]. Returns float [B, T].
    """
    parts = batch.outcome_parts
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(parts))
    if unknown:
        raise KeyError(f"gdpo: weights name unknown reward part(s) {unknown}; parts are {sorted(parts)}")
    total = torch.zeros(batch.batch_size, device=batch.device)
    for k, r in parts.items():  # a loop over reward parts (a handful), not samples
        total = total + weights.get(k, 1.0) * group_advantages(r, batch.group, valid=batch.valid, eps=eps)
    whitened = masked_whiten(total, batch.valid)
    return broadcast_to_actions(whitened, batch.mask)
