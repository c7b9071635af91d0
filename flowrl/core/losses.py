"""Policy losses, KL estimators, loss aggregation and importance-sampling correction.

A policy loss is ``fn(logp, old_logp, adv, mask, *, agg="token_mean", **params) -> (loss, metrics)``:
every tensor float [B, T] (``mask`` bool [B, T]), ``loss`` a 0-dim tensor, ``metrics`` a dict of
0-dim tensors with namespaced keys (no host sync in here: log them when you like). Aggregation is its
own function, ``aggregate``, and is exact across ranks: under DDP's gradient averaging, the per-rank
losses it returns average to the single-process loss of the whole batch.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .advantages import check_params
from .groups import all_reduce_sum, use_distributed, world_size
from .masks import row_counts

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
LOSSES: dict[str, LossFn] = {}
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")


def register_loss(name: str):
    """Decorator: register a policy loss ``fn(logp, old_logp, adv, mask, *, agg, **params) -> (loss, metrics)``."""

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES and LOSSES[name] is not fn:
            raise KeyError(f"policy loss {name!r} is already registered ({LOSSES[name].__module__})")
        LOSSES[name] = fn
        return fn

    return deco


def compute_policy_loss(
    name: str, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token_mean", **params
) -> tuple[Tensor, dict[str, Tensor]]:
    """Look up policy loss ``name`` and apply it; shapes, names and parameters are checked first."""
    if name not in LOSSES:
        raise KeyError(f"unknown policy loss {name!r}; registered: {sorted(LOSSES)}")
    fn = LOSSES[name]
    check_params("policy loss", name, fn, {"agg": agg, **params}, skip=4)
    check_shapes(mask, logp=logp, old_logp=old_logp, adv=adv)
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation {agg!r}; valid: {AGG_MODES}")
    return fn(logp, old_logp, adv, mask, agg=agg, **params)


def check_shapes(mask: Tensor, **tensors: Optional[Tensor]) -> None:
    """Raise ValueError unless ``mask`` is bool [B, T] and every given tensor has its shape."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, T]; got {mask.dtype} {tuple(mask.shape)}")
    if mask.shape[0] == 0:
        raise ValueError("empty batch: mask has shape [0, T]")
    for k, t in tensors.items():
        if t is not None and tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{k} has shape {tuple(t.shape)}; expected [B, T] = {tuple(mask.shape)} (the mask's)")


# ----------------------------------------------------------------------------- aggregation
def aggregate(
    values: Tensor, mask: Tensor, mode: str = "token_mean", *, max_len: Optional[int] = None,
    distributed: Optional[bool] = None,
) -> Tensor:
    """Reduce a per-action loss float [B, T] to a scalar, over ``mask`` bool [B, T].

    token_mean:              sum_{i,t} l_{i,t} / sum_{i,t} m_{i,t}                      (DAPO; verl's token-mean)
    seq_mean_token_mean:     (1/N) sum_i [ sum_t l_{i,t} / |o_i| ]                      (original GRPO)
    seq_mean_token_sum:      (1/N) sum_i sum_t l_{i,t}
    seq_mean_token_sum_norm: (1/(N * L)) sum_i sum_t l_{i,t}, L = ``max_len`` (default T) (Dr.GRPO)
    N counts sequences with at least one valid action. Across R ranks (DDP averages gradients), each
    rank returns R * (its share of the global numerator) / (global denominator), so the mean over
    ranks equals the single-process value on the whole batch.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation {mode!r}; valid: {AGG_MODES}")
    check_shapes(mask, values=values)
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    v = torch.where(mask, values.to(torch.float32), zero)
    tokens = row_counts(mask).to(torch.float32)  # counts straight from the bool mask's bytes: no float [B, T] copy
    has = tokens > 0
    if mode == "token_mean":
        num, den = v.sum(), tokens.sum()
    else:
        per_seq = v.sum(dim=1)
        if mode == "seq_mean_token_mean":
            per_seq = per_seq / tokens.clamp_min(1)
        num, den = per_seq.sum(), has.to(torch.float32).sum()
        if mode == "seq_mean_token_sum_norm":
            den = den * float(max_len if max_len is not None else mask.shape[1])
    if use_distributed(distributed):
        den = all_reduce_sum(den.detach()) / world_size()
    return num / den.clamp_min(1e-12)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (local to this rank; for metrics)."""
    if values.dtype == torch.bool:  # a fraction: count, with no float [B, T] copy
        return (values & mask).sum().to(torch.float32) / mask.sum().clamp_min(1)
    return (torch.where(mask, values.to(torch.float32), 0.0)).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- KL
def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-action estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    With d = log pi_ref - log pi:  k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (unbiased, >= 0, low variance).
    logp, ref_logp: float [B, T]. Returns float [B, T].
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {KL_KINDS}")
    if tuple(logp.shape) != tuple(ref_logp.shape):
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)}; expected {tuple(logp.shape)} (logp's)")
    d = ref_logp.to(torch.float32) - logp.to(torch.float32)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    return torch.expm1(d) - d


# ----------------------------------------------------------------------------- importance sampling
def importance_weights(
    trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, level: str = "token", mode: str = "truncate",
    c_max: float = 2.0, c_min: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Correction for a sampler whose log-probs differ from the trainer's (vLLM vs FSDP; TIS / MIS).

    w = pi_train_old / pi_sampler, per action (level "token") or as the product over the sequence's
    valid actions (level "sequence", broadcast to them). mode "truncate": w <- min(w, c_max);
    mode "mask": w <- w if c_min <= w <= c_max else 0. Detached: multiply the per-action loss by it.
    Returns ``(w float [B, T], metrics)`` with 0 off the mask.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_weights: level={level!r}; valid: ('token', 'sequence')")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"importance_weights: mode={mode!r}; valid: ('truncate', 'mask')")
    check_shapes(mask, trainer_logp=trainer_logp, sampler_logp=sampler_logp)
    zero = torch.zeros((), device=mask.device)
    log_w = torch.where(mask, trainer_logp.detach().float() - sampler_logp.detach().float(), zero)
    if level == "sequence":
        log_w = torch.where(mask, log_w.sum(dim=1, keepdim=True).expand_as(log_w), zero)
    w = torch.exp(log_w.clamp(max=20.0))  # exp(20) ~ 5e8: far beyond any c_max, and no overflow
    if mode == "truncate":
        out = w.clamp(max=c_max)
        changed = w > c_max
    else:
        keep = (w >= c_min) & (w <= c_max)
        out = torch.where(keep, w, zero)
        changed = ~keep
    out = torch.where(mask, out, zero)
    metrics = {"is/weight_mean": masked_mean(w, mask), f"is/{mode}d_frac": masked_mean(changed.float(), mask)}
    return out, metrics


# ----------------------------------------------------------------------------- policy losses
def _ratio_metrics(
    log_ratio: Tensor, mask: Tensor, clipped: Tensor, prefix: str = "policy", ratio: Optional[Tensor] = None
) -> dict[str, Tensor]:
    # at most one float [B, T] temporary at a time: these run while the loss's autograd buffers are alive
    ratio = torch.exp(log_ratio) if ratio is None else ratio
    k3 = masked_mean(torch.neg(log_ratio).expm1_().add_(log_ratio), mask)  # k3 of KL(old || new)
    big = torch.tensor(float("inf"), device=mask.device)
    return {
        f"{prefix}/clip_frac": masked_mean(clipped, mask),
        f"{prefix}/approx_kl": k3,
        f"{prefix}/ratio_mean": masked_mean(ratio, mask),
        f"{prefix}/ratio_min": torch.where(mask, ratio, big).amin(),
        f"{prefix}/ratio_max": torch.where(mask, ratio, -big).amax(),
    }


@register_loss("ppo_clip")
def ppo_clip(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token_mean",
    eps_low: float = 0.2, eps_high: Optional[float] = None, dual_clip: Optional[float] = None,
    adv_clip: Optional[float] = None, is_weights: Optional[Tensor] = None, max_len: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO, Schulman et al. 2017), with clip-higher (DAPO) and dual-clip (Ye et al. 2020).

    rho = exp(logp - old_logp); A <- clip(A, -adv_clip, adv_clip) if adv_clip;
    l = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high)), eps_high defaulting to eps_low;
    dual-clip c > 1, for A < 0: l = min(l, -A * c). ``is_weights`` [B, T] (sampler/trainer correction)
    multiplies l. Then ``aggregate(l, mask, agg)``.
    Flow kernels use the true Gaussian density averaged over latent dims, so their ratios are
    geometric means per element and the clip range is tiny (1e-4, as Flow-GRPO).
    Metrics: policy/clip_frac, approx_kl, ratio_mean/min/max, dual_clip_frac.
    """
    eps_high = eps_low if eps_high is None else eps_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"ppo_clip: dual_clip={dual_clip} must be > 1")
    check_shapes(mask, logp=logp, old_logp=old_logp, adv=adv, is_weights=is_weights)
    A = adv.detach().float()
    if adv_clip is not None:
        A = A.clamp(-adv_clip, adv_clip)
    metrics: dict[str, Tensor] = {}
    loss = _ClippedSurrogate.apply(logp, old_logp, A, mask, eps_low, eps_high, dual_clip, metrics)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    return aggregate(loss, mask, agg, max_len=max_len), metrics


class _ClippedSurrogate(torch.autograd.Function):
    """``ppo_clip``'s per-action loss l float32 [B, T] (0 off the mask), with its gradient kept as one [B, T].

    d l / d logp = -A rho where the unclipped term is the maximum, 0 where the clipped one wins (the clip is
    flat there) or the dual clip does (a constant). Autograd through the elementwise graph keeps five [B, T]
    buffers (rho, -A, both terms, the maximum's inputs) and builds as many gradients; this keeps the one
    coefficient, so the forward + backward peak is about half. The metrics are written into ``metrics``."""

    @staticmethod
    def forward(ctx, logp, old_logp, A, mask, eps_low, eps_high, dual_clip, metrics):
        zero = torch.zeros((), device=mask.device)
        log_ratio = torch.where(mask, logp.detach().float() - old_logp.detach().float(), zero)
        ratio = torch.exp(log_ratio)
        loss = torch.mul(A, ratio).neg_()  # -A rho
        clipped_term = torch.mul(A, ratio.clamp(1.0 - eps_low, 1.0 + eps_high)).neg_()
        clipped = clipped_term > loss
        torch.maximum(loss, clipped_term, out=loss)
        del clipped_term
        metrics.update(_ratio_metrics(log_ratio, mask, clipped, ratio=ratio))
        grad = torch.mul(A, ratio, out=log_ratio).neg_()  # -A rho, in log_ratio's buffer
        del ratio
        off = clipped.logical_or_(~mask)
        if dual_clip is not None:
            l3 = A * (-dual_clip)
            dual = (A < 0) & (l3 < loss)
            metrics["policy/dual_clip_frac"] = masked_mean(dual, mask)
            torch.where(dual, l3, loss, out=loss)
            off.logical_or_(dual)
        torch.where(off, zero, grad, out=grad)
        torch.where(mask, loss, zero, out=loss)
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad_loss * grad).to(ctx.logp_dtype), None, None, None, None, None, None, None


@register_loss("gspo")
def gspo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "seq_mean_token_mean",
    eps_low: float = 3e-4, eps_high: float = 4e-4, is_weights: Optional[Tensor] = None, max_len: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al., 2025): a sequence-level importance ratio.

    s_i = exp((1/|o_i|) sum_t (logp - old_logp)_{i,t}) (the length-normalised sequence ratio), used per action
    as GSPO-token: s_{i,t} = sg[s_i] * pi(o_t) / sg[pi(o_t)] (same value, gradient s_i * grad log pi(o_t));
    l_{i,t} = max(-A s_{i,t}, -A clip(s_{i,t}, 1 - eps_low, 1 + eps_high)). Defaults are the paper's
    (3e-4, 4e-4) with ``seq_mean_token_mean``. The mean log-ratio is clamped at 10 (as verl) against overflow.
    """
    check_shapes(mask, logp=logp, old_logp=old_logp, adv=adv, is_weights=is_weights)
    zero = torch.zeros((), device=mask.device)
    lr = torch.where(mask, logp.float() - old_logp.detach().float(), zero)
    n = mask.float().sum(dim=1, keepdim=True).clamp_min(1)
    seq_lr = (lr.sum(dim=1, keepdim=True) / n).clamp(max=10.0)
    lp = torch.where(mask, logp.float(), zero)  # padding may hold -inf/NaN: keep it out of the gradient
    log_s = seq_lr.detach() + lp - lp.detach()
    s = torch.exp(log_s)
    A = adv.detach().float()
    l1 = -A * s
    l2 = -A * s.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(l1, l2)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    metrics = _ratio_metrics(torch.where(mask, seq_lr.detach().expand_as(lr), zero), mask, (l2 > l1).detach())
    return aggregate(loss, mask, agg, max_len=max_len), metrics
