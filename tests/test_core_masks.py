"""The fast mask reductions (flowrl/core/masks.py) and the matrix-product discounted scan against plain loops."""
from __future__ import annotations

import pytest
import torch

import reference

from flowrl.core.kernels.scan import discounted_suffix_sum, masked_discounted_scan
from flowrl.core.masks import first_valid_index, last_valid_index, row_counts, run_layout, zero_off_mask_

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path


def _loop_reference(mask: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    counts, firsts, lasts = [], [], []
    for row in mask.tolist():
        idx = [t for t, v in enumerate(row) if v]
        counts.append(len(idx))
        firsts.append(idx[0] if idx else -1)
        lasts.append(idx[-1] if idx else -1)
    return counts, firsts, lasts


# T = 8, 16, 64: the int64-word path; 13: the plain path (T not a multiple of 8); 2048 and 4104: more than
# 255 words, so the word sums run in blocks (a byte lane must not overflow).
@pytest.mark.parametrize("T", [1, 8, 13, 16, 64, 2048, 4104])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
def test_mask_reductions_match_loops(T, p):
    g = torch.Generator().manual_seed(T)
    mask = torch.rand(9, T, generator=g) < p
    mask[0] = False
    mask[1, -1] = True  # the last byte of the last word
    mask[2, 0] = True  # the first byte of the first word
    for m in (mask, mask[1:], mask[:, : T - 1 if T > 1 else T], mask.t().contiguous().t()):
        counts, firsts, lasts = _loop_reference(m)
        assert row_counts(m).tolist() == counts
        assert first_valid_index(m).tolist() == firsts
        assert last_valid_index(m).tolist() == lasts
        assert (not run_layout(m)[0]) == any(c > 0 and l - f + 1 != c for c, f, l in zip(counts, firsts, lasts))


def test_mask_reductions_by_hand():
    m = torch.zeros(3, 16, dtype=torch.bool)
    m[0, 3:12] = True  # one run across the word boundary at 8
    m[1, [0, 15]] = True  # a hole
    assert row_counts(m).tolist() == [9, 2, 0]
    assert first_valid_index(m).tolist() == [3, 0, -1]
    assert last_valid_index(m).tolist() == [11, 15, -1]
    assert not run_layout(m)[0] and run_layout(m[[0, 2]])[0]
    x = torch.arange(48.0).view(3, 16)
    assert zero_off_mask_(x, m) is x and x[0].tolist() == [0.0] * 3 + [float(i) for i in range(3, 12)] + [0.0] * 4


@pytest.mark.parametrize("c", [0.0, 0.01, 0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("T", [1, 5, 32, 70, 1030])
def test_discounted_suffix_sum_matches_the_recurrence(c, T):
    """y_t = x_t + c * y_{t+1} over every position, including small c (where powers underflow: no division)."""
    g = torch.Generator().manual_seed(T)
    x = torch.randn(4, T, generator=g)
    ref = torch.zeros(4, T, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.float64)
    for t in range(T - 1, -1, -1):
        y = x[:, t].double() + c * y
        ref[:, t] = y
    got = discounted_suffix_sum(x, c)
    assert got.dtype == torch.float32 and got.shape == x.shape
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=1e-5)
    torch.testing.assert_close(discounted_suffix_sum(x, c, scale=-2.0).double(), -2 * ref, atol=2 * tol, rtol=1e-5)


@pytest.mark.parametrize("layout", ["right", "left", "full"])
def test_masked_discounted_scan_without_holes_matches_the_recurrence(layout):
    """The no-holes path (matrix products) equals the recurrence on right- and left-padded rows."""
    g = torch.Generator().manual_seed(3)
    B, T = 6, 75
    x = torch.randn(B, T, generator=g)
    lengths = torch.tensor([0, 1, 31, 32, 33, 75])
    pos = torch.arange(T)[None, :]
    mask = {"right": pos < lengths[:, None], "left": pos >= T - lengths[:, None],
            "full": torch.ones(B, T, dtype=torch.bool)}[layout]
    assert run_layout(mask)[0]
    for c in (0.5, 0.95, 1.0):
        torch.testing.assert_close(masked_discounted_scan(x, mask, c), reference.discounted_scan(x, mask, c),
                                   atol=1e-5, rtol=1e-5)


def test_step_sums_fused_and_plain_agree_with_a_loop():
    """EMPG's per-step counts and sums: the one-scatter (complex) path, the two-scatter path and a loop."""
    from flowrl.core.kernels.rows import step_sums

    g = torch.Generator().manual_seed(5)
    B, T, S = 6, 29, 4
    step = torch.randint(0, S, (B, T), generator=g).sort(dim=1).values
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False
    values = torch.randn(B, T, generator=g)
    values[~mask] = float("nan")  # off-mask values must not leak in
    cnt_ref, tot_ref = torch.zeros(B, S), torch.zeros(B, S)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                cnt_ref[b, step[b, t]] += 1
                tot_ref[b, step[b, t]] += float(values[b, t])
    for fused in (True, False):
        cnt, tot = step_sums(step, mask, values, S, fused=fused)
        torch.testing.assert_close(cnt, cnt_ref)
        torch.testing.assert_close(tot, tot_ref, atol=1e-5, rtol=1e-5)


def test_compact_and_expand_by_hand():
    """compaction moves each row's valid actions to its front, in order; expand is its inverse on valid actions."""
    from flowrl.core.kernels.scan import compact, compaction_index, expand

    mask = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.tensor([[9.0, 1.0, 9.0, 2.0, 3.0], [4.0, 9.0, 9.0, 9.0, 9.0], [9.0] * 5])
    idx = compaction_index(mask)
    assert idx.tolist() == [[5, 0, 5, 1, 2], [0, 5, 5, 5, 5], [5] * 5]
    c = compact(x, idx)
    assert c.tolist() == [[1.0, 2.0, 3.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5]
    assert expand(c * 10, idx).tolist() == [[0.0, 10.0, 0.0, 20.0, 30.0], [40.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5]
