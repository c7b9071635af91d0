"""Policy losses, KL estimators, loss aggregation and importance-sampling correction.

Registered losses: PPO's clipped surrogate (``ppo_clip``, with DAPO's asymmetric clip and dual clip), GSPO's
sequence-level ratio (``gspo``), OREAL's reward-shaped NLL, PACS's supervised score, and ETR's
entropy-regularised trust region. Per-sample inputs some losses need (group ids, binary labels, group reward
variance) are keyword tensors that the trainer passes from the batch.

A policy loss is ``fn(logp, old_logp, adv, mask, *, agg="token_mean", **params) -> (loss, metrics)``:
every tensor float [B, T] (``mask`` bool [B, T]), ``loss`` a 0-dim tensor, ``metrics`` a dict of
0-dim tensors with namespaced keys (no host sync in here: log them when you like). Aggregation is its
own function, ``aggregate``, and is exact across ranks: under DDP's gradient averaging, the per-rank
losses it returns average to the single-process loss of the whole batch.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .groups import all_reduce_sum, group_index, use_distributed, world_size
from .registry import Registry
from .masks import row_counts

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
LOSSES = Registry("policy loss", skip=4)
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_KINDS = ("k1", "k2", "k3")


def register_loss(name: str, *, agg: Optional[str] = None, params: Optional[dict[str, Any]] = None):
    """Decorator: register a policy loss ``fn(logp, old_logp, adv, mask, *, agg, **params) -> (loss, metrics)``;
    registering a taken name with another function is an error.

    ``agg`` and ``params`` are the loss's own defaults for a training config that names it and leaves
    ``loss.agg`` / ``loss.params`` unset (see ``loss_defaults``); without them, the function's own ``agg``
    default and no parameters (so its keyword defaults apply)."""
    if agg is not None and agg not in AGG_MODES:
        raise ValueError(f"register_loss({name!r}): agg={agg!r}; valid: {AGG_MODES}")
    meta = {k: v for k, v in (("agg", agg), ("params", params)) if v is not None}
    return LOSSES.register(name, **meta)


def loss_defaults(name: str) -> dict[str, Any]:
    """{"agg": str, "params": dict}: what a training config that names loss ``name`` gets for an unset
    ``loss.agg`` / ``loss.params``: the ones given to ``register_loss``, else the function's own ``agg`` default
    ("token_mean" when it has none) and {} (its keyword defaults apply). A value the config sets always wins."""
    fn, meta = LOSSES[name], LOSSES.meta(name)
    agg = meta.get("agg")
    if agg is None:
        p = inspect.signature(fn).parameters.get("agg")
        agg = "token_mean" if p is None or p.default is p.empty else p.default
    return {"agg": agg, "params": copy.deepcopy(meta.get("params", {}))}


def compute_policy_loss(
    name: str, logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token_mean", **params
) -> tuple[Tensor, dict[str, Tensor]]:
    """Look up policy loss ``name`` and apply it; shapes, names and parameters are checked first (an unknown name
    raises ``UnknownNameError``, an unknown parameter ``ParameterError``, each listing the valid ones)."""
    fn = LOSSES[name]
    LOSSES.check_params(name, {"agg": agg, **params})
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


# A config naming ppo_clip without parameters gets Flow-GRPO's clip 1e-4 and advantage clip 5 (the default
# algorithm is flow_grpo; reference: yifan123/flow_grpo config/grpo.py); LLM configs set their own (eps 0.2).
@register_loss("ppo_clip", agg="token_mean", params={"eps_low": 1e-4, "adv_clip": 5.0})
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


# GSPO's own defaults (Zheng et al., arXiv 2507.18071, Sec. 5.1: clip 3e-4 / 4e-4; verl's GSPO example:
# seq-mean-token-mean, reference: volcengine/verl examples/gspo_trainer/test_gspo_3b_math.sh)
@register_loss("gspo", agg="seq_mean_token_mean", params={"eps_low": 3e-4, "eps_high": 4e-4})
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


# ----------------------------------------------------------------------------- OREAL, PACS, ETR
def _row(name: str, t: Optional[Tensor], B: int) -> Tensor:
    if t is None:
        raise ValueError(f"{name} is required (a tensor [B] = ({B},)); pass it from the batch")
    if t.dim() != 1 or t.shape[0] != B:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B] = ({B},)")
    return t


# ----------------------------------------------------------------------------- OREAL
def oreal_token_weights(token_logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """OREAL's token-importance weights from a token-level RM (arXiv 2502.06781, ``threshold_rescale``).

    c_t = sigmoid(cumulative mean of the token logits w over the valid actions up to t);
    w+_t = clamp((c_t - 0.5) / 0.5, 0, 1) (for positive samples), w-_t = clamp((0.5 - c_t) / 0.5, 0, 1)
    (for negative samples: the same rule on 1 - c_t). token_logits: float [B, T]; mask: bool [B, T].
    Returns (w_pos, w_neg), float [B, T], 0 off the mask, detached.
    """
    check_shapes(mask, token_logits=token_logits)
    zero = torch.zeros((), device=mask.device)
    w = torch.where(mask, token_logits.detach().float(), zero)
    c = torch.sigmoid(w.cumsum(1) / mask.to(torch.float32).cumsum(1).clamp_min(1))
    wp = torch.where(mask, ((c - 0.5) / 0.5).clamp(0, 1), zero)
    wn = torch.where(mask, ((0.5 - c) / 0.5).clamp(0, 1), zero)
    return wp, wn


def oreal_token_rm_loss(token_logits: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """OREAL's token-level RM objective: mean_i BCE-with-logits(mean_t w_{i,t}, l_i) over rows with a valid action.

    token_logits: float [B, T] (differentiable); mask: bool [B, T]; labels: [B] in {0, 1}. Returns (loss, metrics).
    """
    check_shapes(mask, token_logits=token_logits)
    lab = _row("oreal_token_rm_loss: labels", labels, mask.shape[0]).to(torch.float32)
    n = mask.to(torch.float32).sum(1)
    has = n > 0
    z = torch.where(mask, token_logits.float(), torch.zeros((), device=mask.device)).sum(1) / n.clamp_min(1)
    per = F.binary_cross_entropy_with_logits(z, lab, reduction="none")
    loss = torch.where(has, per, torch.zeros_like(per)).sum() / has.to(torch.float32).sum().clamp_min(1)
    return loss, {"oreal/rm_loss": loss.detach()}


@register_loss("oreal")
def oreal(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token_mean",
    pos_weight: Optional[Tensor] = None, neg_weight: Optional[Tensor] = None, pos_coef: float = 1.0,
    neg_coef: float = 0.5, pos_mult_adv: bool = False, max_len: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """OREAL (Lyu et al., arXiv 2502.06781): behaviour cloning on positives, reshaped policy gradient on negatives.

    Positive actions (A > 0): l+ = -log pi(a) * w+ (* A when ``pos_mult_adv``);
    negative actions (A < 0): l- = -exp(log pi - log pi_old) * A * w-  (>= 0; minimising it lowers pi(a)).
    loss = pos_coef * aggregate(l+, mask & A > 0, agg) + neg_coef * aggregate(l-, mask & A < 0, agg):
    with token_mean each part is divided by its own number of tokens, as OREAL's global positive /
    negative token normalisers. w+ / w- are the token weights (``oreal_token_weights``; default 1).
    Defaults pos_coef = 1, neg_coef = 0.5 (the code's). Actions with A = 0 take no part. OREAL's k3 KL
    term (coef 0.01) goes through the trainer's KL option, not here.
    Metrics: oreal/pos_loss, oreal/neg_loss, oreal/pos_frac, policy/ratio_mean.
    """
    check_shapes(mask, logp=logp, old_logp=old_logp, adv=adv, pos_weight=pos_weight, neg_weight=neg_weight)
    A = adv.detach().float()
    zero = torch.zeros((), device=mask.device)
    pos = mask & (A > 0)
    neg = mask & (A < 0)
    wp = torch.ones_like(A) if pos_weight is None else pos_weight.detach().float()
    wn = torch.ones_like(A) if neg_weight is None else neg_weight.detach().float()
    lp = torch.where(mask, logp.float(), zero)
    log_ratio = torch.where(mask, lp - old_logp.detach().float(), zero)
    ratio = torch.exp(log_ratio)
    l_pos = -lp * wp * (A if pos_mult_adv else 1.0)
    l_neg = -ratio * A * wn
    L_pos = aggregate(l_pos, pos, agg, max_len=max_len)
    L_neg = aggregate(l_neg, neg, agg, max_len=max_len)
    loss = pos_coef * L_pos + neg_coef * L_neg
    metrics = {
        "oreal/pos_loss": L_pos.detach(),
        "oreal/neg_loss": L_neg.detach(),
        "oreal/pos_frac": masked_mean(pos.float(), mask),
        "policy/ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- PACS
@register_loss("pacs")
def pacs(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "seq_mean_token_mean",
    group: Optional[Tensor] = None, labels: Optional[Tensor] = None, beta: float = 1.0, baseline: str = "loo",
    class_balance: bool = False, max_len: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PACS (arXiv 2509.02522): RL as supervised learning of a score, with a BCE loss.

    psi_i = beta * sum_t mask_{i,t} (log pi - log pi_old)_{i,t} (the implicit reward; differentiable);
    within the group: baseline "loo" (default, RLOO): psi^_i = psi_i - (1 / (n_g - 1)) sum_{j != i} psi_j,
    "mean": psi^_i = psi_i - mean_g psi, "none": psi^_i = psi_i; a singleton group uses baseline 0.
    l_i = c_i * BCEWithLogits(psi^_i, y_i), y_i = ``labels`` in {0, 1}; c_i = 1, or with ``class_balance``
    sklearn's 'balanced' weight within the group: n_g / (n_classes_g * n_{g, y_i}).
    l_i is spread over sample i's valid actions and reduced with ``aggregate(agg)``; the default
    seq_mean_token_mean gives mean_i l_i. ``adv`` is not used (the score plays its role; its shape is checked).
    ``group`` long [B] and ``labels`` [B] are required (batch.group, batch.outcome). Defaults beta = 1.
    Metrics: pacs/bce, pacs/score_mean, pacs/acc.
    """
    if baseline not in ("loo", "mean", "none"):
        raise ValueError(f"pacs: baseline={baseline!r}; valid values are ('loo', 'mean', 'none')")
    check_shapes(mask, logp=logp, old_logp=old_logp, adv=adv)
    B = mask.shape[0]
    g = _row("pacs: group", group, B)
    y = _row("pacs: labels", labels, B).to(torch.float32)
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("pacs: labels must be 0 or 1 (binary outcome)")
    zero = torch.zeros((), device=mask.device)
    has = mask.any(dim=1)
    psi = beta * torch.where(mask, logp.float() - old_logp.detach().float(), zero).sum(dim=1)
    inv, G = group_index(g)
    hf = has.to(torch.float32)
    n = torch.zeros(G, device=mask.device).index_add_(0, inv, hf)[inv]
    tot = torch.zeros(G, device=mask.device, dtype=psi.dtype).index_add(0, inv, torch.where(has, psi, zero))[inv]
    if baseline == "loo":
        base = torch.where(n > 1, (tot - psi) / (n - 1).clamp_min(1), zero)
    elif baseline == "mean":
        base = torch.where(n > 1, tot / n.clamp_min(1), zero)
    else:
        base = torch.zeros_like(psi)
    score = psi - base
    per = F.binary_cross_entropy_with_logits(score, y, reduction="none")
    if class_balance:
        n_pos = torch.zeros(G, device=mask.device).index_add_(0, inv, hf * y)[inv]
        n_cls = torch.where(y > 0, n_pos, n - n_pos)
        classes = (n_pos > 0).to(torch.float32) + (n - n_pos > 0).to(torch.float32)
        per = per * (n / (classes * n_cls).clamp_min(1))
    per_tok = torch.where(mask, per[:, None].expand_as(logp), zero)
    loss = aggregate(per_tok, mask, agg, max_len=max_len)
    nh = hf.sum().clamp_min(1)
    metrics = {
        "pacs/bce": (torch.where(has, per, zero).sum() / nh).detach(),
        "pacs/score_mean": (torch.where(has, score, zero).sum() / nh).detach(),
        "pacs/acc": (torch.where(has, ((score > 0) == (y > 0.5)).float(), zero).sum() / nh).detach(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------- ETR
@register_loss("etr")
def etr(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, agg: str = "token_mean",
    eps_low: float = 0.2, eps_high: Optional[float] = None, lam: float = 0.5, kappa: float = 1.0,
    group_var: Optional[Tensor] = None, eps_max: Optional[float] = None, is_weights: Optional[Tensor] = None,
    max_len: Optional[int] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ETR, Elastic Trust Regions (arXiv 2601.03723): PPO clipping with per-sample elastic bounds.

    Micro level: the bounds widen with the advantage's magnitude; macro level: with the group's reward
    variance (tasks in the "learning zone" get a larger update budget):
    s_{i,t} = (1 + lam * |A_{i,t}|) * (1 + kappa * v_i),  eps^lo = eps_low * s,  eps^hi = eps_high * s
    (each capped at ``eps_max`` when given); v_i = ``group_var`` [B] (e.g. 4 p (1 - p) of the group's
    pass rate p, which is 1 at p = 1/2), or 0 when None. Then
    l = max(-A rho, -A clip(rho, 1 - eps^lo, 1 + eps^hi)), rho = exp(logp - old_logp), ``aggregate(l, mask, agg)``.
    Chosen ([sum only]; the paper's formulas were not retrieved): this linear form, lam = 0.5, kappa = 1.
    With lam = 0 and group_var None it is exactly ``ppo_clip``.
    Metrics: policy/clip_frac, approx_kl, ratio_*; etr/eps_low_mean, etr/eps_high_mean.
    """
    check_shapes(mask, logp=logp, old_logp=old_logp, adv=adv, is_weights=is_weights)
    eps_high = eps_low if eps_high is None else eps_high
    A = adv.detach().float()
    scale = 1.0 + lam * A.abs()
    if group_var is not None:
        v = _row("etr: group_var", group_var, mask.shape[0]).detach().float()
        if bool((v < 0).any()):
            raise ValueError("etr: group_var must be >= 0")
        scale = scale * (1.0 + kappa * v)[:, None]
    lo = eps_low * scale
    hi = eps_high * scale
    if eps_max is not None:
        lo = lo.clamp(max=eps_max)
        hi = hi.clamp(max=eps_max)
    lo = lo.clamp(max=1.0)  # a ratio bound 1 - eps below 0 would be meaningless
    zero = torch.zeros((), device=mask.device)
    log_ratio = torch.where(mask, logp.float() - old_logp.detach().float(), zero)
    ratio = torch.exp(log_ratio)
    l1 = -A * ratio
    l2 = -A * torch.minimum(torch.maximum(ratio, 1.0 - lo), 1.0 + hi)
    loss = torch.maximum(l1, l2)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    metrics = _ratio_metrics(log_ratio.detach(), mask, (l2 > l1).detach())
    metrics["etr/eps_low_mean"] = masked_mean(lo, mask)
    metrics["etr/eps_high_mean"] = masked_mean(hi, mask)
    return aggregate(loss, mask, agg, max_len=max_len), metrics
