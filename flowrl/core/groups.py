"""Group statistics by scatter ops, with an exact cross-rank path.

Samples of one prompt form a group (``group`` long [B], ids unique across ranks). Every statistic
here is computed with ``index_add_`` / ``scatter_reduce_`` over segment ids: no Python loop over
samples or groups, and the same code runs on CPU and CUDA.

Distributed: when ``torch.distributed`` is initialised with more than one rank (or when
``distributed=True``), the per-sample inputs ([B] or [B, S]: small next to the [B, T] tensors) are
all-gathered, the statistics are computed over the global batch, and each rank keeps its own rows.
Groups that straddle ranks therefore get exactly the single-process statistics. Ranks may hold
different numbers of samples; the gather pads to the largest (one host sync for the sizes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from .kernels import use_native
from .kernels.rows import whiten_native_
from .masks import row_counts


BASELINES = ("mean", "loo")
SCALES = ("group", "batch", "none")


# ----------------------------------------------------------------------------- distribution
def world_size() -> int:
    """Number of ranks of the default process group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def use_distributed(distributed: Optional[bool]) -> bool:
    """Resolve a ``distributed`` argument: None means "when a process group with >1 rank exists"."""
    if distributed is None:
        return world_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True but torch.distributed is not initialised")
    return distributed


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` is unchanged)."""
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(*tensors: Tensor) -> tuple[list[Tensor], Tensor, slice]:
    """All-gather per-sample tensors (first dim B_local, which may differ between ranks).

    Returns ``(gathered, present, local)``: each gathered tensor has ``world * B_max`` rows (rank r's
    rows first, then padding), ``present`` bool [world * B_max] marks real rows, and ``local`` is
    the slice of this rank's rows in the gathered tensors.
    """
    n_local = tensors[0].shape[0]
    device = tensors[0].device
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([n_local], device=device, dtype=torch.long)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    n_max = int(size)  # the one host sync: buffers need a static size
    gathered = []
    for t in tensors:
        pad = t.new_zeros((n_max - n_local, *t.shape[1:]))
        buf = torch.cat([t, pad]) if n_max > n_local else t.contiguous()
        if buf.dtype == torch.bool:  # gloo cannot all_gather bool
            parts = [torch.empty_like(buf, dtype=torch.uint8) for _ in range(world)]
            dist.all_gather(parts, buf.to(torch.uint8))
            gathered.append(torch.cat(parts).bool())
        else:
            parts = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(parts, buf)
            gathered.append(torch.cat(parts))
    real = (torch.arange(n_max, device=device) < n_local).to(torch.uint8)
    parts = [torch.empty_like(real) for _ in range(world)]
    dist.all_gather(parts, real)
    present = torch.cat(parts).bool()
    return gathered, present, slice(rank * n_max, rank * n_max + n_local)


# ----------------------------------------------------------------------------- segment statistics
@dataclass
class SegmentStats:
    """Per-segment statistics, each float [K]: count of valid members, sum, mean, unbiased std, min, max."""

    count: Tensor
    sum: Tensor
    mean: Tensor
    std: Tensor
    min: Tensor
    max: Tensor


def segment_stats(values: Tensor, seg: Tensor, num_segments: int, valid: Optional[Tensor] = None) -> SegmentStats:
    """Statistics of ``values`` float [N] over segments ``seg`` long [N] in [0, K), counting only ``valid``.

    std is unbiased (divides by n - 1, as ``torch.std``); a segment of one valid member has std 0.
    Two passes (mean, then squared deviations) keep the variance accurate for large offsets.
    """
    v = values.to(torch.float32)
    if valid is None:
        valid = torch.ones_like(seg, dtype=torch.bool)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    vv = torch.where(valid, v, zero)  # invalid entries may hold NaN: never let them in
    count = torch.zeros(num_segments, dtype=v.dtype, device=v.device).index_add_(0, seg, valid.to(v.dtype))
    total = torch.zeros_like(count).index_add_(0, seg, vv)
    mean = total / count.clamp_min(1)
    dev = torch.where(valid, v - mean[seg], zero)
    ss = torch.zeros_like(count).index_add_(0, seg, dev * dev)
    std = (ss / (count - 1).clamp_min(1)).sqrt()
    inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)
    lo = torch.full_like(count, float("inf")).scatter_reduce_(0, seg, torch.where(valid, v, inf), "amin")
    hi = torch.full_like(count, float("-inf")).scatter_reduce_(0, seg, torch.where(valid, v, -inf), "amax")
    return SegmentStats(count=count, sum=total, mean=mean, std=std, min=lo, max=hi)


def group_index(group: Tensor) -> tuple[Tensor, int]:
    """Dense group index: ``(inv long [B] in [0, G), G)`` for arbitrary (large, sparse) ids."""
    if group.dim() != 1:
        raise ValueError(f"group has shape {tuple(group.shape)}; expected long [B]")
    uniq, inv = torch.unique(group, return_inverse=True)
    return inv, int(uniq.shape[0])


@dataclass
class GroupStats:
    """Per-sample group statistics, each float [B]: the sample's group's valid count, mean, unbiased std,
    leave-one-out mean (mean of the *other* valid members; 0 when there are none), and whether the
    group's valid rewards are all equal (``constant``; singletons are constant)."""

    count: Tensor
    mean: Tensor
    std: Tensor
    loo_mean: Tensor
    constant: Tensor


def _local_group_stats(rewards: Tensor, group: Tensor, valid: Tensor) -> GroupStats:
    inv, G = group_index(group)
    s = segment_stats(rewards, inv, G, valid)
    r = torch.where(valid, rewards.to(torch.float32), torch.zeros((), device=rewards.device))
    n = s.count[inv]
    loo = torch.where(n > 1, (s.sum[inv] - r) / (n - 1).clamp_min(1), torch.zeros_like(r))
    return GroupStats(count=n, mean=s.mean[inv], std=s.std[inv], loo_mean=loo, constant=s.max[inv] <= s.min[inv])


def group_stats(
    rewards: Tensor, group: Tensor, *, valid: Optional[Tensor] = None, distributed: Optional[bool] = None
) -> GroupStats:
    """Group statistics of ``rewards`` float [B] by ``group`` long [B], per sample (see ``GroupStats``).

    ``valid`` bool [B] (default all) excludes samples from every statistic.
    """
    _check_rows(rewards, group, valid)
    if valid is None:
        valid = torch.ones_like(group, dtype=torch.bool)
    if not use_distributed(distributed):
        return _local_group_stats(rewards, group, valid)
    (r, g, v), present, local = gather_rows(rewards.to(torch.float32), group, valid)
    st = _local_group_stats(r, g, v & present)
    return GroupStats(*(getattr(st, f)[local] for f in ("count", "mean", "std", "loo_mean", "constant")))


def batch_std(values: Tensor, valid: Tensor, *, distributed: Optional[bool] = None) -> Tensor:
    """Unbiased std of ``values`` over the valid entries of the whole (global) batch: a 0-dim tensor."""
    v = values.to(torch.float32)
    zero = torch.zeros((), device=v.device)
    w = valid.to(torch.float32)
    stats = torch.stack([w.sum(), torch.where(valid, v, zero).sum()])
    if use_distributed(distributed):
        stats = all_reduce_sum(stats)
    n, total = stats[0], stats[1]
    mean = total / n.clamp_min(1)
    ss = torch.where(valid, (v - mean) ** 2, zero).sum()
    if use_distributed(distributed):
        ss = all_reduce_sum(ss)
    return (ss / (n - 1).clamp_min(1)).sqrt()


def group_advantages(
    rewards: Tensor,
    group: Tensor,
    *,
    baseline: str = "mean",
    scale: str = "group",
    eps: float = 1e-4,
    valid: Optional[Tensor] = None,
    distributed: Optional[bool] = None,
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024; Dr.GRPO, Liu et al. 2025; RLOO, Ahmadian et al. 2024).

    baseline "mean": a_i = r_i - mean_{g(i)} r;  "loo": a_i = r_i - (1/(n_g - 1)) sum_{j in g(i), j != i} r_j.
    scale "group": a_i / (std_{g(i)} r + eps) (unbiased std);  "batch": a_i / (std_batch r + eps), the std of
    all valid rewards of the (global) batch;  "none": a_i.
    A group of one valid sample, or whose valid rewards are all equal, gets exactly 0 (never NaN);
    invalid samples (``valid`` False) get 0 and take no part in any statistic.

    rewards: float [B]; group: long [B]; valid: bool [B] or None. Returns float32 [B].
    """
    if baseline not in BASELINES:
        raise ValueError(f"group_advantages: baseline={baseline!r}; valid values are {BASELINES}")
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale={scale!r}; valid values are {SCALES}")
    if valid is None:
        valid = torch.ones_like(group, dtype=torch.bool)
    _check_rows(rewards, group, valid)
    if not bool(torch.isfinite(torch.where(valid, rewards, 0.0)).all()):
        raise ValueError("group_advantages: rewards contain NaN or inf on valid samples; mark them invalid with `valid`")
    st = group_stats(rewards, group, valid=valid, distributed=distributed)
    r = rewards.to(torch.float32)
    adv = r - (st.mean if baseline == "mean" else st.loo_mean)
    if scale == "group":
        adv = adv / (st.std + eps)
    elif scale == "batch":
        adv = adv / (batch_std(r, valid, distributed=distributed) + eps)
    keep = valid & ~st.constant
    return torch.where(keep, adv, torch.zeros((), device=adv.device))


def group_step_stats(
    values: Tensor, group: Tensor, *, valid: Optional[Tensor] = None, distributed: Optional[bool] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Statistics per (group, step) of ``values`` float [B, S]: ``(count, mean, std, constant)``, each [B, S].

    Entries that are NaN (a step without a reward) or where ``valid`` bool [B, S] is False are left out.
    This is the per-timestep stat tracker of TurningPoint-GRPO and Euphonium's process-reward advantage.
    """
    if values.dim() != 2 or values.shape[0] != group.shape[0]:
        raise ValueError(f"values has shape {tuple(values.shape)}; expected float [B, S] with B = {group.shape[0]}")
    ok = ~torch.isnan(values)
    if valid is not None:
        if tuple(valid.shape) != tuple(values.shape):
            raise ValueError(f"valid has shape {tuple(valid.shape)}; expected bool [B, S] = {tuple(values.shape)}")
        ok = ok & valid
    if use_distributed(distributed):
        (v, g, o), present, local = gather_rows(values.to(torch.float32), group, ok)
        out = _local_group_step_stats(v, g, o & present[:, None])
        return tuple(t[local] for t in out)  # type: ignore[return-value]
    return _local_group_step_stats(values, group, ok)


def _local_group_step_stats(values: Tensor, group: Tensor, ok: Tensor):
    B, S = values.shape
    inv, G = group_index(group)
    seg = (inv[:, None] * S + torch.arange(S, device=values.device)).reshape(-1)
    s = segment_stats(values.reshape(-1), seg, G * S, ok.reshape(-1))
    shape = (B, S)
    return (s.count[seg].view(shape), s.mean[seg].view(shape), s.std[seg].view(shape), (s.max <= s.min)[seg].view(shape))


def masked_whiten(values: Tensor, mask: Tensor, *, eps: float = 1e-8, distributed: Optional[bool] = None,
                  inplace: bool = False) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the True entries of ``mask`` (global batch when distributed).

    Unbiased variance, as verl's ``masked_whiten`` and OpenRLHF's; two passes (mean, then squared deviations),
    so a large mean costs no accuracy. values: float [B, T] (or [B]); mask: bool of the same shape. Returns
    float32 of that shape, 0 where ``mask`` is False. At most one [B, T] allocation (the output; none with
    ``inplace=True`` on a contiguous float32 ``values``, which is then overwritten): ``where`` into the output,
    two reductions, and three in-place passes.
    """
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    if inplace and values.dtype == torch.float32 and values.is_contiguous():
        out = torch.where(mask, values, zero, out=values)
    else:
        out = torch.where(mask, values.to(torch.float32), zero)
    return whiten_zeroed_(out, mask, eps=eps, distributed=distributed)


def whiten_zeroed_(out: Tensor, mask: Tensor, *, eps: float = 1e-8, distributed: Optional[bool] = None,
                   row_sums: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """``masked_whiten`` in place of a contiguous float32 ``out`` that is already 0 where ``mask`` is False
    (e.g. an estimator's own return buffer). Returns ``out``.

    mean = sum(out) / N, var = sum((out - mean)^2) / (N - 1) over the N valid actions (global batch when
    distributed); out = (out - mean) * rsqrt(var + eps) on the mask. Torch: two reductions and three in-place
    passes. On CPU the native kernels take it (``kernels.rows.whiten_native_``: float64 sums, one in-place pass),
    using ``row_sums`` = (sum, sum of squares) float64 [B] of out's rows when the caller has them (the fused scan
    returns them).
    """
    if mask.dim() == 2 and out.is_contiguous() and use_native(out, mask):
        return whiten_native_(out, mask, row_sums, eps, all_reduce_sum if use_distributed(distributed) else None)
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    n = (row_counts(mask) if mask.dim() == 2 else mask.sum()).sum().to(torch.float32)
    stats = torch.stack([n, out.sum()])
    if use_distributed(distributed):
        stats = all_reduce_sum(stats)
    n = stats[0]
    mean = stats[1] / n.clamp_min(1)
    torch.where(mask, out.sub_(mean), zero, out=out)
    flat = out.reshape(-1)
    ss = torch.dot(flat, flat)
    if use_distributed(distributed):
        ss = all_reduce_sum(ss)
    var = ss / (n - 1).clamp_min(1)
    return out.mul_(torch.rsqrt(var + eps))


def whiten_rows(values: Tensor, counts: Tensor, *, eps: float = 1e-8, distributed: Optional[bool] = None) -> Tensor:
    """``masked_whiten`` of a row-constant [B, T] tensor, computed in [B]: exact and without touching [B, T].

    Row b holds the value ``values[b]`` on ``counts[b]`` valid actions, so the token-weighted mean and the
    unbiased variance over the valid actions are sum_b n_b v_b / N and sum_b n_b (v_b - mean)^2 / (N - 1).
    values: float [B]; counts: float [B] (valid actions per row). Returns float32 [B]: (v - mean) / sqrt(var + eps)
    (broadcast it to the actions with ``broadcast_to_actions``).
    """
    v = values.to(torch.float32)
    n = counts.to(torch.float32)
    stats = torch.stack([n.sum(), (n * v).sum()])
    if use_distributed(distributed):
        stats = all_reduce_sum(stats)
    mean = stats[1] / stats[0].clamp_min(1)
    ss = (n * (v - mean) ** 2).sum()
    if use_distributed(distributed):
        ss = all_reduce_sum(ss)
    var = ss / (stats[0] - 1).clamp_min(1)
    return (v - mean) * torch.rsqrt(var + eps)


def _check_rows(rewards: Tensor, group: Tensor, valid: Optional[Tensor]) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; expected float [B]")
    if tuple(group.shape) != tuple(rewards.shape):
        raise ValueError(f"group has shape {tuple(group.shape)}; expected long [B] = {tuple(rewards.shape)}")
    if group.is_floating_point() or group.dtype == torch.bool:
        raise ValueError(f"group has dtype {group.dtype}; expected an integer tensor")
    if valid is not None and tuple(valid.shape) != tuple(rewards.shape):
        raise ValueError(f"valid has shape {tuple(valid.shape)}; expected bool [B] = {tuple(rewards.shape)}")
    if rewards.shape[0] == 0:
        raise ValueError("rewards is empty: a batch needs at least one sample")
