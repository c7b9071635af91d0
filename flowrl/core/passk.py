"""pass@k: the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code", Codex)
and the ratio of binomial coefficients it (and the pass@k advantage) is built from.

From n samples of a problem of which c are correct, the chance that a random k-subset holds a correct one is

    pass@k = 1 - C(n - c, k) / C(n, k),

an unbiased estimate of 1 - (1 - p)^k. The ratio is computed as the product
C(a, k) / C(b, k) = prod_{j = a + 1}^{b} (1 - k / j) (a <= b), the Codex paper's numerically stable form: no
factorial is ever formed, and a factor is exactly 0 when j = k, so C(a, k) = 0 for a < k comes out as 0.
Vectorised over problems with a [P, max b] grid of factors (no loop over problems).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["binom_ratio", "pass_at_k"]


def binom_ratio(a: Tensor, b: Tensor, k: Tensor | int) -> Tensor:
    """C(a, k) / C(b, k) for integers 0 <= a <= b and 0 <= k <= b, elementwise: prod_{j=a+1}^{b} (1 - k / j).

    a, b: long [P]; k: an int or long [P]. Returns float64 [P] (1 where a = b or k = 0; 0 where a < k <= b).
    """
    a = torch.as_tensor(a).long()
    b = torch.as_tensor(b, device=a.device).long()
    k = torch.as_tensor(k, device=a.device).long().expand_as(a)
    if a.shape != b.shape:
        raise ValueError(f"binom_ratio: a has shape {tuple(a.shape)}, b {tuple(b.shape)}; expected the same")
    if bool(((a < 0) | (a > b) | (k < 0) | (k > b)).any()):
        raise ValueError("binom_ratio: needs 0 <= a <= b and 0 <= k <= b elementwise (C(b, k) must be > 0)")
    width = int(b.max()) if b.numel() else 0
    j = torch.arange(1, width + 1, device=a.device, dtype=torch.float64)  # [W]
    inside = (j > a[..., None]) & (j <= b[..., None])  # [P, W]
    factor = torch.where(inside, 1.0 - k[..., None].to(torch.float64) / j, torch.ones((), dtype=torch.float64,
                                                                                         device=a.device))
    return factor.prod(dim=-1)


def pass_at_k(n: Tensor, c: Tensor, k: int) -> Tensor:
    """Unbiased pass@k of each problem from ``n`` samples with ``c`` correct: 1 - C(n - c, k) / C(n, k).

    n, c: long [P] with 0 <= c <= n and k <= n (an estimate needs at least k samples). Returns float64 [P];
    the mean over problems is the benchmark's pass@k.
    """
    n, c = torch.as_tensor(n).long(), torch.as_tensor(c).long()
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"pass_at_k: k={k!r}; must be an int >= 1")
    if bool(((c < 0) | (c > n)).any()):
        raise ValueError("pass_at_k: needs 0 <= c <= n for every problem")
    if bool((n < k).any()):
        raise ValueError(f"pass_at_k: k={k} exceeds the number of samples of some problem (min n = {int(n.min())}); "
                         f"draw at least k samples per problem")
    return 1.0 - binom_ratio(n - c, n, k)
