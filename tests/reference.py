"""Slow, obvious references for the core, written from the papers' formulas.

Everything here loops over samples, groups and tokens in plain Python (float64), with a dict of
groups, so that it is easy to check by eye against the formula in each docstring of flowrl.core.
The tests compare the vectorised core against these on random batches built by ``make_batch``
(ragged masks with holes, singleton groups, all-equal groups, mixed group sizes, invalid samples).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch

from flowrl.core import TrajectoryBatch

NAN = float("nan")


# ----------------------------------------------------------------------------- random batches
def group_outcomes(gen: torch.Generator, kind: str, n: int) -> list[float]:
    """Outcomes of one group of ``n`` samples: all ``equal``, ``binary`` (0/1) or ``normal``."""
    if kind == "equal":
        return [float(torch.randn(1, generator=gen))] * n
    if kind == "binary":
        return (torch.rand(n, generator=gen) < 0.5).float().tolist()
    return torch.randn(n, generator=gen).tolist()


def make_batch(
    gen: torch.Generator,
    *,
    sizes: tuple[int, ...] = (1, 1, 2, 3, 4, 5, 7, 8),
    T: int = 11,
    S: int = 4,
    invalid_frac: float = 0.0,
    invalid_mask_rows: bool = False,
    empty_row: bool = True,
    parts: tuple[str, ...] = ("acc", "fmt", "len"),
    layout: str = "holes",
) -> TrajectoryBatch:
    """A random batch whose groups have the given sizes, shuffled, with every optional field set.

    Group kinds cycle through "equal" (all rewards equal), "binary" (0/1) and "normal", so singleton,
    all-equal and mixed groups all occur. Masks are ragged prefixes with holes (tool observations);
    with ``empty_row`` one valid sample has no valid action at all. ``invalid_frac`` of the samples get
    ``sample_valid`` False and a NaN outcome; their mask rows are cleared unless ``invalid_mask_rows``.
    ``layout``: "holes" (the default above), "runs" (right-padded prefixes, no holes) or "left" (left-padded
    suffixes, no holes): the core takes faster paths when no row has a hole.
    """
    ids = torch.randperm(10_000, generator=gen)[: len(sizes)] * 1_000_003 + 7  # large, sparse ids
    group, outcome, part_vals = [], [], {k: [] for k in parts}
    for k, (gid, n) in enumerate(zip(ids.tolist(), sizes)):
        kind = ("equal", "binary", "normal")[k % 3]
        for _ in range(n):
            group.append(gid)
        outcome += group_outcomes(gen, kind, n)
        for j, p in enumerate(parts):
            if (k + j) % 3 == 0:  # an all-equal part in this group
                part_vals[p] += [float(j)] * n
            elif (k + j) % 3 == 1:
                part_vals[p] += (torch.rand(n, generator=gen) < 0.5).float().tolist()
            else:
                part_vals[p] += (torch.randn(n, generator=gen) * (j + 1)).tolist()
    B = len(group)
    perm = torch.randperm(B, generator=gen)
    group_t = torch.tensor(group, dtype=torch.long)[perm]
    outcome_t = torch.tensor(outcome)[perm]
    parts_t = {p: torch.tensor(v)[perm] for p, v in part_vals.items()}

    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    pos = torch.arange(T)[None, :]
    mask = (pos < lengths[:, None]) & (torch.rand(B, T, generator=gen) > 0.15)
    mask[:, 0] = True  # every row starts with an action ...
    if layout == "runs":
        mask = pos < lengths[:, None]
    elif layout == "left":
        mask = pos >= T - lengths[:, None]
    elif layout != "holes":
        raise ValueError(f"layout={layout!r}; valid: 'holes', 'runs', 'left'")
    if empty_row:
        mask[B // 2] = False  # ... except one valid sample that has none
    step = (pos * S // T).expand(B, T).clone()
    old_logp = -torch.rand(B, T, generator=gen) * 2
    ref_logp = old_logp + 0.3 * torch.randn(B, T, generator=gen)
    value = torch.randn(B, T, generator=gen)
    entropy = torch.rand(B, T, generator=gen)
    # step rewards: ties in half the rows (grid values), NaN where a step has no reward
    grid = torch.randint(0, 3, (B, S), generator=gen).float() / 2
    step_reward = torch.where(torch.rand(B, 1, generator=gen) < 0.5, grid, torch.randn(B, S, generator=gen))
    step_reward = torch.where(torch.rand(B, S, generator=gen) < 0.2, torch.full_like(step_reward, NAN), step_reward)
    node = torch.randint(0, 50, (B, S), generator=gen)
    sample_valid = None
    if invalid_frac > 0:
        sample_valid = torch.rand(B, generator=gen) >= invalid_frac
        sample_valid[0] = True
        outcome_t = torch.where(sample_valid, outcome_t, torch.full_like(outcome_t, NAN))
        if not invalid_mask_rows:
            mask = mask & sample_valid[:, None]
    return TrajectoryBatch(
        group=group_t, mask=mask, step=step, old_logp=old_logp, outcome=outcome_t, outcome_parts=parts_t,
        ref_logp=ref_logp, step_reward=step_reward, value=value, entropy=entropy, node=node,
        sample_valid=sample_valid,
    )


# ----------------------------------------------------------------------------- small helpers
def _valid(batch: TrajectoryBatch) -> list[bool]:
    return [True] * batch.batch_size if batch.sample_valid is None else batch.sample_valid.tolist()


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    """Unbiased sample std (divides by n - 1); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _broadcast(adv: list[float], batch: TrajectoryBatch) -> torch.Tensor:
    mask = batch.mask.tolist()
    valid = _valid(batch)
    out = [[adv[i] if (mask[i][t] and valid[i]) else 0.0 for t in range(len(mask[i]))] for i in range(len(mask))]
    return torch.tensor(out, dtype=torch.float64)


def whiten_list(xs: list[float], eps: float) -> tuple[float, float]:
    """(mean, 1/sqrt(unbiased var + eps)) of a list: whitening maps x to (x - mean) * inv."""
    m = _mean(xs)
    var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
    return m, 1.0 / math.sqrt(var + eps)


# ----------------------------------------------------------------------------- group advantages
def group_advantages(
    rewards: list[float], group: list[int], valid: Optional[list[bool]] = None, *,
    baseline: str = "mean", scale: str = "group", eps: float = 1e-4,
) -> list[float]:
    """GRPO / Dr.GRPO / RLOO per-sample advantages from a dict of groups (valid samples only).

    mean: a = r - mean_g;  loo: a = r - (sum_g - r) / (n - 1);  scale group: / (std_g + eps),
    batch: / (std of all valid rewards + eps). A singleton or all-equal group gives 0.
    """
    B = len(rewards)
    valid = valid if valid is not None else [True] * B
    members: dict[int, list[float]] = defaultdict(list)
    for i in range(B):
        if valid[i]:
            members[group[i]].append(rewards[i])
    batch_sd = _std([rewards[i] for i in range(B) if valid[i]])
    out = []
    for i in range(B):
        if not valid[i]:
            out.append(0.0)
            continue
        xs = members[group[i]]
        if len(xs) < 2 or max(xs) == min(xs):
            out.append(0.0)
            continue
        base = _mean(xs) if baseline == "mean" else (sum(xs) - rewards[i]) / (len(xs) - 1)
        a = rewards[i] - base
        if scale == "group":
            a /= _std(xs) + eps
        elif scale == "batch":
            a /= batch_sd + eps
        out.append(a)
    return out


def grpo(batch: TrajectoryBatch, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    adv = group_advantages(batch.outcome.tolist(), batch.group.tolist(), _valid(batch), scale=scale, eps=eps)
    return _broadcast(adv, batch)


def dr_grpo(batch: TrajectoryBatch) -> torch.Tensor:
    adv = group_advantages(batch.outcome.tolist(), batch.group.tolist(), _valid(batch), scale="none")
    return _broadcast(adv, batch)


def rloo(batch: TrajectoryBatch) -> torch.Tensor:
    adv = group_advantages(batch.outcome.tolist(), batch.group.tolist(), _valid(batch), baseline="loo", scale="none")
    return _broadcast(adv, batch)


# ----------------------------------------------------------------------------- token-level estimators
def _actions(batch: TrajectoryBatch, i: int) -> list[int]:
    """Positions of the valid actions of sample i (none for an invalid sample)."""
    if not _valid(batch)[i]:
        return []
    return [t for t, m in enumerate(batch.mask[i].tolist()) if m]


def _token_rewards(batch: TrajectoryBatch, i: int, kl_coef: float) -> dict[int, float]:
    """r_t = 1[t = last action] * outcome - kl_coef * (old_logp - ref_logp)_t on the valid actions of i."""
    acts = _actions(batch, i)
    r = {}
    for t in acts:
        r[t] = 0.0
        if kl_coef:
            r[t] -= kl_coef * (float(batch.old_logp[i, t]) - float(batch.ref_logp[i, t]))
    if acts:
        r[acts[-1]] += float(batch.outcome[i])
    return r


def _whiten_tokens(per_sample: list[dict[int, float]], B: int, T: int, eps: float) -> torch.Tensor:
    allv = [v for d in per_sample for v in d.values()]
    m, inv = whiten_list(allv, eps)
    out = torch.zeros(B, T, dtype=torch.float64)
    for i, d in enumerate(per_sample):
        for t, v in d.items():
            out[i, t] = (v - m) * inv
    return out


def reinforce_pp(batch: TrajectoryBatch, kl_coef: float = 0.0, gamma: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++: G_t = sum over later valid actions s of gamma^(#actions from t to s) r_s; whiten over the batch."""
    B, T = batch.mask.shape
    per_sample = []
    for i in range(B):
        r = _token_rewards(batch, i, kl_coef)
        G, ret = 0.0, {}
        for t in reversed(_actions(batch, i)):
            G = r[t] + gamma * G
            ret[t] = G
        per_sample.append(ret)
    return _whiten_tokens(per_sample, B, T, eps)


def reinforce_pp_baseline(batch: TrajectoryBatch, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++-baseline: (r_i - mean_g r) on every valid action, whitened over all valid actions of the batch."""
    B, T = batch.mask.shape
    centred = group_advantages(batch.outcome.tolist(), batch.group.tolist(), _valid(batch), scale="none")
    per_sample = [{t: centred[i] for t in _actions(batch, i)} for i in range(B)]
    return _whiten_tokens(per_sample, B, T, eps)


def gae(batch: TrajectoryBatch, gamma: float = 1.0, lam: float = 0.95, kl_coef: float = 0.0, whiten: bool = True) -> torch.Tensor:
    """GAE: delta_t = r_t + gamma V_next - V_t; A_t = delta_t + gamma lam A_next, over valid actions only."""
    B, T = batch.mask.shape
    per_sample = []
    for i in range(B):
        r = _token_rewards(batch, i, kl_coef)
        next_v, next_a, adv = 0.0, 0.0, {}
        for t in reversed(_actions(batch, i)):
            v = float(batch.value[i, t])
            delta = r[t] + gamma * next_v - v
            a = delta + gamma * lam * next_a
            adv[t] = a
            next_v, next_a = v, a
        per_sample.append(adv)
    if whiten:
        return _whiten_tokens(per_sample, B, T, 1e-8)
    out = torch.zeros(B, T, dtype=torch.float64)
    for i, d in enumerate(per_sample):
        for t, v in d.items():
            out[i, t] = v
    return out


def stepwise_grpo(batch: TrajectoryBatch, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """A_{i,s} = (r_{i,s} - mean of cell (g(i), s)) / (std of the cell + eps); mapped to actions by ``step``."""
    B, T = batch.mask.shape
    S = batch.step_reward.shape[1]
    valid = _valid(batch)
    group = batch.group.tolist()
    sr = batch.step_reward.tolist()
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for i in range(B):
        for s in range(S):
            if valid[i] and not math.isnan(sr[i][s]):
                cells[(group[i], s)].append(sr[i][s])
    out = torch.zeros(B, T, dtype=torch.float64)
    step = batch.step.tolist()
    for i in range(B):
        for t in _actions(batch, i):
            s = step[i][t]
            x = sr[i][s]
            xs = cells.get((group[i], s), [])
            if math.isnan(x) or len(xs) < 2 or max(xs) == min(xs):
                continue
            a = x - _mean(xs)
            if scale == "group":
                a /= _std(xs) + eps
            out[i, t] = a
    return out


def gdpo(batch: TrajectoryBatch, weights: Optional[dict[str, float]] = None, eps: float = 1e-4) -> torch.Tensor:
    """GDPO: sum_k w_k GRPO_k(r^k) per sample, whitened over the valid samples (unbiased var, eps 1e-8)."""
    valid = _valid(batch)
    group = batch.group.tolist()
    B = batch.batch_size
    total = [0.0] * B
    for k, r in batch.outcome_parts.items():
        a = group_advantages(r.tolist(), group, valid, eps=eps)
        w = (weights or {}).get(k, 1.0)
        total = [total[i] + w * a[i] for i in range(B)]
    m, inv = whiten_list([total[i] for i in range(B) if valid[i]], 1e-8)
    return _broadcast([(total[i] - m) * inv if valid[i] else 0.0 for i in range(B)], batch)


ESTIMATORS = {
    "grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline, "gae": gae, "stepwise_grpo": stepwise_grpo, "gdpo": gdpo,
}


# ----------------------------------------------------------------------------- losses
def aggregate(values, mask, mode: str, max_len: Optional[int] = None) -> float:
    """token_mean: sum l / #tokens;  seq_mean_token_mean: mean over non-empty rows of the row mean;
    seq_mean_token_sum: mean over non-empty rows of the row sum;  ..._norm: sum l / (N * max_len)."""
    vals, m = values.tolist(), mask.tolist()
    B, T = len(m), len(m[0])
    rows = [[vals[i][t] for t in range(T) if m[i][t]] for i in range(B)]
    rows = [r for r in rows if r]
    if mode == "token_mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq_mean_token_mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq_mean_token_sum":
        return sum(sum(r) for r in rows) / len(rows)
    if mode == "seq_mean_token_sum_norm":
        return sum(sum(r) for r in rows) / (len(rows) * (max_len if max_len is not None else T))
    raise ValueError(mode)


def ppo_clip_tokens(
    logp, old_logp, adv, *, eps_low: float = 0.2, eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None, adv_clip: Optional[float] = None, is_weights=None,
) -> list[list[float]]:
    """Per-token PPO loss: max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)); dual-clip min(., -A c) for A < 0."""
    eps_high = eps_low if eps_high is None else eps_high
    lp, olp, A = logp.tolist(), old_logp.tolist(), adv.tolist()
    w = is_weights.tolist() if is_weights is not None else None
    out = []
    for i in range(len(lp)):
        row = []
        for t in range(len(lp[i])):
            a = A[i][t]
            if adv_clip is not None:
                a = min(max(a, -adv_clip), adv_clip)
            rho = math.exp(lp[i][t] - olp[i][t])
            l = max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
            if dual_clip is not None and a < 0:
                l = min(l, -a * dual_clip)
            if w is not None:
                l *= w[i][t]
            row.append(l)
        out.append(row)
    return out


def gspo_tokens(logp, old_logp, adv, mask, *, eps_low: float = 3e-4, eps_high: float = 4e-4) -> list[list[float]]:
    """GSPO: s_i = exp(mean over valid t of (logp - old_logp)); l_t = max(-A s_i, -A clip(s_i))."""
    lp, olp, A, m = logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist()
    out = []
    for i in range(len(lp)):
        acts = [t for t in range(len(m[i])) if m[i][t]]
        s = math.exp(sum(lp[i][t] - olp[i][t] for t in acts) / len(acts)) if acts else 1.0
        out.append([max(-A[i][t] * s, -A[i][t] * min(max(s, 1 - eps_low), 1 + eps_high)) for t in range(len(lp[i]))])
    return out


def kl(logp, ref_logp, kind: str) -> list[list[float]]:
    """Schulman's estimators with d = ref - logp: k1 = -d, k2 = d^2/2, k3 = e^d - d - 1."""
    out = []
    for row_p, row_r in zip(logp.tolist(), ref_logp.tolist()):
        row = []
        for p, r in zip(row_p, row_r):
            d = r - p
            row.append({"k1": -d, "k2": 0.5 * d * d, "k3": math.exp(d) - d - 1}[kind])
        out.append(row)
    return out


def importance_weights(trainer, sampler, mask, *, level: str, mode: str, c_max: float = 2.0, c_min: float = 0.0):
    """w = pi_trainer / pi_sampler per token, or its product over the row's valid tokens; truncate: min(w, c_max);
    mask: w if c_min <= w <= c_max else 0. 0 off the mask."""
    tr, sa, m = trainer.tolist(), sampler.tolist(), mask.tolist()
    out = []
    for i in range(len(m)):
        seq = math.exp(sum(tr[i][t] - sa[i][t] for t in range(len(m[i])) if m[i][t]))
        row = []
        for t in range(len(m[i])):
            if not m[i][t]:
                row.append(0.0)
                continue
            w = seq if level == "sequence" else math.exp(tr[i][t] - sa[i][t])
            if mode == "truncate":
                row.append(min(w, c_max))
            else:
                row.append(w if c_min <= w <= c_max else 0.0)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- shaping
def weighted_sum(parts: dict, weights: Optional[dict] = None) -> list[float]:
    B = len(next(iter(parts.values())))
    return [sum((weights or {}).get(k, 1.0) * float(v[i]) for k, v in parts.items()) for i in range(B)]


def zero_variance_filter(rewards, group, valid=None, keep_singletons: bool = False) -> list[bool]:
    """Keep samples whose group's valid rewards are not all equal (singletons: only if keep_singletons)."""
    r, g = rewards.tolist(), group.tolist()
    valid = valid.tolist() if valid is not None else [True] * len(r)
    members: dict[int, list[float]] = defaultdict(list)
    for i in range(len(r)):
        if valid[i]:
            members[g[i]].append(r[i])
    out = []
    for i in range(len(r)):
        xs = members[g[i]]
        keep = valid[i] and (max(xs) != min(xs) or (keep_singletons and len(xs) == 1))
        out.append(keep)
    return out


def accuracy_band_filter(correct, group, low: float, high: float, valid=None) -> list[bool]:
    """Keep samples whose group's accuracy (mean of valid ``correct``) lies in [low, high]."""
    c, g = [float(x) for x in correct.tolist()], group.tolist()
    valid = valid.tolist() if valid is not None else [True] * len(c)
    members: dict[int, list[float]] = defaultdict(list)
    for i in range(len(c)):
        if valid[i]:
            members[g[i]].append(c[i])
    return [valid[i] and low <= _mean(members[g[i]]) <= high for i in range(len(c))]


def soft_overlong_penalty(lengths, max_len: int, cache_len: int, factor: float = 1.0) -> list[float]:
    """DAPO: 0 if L <= max_len - cache; ((max_len - cache) - L) / cache * factor inside the buffer; -factor beyond."""
    out = []
    for L in lengths.tolist():
        if L <= max_len - cache_len:
            out.append(0.0)
        elif L <= max_len:
            out.append(factor * ((max_len - cache_len) - L) / cache_len)
        else:
            out.append(-factor)
    return out


def loss_inputs(gen: torch.Generator, B: int = 9, T: int = 13, spread: float = 0.3, seq_adv: bool = False):
    """(logp, old_logp, adv, mask) for loss tests: a ragged mask with holes and one empty row; ratios spread
    around 1 so that some tokens clip; ``seq_adv`` gives one advantage per sequence."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=gen) > 0.2)
    mask[:, 0] = True
    mask[B // 2] = False
    old = -torch.rand(B, T, generator=gen) * 3
    logp = old + spread * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, 1, generator=gen).expand(B, T).clone() if seq_adv else torch.randn(B, T, generator=gen)
    return logp, old, adv, mask


def discounted_scan(x: torch.Tensor, mask: torch.Tensor, c: float) -> torch.Tensor:
    """y_t = x_t + c * y_{next valid action} on valid actions, 0 elsewhere: the recurrence, row by row."""
    B, T = mask.shape
    ref = torch.zeros(B, T)
    for b in range(B):
        y = 0.0
        for t in range(T - 1, -1, -1):
            if mask[b, t]:
                y = float(x[b, t]) + c * y
                ref[b, t] = y
    return ref
