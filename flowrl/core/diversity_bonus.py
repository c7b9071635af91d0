"""Diversity bonuses: a per-sample reward for being different from the other samples of its prompt's group.

GRPO-style training pushes every group toward its best-rewarded mode, and the samples of one prompt collapse
onto a few drawings. A diversity bonus is added to the outcome reward before the advantages, so that within a
group a sample that is far from the others is preferred at equal reward. Every bonus is a pure function

    bonus(features float [B, D], group long [B], reward float [B], **params) -> float [B]

registered by name in :data:`DIVERSITY_BONUSES` and scaled by a weight in the config (``flow.diversity_bonus``,
a list, so several combine by summation). ``features`` are the samples in a feature space
(``flowrl.rewards.features``: pixels, CLIP embeddings). No Python loop over samples or groups.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .diversity import group_index, group_positions, mean_pairwise_distance, pairwise_distances
from .groups import group_stats
from .registry import Registry

__all__ = ["DIVERSITY_BONUSES", "register_bonus", "diversity_bonus", "pairwise_bonus", "cluster_size_bonus",
           "drift_potential_bonus", "pad_groups"]

DIVERSITY_BONUSES = Registry("diversity bonus", skip=3)


def register_bonus(name: str, **meta):
    """Decorator: a diversity bonus ``fn(features, group, reward, **params) -> float [B]``."""
    return DIVERSITY_BONUSES.register(name, **meta)


def diversity_bonus(name: str, features: Tensor, group: Tensor, reward: Tensor, **params) -> Tensor:
    """The bonus registered as ``name`` (parameters checked against its signature), float [B]."""
    DIVERSITY_BONUSES.check_params(name, params)
    out = DIVERSITY_BONUSES[name](features, group, reward, **params)
    if out.shape != group.shape:
        raise ValueError(f"diversity bonus {name!r} returned shape {tuple(out.shape)}; expected {tuple(group.shape)}")
    return out


def _group_mean(x: Tensor, group: Tensor) -> Tensor:
    """mean_{j in g(i)} x_j, float [B]: the core's group statistics, on this process only (a bonus compares the
    samples of a group, which the flow task keeps on one process)."""
    return group_stats(x, group, distributed=False).mean.to(x.dtype)


@register_bonus("pairwise")
def pairwise_bonus(features: Tensor, group: Tensor, reward: Tensor, *, normalize: str = "group",
                   reward_gate: bool = False, eps: float = 1e-8) -> Tensor:
    """Pairwise-distance bonus: b_i = g_i D_i / s, D_i = mean_{j in g(i), j != i} ||f_i - f_j||_2.

    ``reward_gate``: g_i = r_i (the sample's outcome reward, which should lie in [0, 1]), so that only samples that
    are both good and different earn the bonus (a poor sample is far from the others too, and an ungated bonus
    rewards it for that); otherwise g_i = 1.

    ``normalize``: "group" (s = mean_{j in g(i)} D_j + eps: b has mean 1 in every group, so the bonus ranks samples
    inside a group whatever the group's spread), "batch" (s = the batch's mean D + eps: a group whose samples are
    all alike gets a small bonus everywhere), or "none" (s = 1). Under GRPO's group standardisation only the
    within-group differences of b matter. A sample alone in its group gets 0. ``reward`` is not used.
    features float [B, D], group long [B] -> float [B].
    """
    D = mean_pairwise_distance(features, group)
    if normalize == "group":
        s = _group_mean(D, group) + eps
    elif normalize == "batch":
        s = D.mean() + eps
    elif normalize == "none":
        s = torch.ones_like(D)
    else:
        raise ValueError(f"pairwise bonus: normalize={normalize!r}; valid: ['group', 'batch', 'none']")
    gate = reward.to(D.dtype) if reward_gate else torch.ones_like(D)
    return gate * D / s


# ---------------------------------------------------------------------------------------------------------------
# Groups padded to the largest one, so that per-group linear algebra runs as one batched call.

def pad_groups(features: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(F float [G, m, D], valid bool [G, m], gi long [B], pos long [B]): the samples of each group as the rows
    of one padded block (m = the largest group; padding rows are 0 and ``valid`` False), with sample b at
    ``F[gi[b], pos[b]]`` (``pos``: its rank among its group's samples in batch order)."""
    gi, G = group_index(group)
    n, pos = group_positions(gi, G)
    m = int(n.max())
    F = features.new_zeros(G, m, features.shape[1])
    F[gi, pos] = features
    valid = torch.zeros(G, m, dtype=torch.bool, device=features.device)
    valid[gi, pos] = True
    return F, valid, gi, pos


def _group_rbf(F: Tensor, valid: Tensor, bandwidth: Optional[float]) -> tuple[Tensor, Tensor]:
    """(K float [G, m, m], d float [G, m, m]): K_ij = exp(-d_ij^2 / (2 h_g^2)) between the valid rows of each
    padded group, 0 where either row is padding; h_g = ``bandwidth`` or the (lower) median of the group's
    pairwise distances d_ij, i != j (a group of identical samples: every K_ij = 1)."""
    # from the differences (identical samples exactly 0) without a [G, m, m, D] tensor (image-sized D)
    d = torch.cdist(F, F, compute_mode="donot_use_mm_for_euclid_dist")
    m = F.shape[1]
    both = valid[:, :, None] & valid[:, None, :]
    if bandwidth is None:
        pairs = both & ~torch.eye(m, dtype=torch.bool, device=F.device)
        h = torch.nanmedian(torch.where(pairs, d, torch.full_like(d, float("nan"))).flatten(1), dim=1).values
        h = torch.nan_to_num(h, nan=1.0)  # a group of one has no pair; its K is [[1]] whatever h is
    else:
        if not bandwidth > 0:
            raise ValueError(f"bandwidth={bandwidth!r}: must be > 0 (or null: the group's median distance)")
        h = torch.full(F.shape[:1], float(bandwidth), device=F.device, dtype=F.dtype)
    h = h.clamp_min(1e-12)[:, None, None]
    K = torch.exp(-d.pow(2) / (2.0 * h * h)) * both
    return K, d


@register_bonus("cluster_size")
def cluster_size_bonus(features: Tensor, group: Tensor, reward: Tensor, *, k: int = 0, min_k: int = 2,
                       max_k: int = 0, alpha: float = 1.0, normalize: str = "group", bandwidth: Optional[float] = None,
                       iters: int = 20) -> Tensor:
    """DiverseGRPO's distribution-level exploration bonus (Liu et al., 2025, "DiverseGRPO: Mitigating Mode Collapse
    in Image Generation via Diversity-Aware GRPO", CVPR 2026): the samples of one prompt are grouped by spectral
    clustering in feature space, and each sample is rewarded inversely to the size of its cluster, so that a
    sample in a rare mode outweighs one more copy of the common mode.

        b_i = (n_g / |C(i)|)^alpha                      (``normalize="none"``; 1 for a group in one cluster)
        b_i = |C(i)|^-alpha / mean_{j in g(i)} |C(j)|^-alpha   (``normalize="group"``, the default: mean 1 per group)

    n_g the group's size, C(i) the cluster of sample i. The paper publishes the idea (spectral clustering of the
    samples of one caption, exploration reward inversely proportional to the cluster size) but not the details;
    flowrl's choices, each tested:

    - affinity A_ij = exp(-||f_i - f_j||^2 / (2 h^2)), h the group's (lower) median pairwise distance (or
      ``bandwidth``), with A_ii = 1 (a self-loop: every degree >= 1, so a far-away sample is its own component
      instead of a division by zero);
    - normalised Laplacian L = I - D^-1/2 A D^-1/2 (Ng, Jordan & Weiss, 2001), eigenvalues ascending;
    - number of clusters: ``k`` when > 0 (at most n_g), else the eigengap heuristic k_g = argmax_j
      (lambda_{j+1} - lambda_j) over ``min_k`` <= j < n_g, j at most ``max_k`` when > 0 (a group of min_k or
      fewer samples is one cluster). ``min_k`` is 2 by default: on the digits model's samples the plain heuristic
      (min_k = 1) calls every group one cluster (a dense affinity graph has its largest gap after lambda_1 = 0),
      which makes the bonus a constant. A group with no gap at all past lambda_1 (all pairs equally far apart,
      e.g. identical samples) and a group of identical samples (also with a fixed ``k``) are one cluster: their
      eigenvectors past the first span one degenerate space, and any split of it would be arbitrary;
    - embedding: the k_g first eigenvectors, rows normalised to unit length (NJW);
    - k-means on the embedding, ``iters`` Lloyd iterations (a fixed-count loop, the only one besides the
      k_g-count loop of the initialisation), initialised deterministically by farthest points: the first centre
      is the sample farthest from the group's mean embedding, each next one the sample farthest from the chosen
      centres (no random draw, and the same partition whatever the order of the samples, up to exact ties);
      an emptied cluster keeps its centre.

    All groups at once: padded to the largest group (padding rows get Laplacian eigenvalue 3 > 2, above every real
    one), one batched ``eigh``, batched k-means; no loop over groups or samples. A group of one gets b = 1.
    ``reward`` is not used. features float [B, D], group long [B] -> float [B].
    """
    if normalize not in ("group", "none"):
        raise ValueError(f"cluster_size bonus: normalize={normalize!r}; valid: ['group', 'none']")
    if not (isinstance(k, int) and k >= 0 and isinstance(max_k, int) and max_k >= 0):
        raise ValueError(f"cluster_size bonus: k={k!r}, max_k={max_k!r}: must be ints >= 0 (0: eigengap / no cap)")
    if not (isinstance(min_k, int) and min_k >= 1):
        raise ValueError(f"cluster_size bonus: min_k={min_k!r}: must be an int >= 1")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"cluster_size bonus: iters={iters!r}: must be an int >= 1")
    F, valid, gi, pos = pad_groups(features.double(), group)
    G, m = valid.shape
    n = valid.sum(1)
    A, D = _group_rbf(F, valid, bandwidth)
    deg = A.sum(-1).clamp_min(1.0)  # padding rows: 0 -> 1 (their row of A is 0)
    dm = deg.rsqrt()
    eye = torch.eye(m, dtype=A.dtype, device=A.device)
    L = eye - dm[:, :, None] * A * dm[:, None, :]
    L = L + torch.diag_embed((~valid).to(A.dtype) * 2.0)  # padding: eigenvalue 3, sorted after the real ones
    lam, U = torch.linalg.eigh(L)
    j = torch.arange(m, device=A.device)
    if k > 0:
        kg = torch.minimum(torch.full_like(n, k), n)
    else:
        gap = lam[:, 1:] - lam[:, :-1]  # gap[:, j] = lambda_{j+2} - lambda_{j+1} (1-based): k = j + 1
        top = n - 1 if max_k == 0 else torch.minimum(n - 1, torch.full_like(n, max_k))
        ok = (j[None, :-1] < top[:, None]) & (j[None, :-1] >= min_k - 1)
        masked = torch.where(ok, gap, torch.full_like(gap, -1.0))
        kg = masked.argmax(1) + 1 if m > 1 else torch.ones_like(n)
        # no candidate, or no gap at all (every pair equally far apart, e.g. identical samples): the eigenvectors
        # past lambda_1 span one degenerate space, any split of it would be arbitrary, so one cluster
        kg = torch.where(masked.max(1).values > 1e-9, kg, torch.ones_like(n)) if m > 1 else kg
    kg = torch.where(D.flatten(1).amax(1) > 0, kg, torch.ones_like(n))  # identical samples: one cluster, even for k
    Kmax = int(kg.max())
    col = j[None, None, :Kmax] < kg[:, None, None]
    E = U[:, :, :Kmax] * col
    E = E / E.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    E = E * valid[:, :, None]
    # farthest-point initialisation: a loop over the (at most Kmax) centres, each step batched over groups
    far = torch.where(valid, (E - (E.sum(1, keepdim=True) / n[:, None, None])).pow(2).sum(-1),
                      torch.full((G, m), -1.0, dtype=E.dtype, device=E.device))
    first = far.argmax(1)
    C = E[torch.arange(G, device=E.device), first][:, None, :]
    nearest = (E - C).pow(2).sum(-1)
    for _ in range(1, Kmax):
        nxt = torch.where(valid, nearest, torch.full_like(nearest, -1.0)).argmax(1)
        c = E[torch.arange(G, device=E.device), nxt][:, None, :]
        C = torch.cat([C, c], 1)
        nearest = torch.minimum(nearest, (E - c).pow(2).sum(-1))
    live = j[None, :Kmax] < kg[:, None]  # centres beyond a group's own k_g take no samples
    for _ in range(iters):  # Lloyd iterations: a fixed count
        dist = (E[:, :, None, :] - C[:, None, :, :]).pow(2).sum(-1)
        assign = torch.where(live[:, None, :], dist, torch.full_like(dist, float("inf"))).argmin(-1)
        onehot = torch.nn.functional.one_hot(assign, Kmax).to(E.dtype) * valid[:, :, None]
        cnt = onehot.sum(1)
        newC = onehot.transpose(1, 2) @ E / cnt.clamp_min(1)[:, :, None]
        C = torch.where(cnt[:, :, None] > 0, newC, C)
    dist = (E[:, :, None, :] - C[:, None, :, :]).pow(2).sum(-1)
    assign = torch.where(live[:, None, :], dist, torch.full_like(dist, float("inf"))).argmin(-1)
    cnt = (torch.nn.functional.one_hot(assign, Kmax).to(E.dtype) * valid[:, :, None]).sum(1)
    size = cnt.gather(1, assign)[gi, pos]  # |C(i)| per sample, float [B]
    ng = n.to(size.dtype)[gi]
    if normalize == "none":
        out = (ng / size).pow(alpha)
    else:
        inv = size.pow(-alpha)
        out = inv / _group_mean(inv, group)
    return out.to(features.dtype if features.is_floating_point() else torch.float32)


@register_bonus("drift_potential")
def drift_potential_bonus(features: Tensor, group: Tensor, reward: Tensor, *, potential: str = "mean_distance",
                          gamma: float = 1.0, normalize: str = "group", bandwidth: Optional[float] = None,
                          ridge: float = 1e-2, eps: float = 1e-8) -> Tensor:
    """DRIFT's potential-based intra-group diversity shaping (Liu et al., 2026, "Beyond the Dirac Delta: Mitigating
    Diversity Collapse in Reinforcement Fine-Tuning for Versatile Image Generation", ICML): a shaping term
    F = gamma * Phi(s') - Phi(s) (Ng, Harada & Russell, 1999) whose potential Phi measures the diversity of a group.

    The paper's abstract names the mechanism, not its formula; flowrl's choice: the state is the set of a
    group's samples, and sample i is the step from s = S \\ {i} to s' = S (the group without and with it), so

        F_i = gamma * Phi(S) - Phi(S \\ {i})        (with gamma = 1: i's marginal contribution to the diversity)

    with the potential ``potential``:

    - "mean_distance" (default): Phi(S) = mean over ordered pairs i != j in S of ||f_i - f_j||_2 (0 for fewer than
      two samples); in closed form Phi(S) = T / (n (n-1)), Phi(S \\ {i}) = (T - 2 r_i) / ((n-1)(n-2)),
      T = sum_{i != j} d_ij, r_i = sum_j d_ij. With gamma = 1 the F_i of a group sum to 0 exactly.
    - "logdet": Phi(S) = log det(K_S + ridge I), K the RBF kernel of the group (bandwidth: the group's median
      distance, or ``bandwidth``): the log-volume of a determinantal point process, submodular, so a near-copy of
      another sample adds almost nothing. By the Schur complement Phi(S) - Phi(S \\ {i}) = -log((K + ridge I)^-1)_ii.

    Why marginal contributions: a sample that sits on top of the others lowers Phi when added (F < 0), one in an
    empty region raises it (F > 0), whatever the group's overall spread; and the leave-one-out form needs no order
    of the samples. ``normalize``: "group" (F / (mean_{j in g(i)} |F_j| + eps), scale-free), "batch"
    (F / (mean |F| over the batch + eps)) or "none". A group of one gets 0. ``reward`` is not used.
    features float [B, D], group long [B] -> float [B].
    """
    if normalize not in ("group", "batch", "none"):
        raise ValueError(f"drift_potential bonus: normalize={normalize!r}; valid: ['group', 'batch', 'none']")
    gi, G = group_index(group)
    n = torch.bincount(gi, minlength=G).double()
    if potential == "mean_distance":
        d, pairs = pairwise_distances(features, group)
        r = (d * pairs).sum(1)
        T = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, gi, r)
        phi_s = torch.where(n >= 2, T / (n * (n - 1)).clamp_min(1), torch.zeros_like(T))
        ni = n[gi]
        phi_minus = torch.where(ni >= 3, (T[gi] - 2 * r) / ((ni - 1) * (ni - 2)).clamp_min(1), torch.zeros_like(r))
        out = gamma * phi_s[gi] - phi_minus
    elif potential == "logdet":
        if not ridge > 0:
            raise ValueError(f"drift_potential bonus: ridge={ridge!r}: must be > 0 (K + ridge I must be invertible)")
        F, valid, gi, pos = pad_groups(features.double(), group)
        K, _ = _group_rbf(F, valid, bandwidth)
        m = valid.shape[1]
        eye = torch.eye(m, dtype=K.dtype, device=K.device)
        # padding: identity rows and columns, which add log 1 = 0 to the log-determinant
        Kr = K + ridge * eye * valid[:, :, None] + torch.diag_embed((~valid).to(K.dtype))
        phi_s = torch.linalg.slogdet(Kr).logabsdet
        inv_diag = torch.diagonal(torch.linalg.inv(Kr), dim1=-2, dim2=-1)[gi, pos]
        marginal = -torch.log(inv_diag)  # Phi(S) - Phi(S \ {i})
        out = (gamma - 1.0) * phi_s[gi] + marginal
        out = torch.where(n[gi] >= 2, out, torch.zeros_like(out))  # a group of one: nothing to be diverse from
    else:
        raise ValueError(f"drift_potential bonus: potential={potential!r}; valid: ['mean_distance', 'logdet']")
    if normalize == "group":
        out = out / (_group_mean(out.abs(), group) + eps)
    elif normalize == "batch":
        out = out / (out.abs().mean() + eps)
    return out.to(features.dtype if features.is_floating_point() else torch.float32)
