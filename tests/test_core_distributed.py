"""Two ranks (gloo on CPU) hold one batch split unevenly, with groups straddling them: advantages and
aggregated losses must equal the single-process values on the whole batch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reference as ref
from flowrl.core import AGG_MODES, aggregate, compute_advantages, compute_policy_loss

pytestmark = pytest.mark.usefixtures("core_path")  # each test on the native kernels and on the torch path

SPLIT = 17  # rank 0 holds rows [0, 17), rank 1 the other 29: unequal local sizes
EST_CASES = [
    ("grpo", {}), ("grpo", {"scale": "batch"}), ("grpo", {"scale": "none"}), ("dr_grpo", {}), ("rloo", {}),
    ("reinforce_pp", {"kl_coef": 0.1}), ("reinforce_pp", {"gamma": 0.9}), ("reinforce_pp_baseline", {}),
    ("gae", {"gamma": 0.9, "lam": 0.8}), ("stepwise_grpo", {}), ("gdpo", {"weights": {"acc": 2.0}}),
]


def _full_batch():
    # every rank builds the same batch from the same seed, then keeps its rows
    b = ref.make_batch(torch.Generator().manual_seed(7), sizes=(1, 2, 3, 5, 7, 8, 4, 16), T=9, invalid_frac=0.1,
                       invalid_mask_rows=True)
    g = torch.Generator().manual_seed(8)
    logp = b.old_logp + 0.5 * torch.randn(b.mask.shape, generator=g)
    loss_adv = torch.randn(b.mask.shape, generator=g)
    return b, logp, loss_adv


def _rows(rank: int) -> slice:
    return slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)


def _results(b, logp, loss_adv, rows) -> dict[str, torch.Tensor]:
    """Advantages of every case, per-mode aggregate and ppo_clip losses, and ppo_clip's gradient."""
    local = b.select(torch.arange(b.batch_size)[rows])
    out = {}
    for k, (name, params) in enumerate(EST_CASES):
        out[f"adv{k}"] = compute_advantages(name, local, **params)
    lp, adv, mask = logp[rows], loss_adv[rows], local.mask
    for mode in AGG_MODES:
        out[f"agg_{mode}"] = aggregate(adv, mask, mode).detach()
        x = lp.clone().requires_grad_(True)
        loss, _ = compute_policy_loss("ppo_clip", x, local.old_logp, adv, mask, agg=mode, dual_clip=3.0)
        loss.backward()
        out[f"ppo_{mode}"] = loss.detach()
        out[f"grad_{mode}"] = x.grad
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        b, logp, loss_adv = _full_batch()
        res = _results(b, logp, loss_adv, _rows(rank))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    b, logp, loss_adv = _full_batch()
    g0, g1 = set(b.group[:SPLIT].tolist()), set(b.group[SPLIT:].tolist())
    assert len(g0 & g1) >= 3, "the split must put groups on both ranks"
    assert b.sample_valid is not None and not bool(b.sample_valid.all())

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _results(b, logp, loss_adv, slice(None))

    for k, (name, params) in enumerate(EST_CASES):
        got = torch.cat([parts[0][f"adv{k}"], parts[1][f"adv{k}"]])
        torch.testing.assert_close(got, single[f"adv{k}"], rtol=1e-5, atol=1e-6, msg=f"{name} {params}")
        assert bool(got.abs().sum() > 0), name
    for mode in AGG_MODES:
        for key in (f"agg_{mode}", f"ppo_{mode}"):
            mean_over_ranks = (parts[0][key] + parts[1][key]) / 2  # what DDP's gradient averaging optimises
            assert mean_over_ranks.item() == pytest.approx(single[key].item(), rel=1e-5, abs=1e-7), key
        # DDP averages gradients: (1/R) * each rank's gradient equals the single-process gradient of its rows
        got = torch.cat([parts[0][f"grad_{mode}"], parts[1][f"grad_{mode}"]]) / 2
        torch.testing.assert_close(got, single[f"grad_{mode}"], rtol=1e-5, atol=1e-8, msg=mode)
