"""Policy losses of the seed papers: OREAL, PACS and ETR, registered in ``losses.LOSSES``.

Same contract as ``losses.ppo_clip``: ``fn(logp, old_logp, adv, mask, *, agg=..., **params) -> (loss, metrics)``,
every tensor float [B, T] (``mask`` bool [B, T]), aggregation through ``losses.aggregate`` (exact
across ranks), metrics 0-dim tensors with namespaced keys. Per-sample inputs some losses need (group
ids, binary labels, group reward variance) are keyword tensors that the trainer passes from the batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .groups import group_index
from .losses import _ratio_metrics, aggregate, check_shapes, masked_mean, register_loss

__all__ = ["oreal", "pacs", "etr", "oreal_token_weights", "oreal_token_rm_loss"]


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
