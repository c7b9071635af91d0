"""Diversity of a group's samples in a feature space: the primitives that the evaluation metrics and the
diversity bonuses share.

Samples are rows of ``features`` float [B, D] (pixels, a judge's or CLIP's embedding); ``group`` long [B] says which
prompt each came from. Every function works on all groups at once (one [B, B] distance matrix masked to pairs of
one group), with no Python loop over samples or groups, and runs unchanged on CUDA.

- :func:`pairwise_distances`: d_ij = ||f_i - f_j||_2 and the mask of pairs (i != j, same group);
- :func:`mean_pairwise_distance`: per sample, D_i = mean_{j in g(i), j != i} d_ij (0 for a group of one);
- :func:`group_mean_pairwise_distance`: per group, the mean over its ordered pairs (NaN for a group of one);
- :func:`vendi_score`: per group, the Vendi score exp(-sum_k lambda_k log lambda_k) of the eigenvalues of K / n,
  K_ij = k(f_i, f_j) a similarity with k(f, f) = 1 (Friedman & Dieng, 2023, "The Vendi Score").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["group_positions", "pairwise_distances", "mean_pairwise_distance", "group_mean_pairwise_distance", "vendi_score",
           "group_index"]


def _check(features: Tensor, group: Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be float [B, D]; got shape {tuple(features.shape)}")
    if group.shape != features.shape[:1]:
        raise ValueError(f"group must be long [B] with B = {features.shape[0]}; got shape {tuple(group.shape)}")


def group_index(group: Tensor) -> tuple[Tensor, int]:
    """(dense group index long [B] in 0..G-1, G) for arbitrary group ids."""
    uniq, inv = torch.unique(group, return_inverse=True)
    return inv, int(uniq.numel())


def _cdist(f: Tensor) -> Tensor:
    """||f_i - f_j||_2 float [B, B] from the differences, memory O(B^2)."""
    return torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")


def group_positions(gi: Tensor, G: int) -> tuple[Tensor, Tensor]:
    """(size of each group long [G], position of each sample inside its group long [B]) for dense group indices
    ``gi`` in 0..G-1: a sample's position is its rank among its group's samples in batch order, so sample b sits at
    row ``pos[b]`` of its group's block when groups are padded to the largest one."""
    n = torch.bincount(gi, minlength=G)
    order = torch.argsort(gi, stable=True)
    starts = torch.cumsum(n, 0) - n
    pos = torch.empty_like(gi)
    pos[order] = torch.arange(len(gi), device=gi.device) - starts[gi[order]]
    return n, pos


def pairwise_distances(features: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """(d float [B, B], pairs bool [B, B]): Euclidean distances between all rows and the mask of ordered pairs
    (i, j) with i != j in one group. Computed from differences, not from the Gram matrix, so that identical
    samples have distance exactly 0 (``cdist`` without its matrix-product path: no [B, B, D] tensor either, which
    for image-sized D would not fit in memory)."""
    _check(features, group)
    d = _cdist(features.float())
    same = group[:, None] == group[None, :]
    pairs = same & ~torch.eye(len(group), dtype=torch.bool, device=group.device)
    return d, pairs


def mean_pairwise_distance(features: Tensor, group: Tensor) -> Tensor:
    """D_i = mean_{j in g(i), j != i} ||f_i - f_j||: float [B], 0 for a sample alone in its group."""
    d, pairs = pairwise_distances(features, group)
    cnt = pairs.sum(1)
    return (d * pairs).sum(1) / cnt.clamp_min(1)


def group_mean_pairwise_distance(features: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """(per-group mean distance over its ordered pairs float [G], group ids [G]) in the order of
    ``torch.unique(group)``; NaN for a group of one sample (no pair: nothing measured)."""
    d, pairs = pairwise_distances(features, group)
    gi, G = group_index(group)
    s = torch.zeros(G, device=d.device, dtype=d.dtype).index_add_(0, gi, (d * pairs).sum(1))
    n = torch.zeros(G, device=d.device, dtype=d.dtype).index_add_(0, gi, pairs.sum(1).to(d.dtype))
    out = torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, float("nan")))
    return out, torch.unique(group)


def vendi_score(features: Tensor, group: Tensor, *, kernel: str = "cosine", center: bool = False,
                bandwidth: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(Vendi score per group float [G], group ids [G]), in the order of ``torch.unique(group)``.

    VS = exp(-sum_k lambda_k log lambda_k), lambda the eigenvalues of K / n for the n samples of the group, with
    K_ij = cos(f_i, f_j) (``kernel="cosine"``; with ``center`` on features centred over the whole batch, so that a
    shared offset such as a black background does not make all images look alike) or exp(-||f_i - f_j||^2 / (2 h^2))
    (``kernel="rbf"``, h = ``bandwidth``, default the median pairwise distance of the batch). VS is 1 when all
    samples are identical and n when they are orthogonal (the "effective number of distinct samples").
    Groups are padded to the largest one with zero rows and columns, whose eigenvalues are 0 and add nothing,
    so all groups go through one batched ``eigvalsh``.
    """
    _check(features, group)
    f = features.float()
    gi, G = group_index(group)
    if kernel == "cosine":
        c = f - f.mean(0, keepdim=True) if center else f
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
        K = c @ c.T
        K.fill_diagonal_(1.0)  # k(f, f) = 1 by definition, also for a zero row
    elif kernel == "rbf":
        d = _cdist(f)
        d2 = d.pow(2)
        h = bandwidth if bandwidth is not None else float(d[~torch.eye(len(f), dtype=torch.bool,
                                                                       device=f.device)].median())
        K = torch.exp(-d2 / (2.0 * max(h, 1e-12) ** 2))
    else:
        raise ValueError(f"vendi_score: kernel={kernel!r}; valid: ['cosine', 'rbf']")
    n, pos = group_positions(gi, G)
    m = int(n.max())
    Kg = torch.zeros(G, m, m, device=K.device, dtype=K.dtype)
    rows = gi[:, None].expand(-1, len(gi))
    same = gi[:, None] == gi[None, :]
    Kg[rows[same], pos[:, None].expand(-1, len(gi))[same], pos[None, :].expand(len(gi), -1)[same]] = K[same]
    lam = torch.linalg.eigvalsh(Kg / n.to(K.dtype)[:, None, None]).clamp_min(0)
    ent = -(lam * torch.log(lam.clamp_min(1e-30))).sum(-1)
    return torch.exp(ent), torch.unique(group)
