"""The advantage side of the flow recipes against their reference implementations, each from a slow loop written
from the reference's code: Flow-GRPO's global std (flow_grpo/stat_tracking.py), DanceGRPO's per-reward advantages
with one clipped loss each (fastvideo/train_grpo_hunyuan.py) and its per-sample step subsets
(fastvideo/train_grpo_flux.py), and Euphonium's process reward on the guided states
(euphonium/grpo/grpo_sampling/sampling.py). TurningPoint-GRPO's balanced bonuses are in tests/test_credit.py."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flowrl.config import ConfigError, load
from flowrl.core import TrajectoryBatch, compute_advantages
from flowrl.core.estimators.outcome import per_reward_advantages
from flowrl.train.algorithms.flow_ppo import chunk_steps, policy_loss_columns
from flowrl.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def outcome_batch(parts: dict[str, list[float]], group: list[int], T: int = 2, valid=None) -> TrajectoryBatch:
    B = len(group)
    first = next(iter(parts.values()))
    return TrajectoryBatch(group=torch.tensor(group), mask=torch.ones(B, T, dtype=torch.bool),
                           step=torch.arange(T).expand(B, T).clone(), old_logp=torch.zeros(B, T),
                           outcome=torch.tensor(first), outcome_parts={k: torch.tensor(v) for k, v in parts.items()},
                           sample_valid=None if valid is None else torch.tensor(valid))


# ----------------------------------------------------------------------------- Flow-GRPO: global std
def flow_grpo_tracker(prompts, rewards):
    """PerPromptStatTracker.update(global_std=True), type 'grpo': group mean, np.std of the whole batch + 1e-4."""
    n = len(rewards)
    mean_all = sum(rewards) / n
    std = math.sqrt(sum((r - mean_all) ** 2 for r in rewards) / n) + 1e-4  # np.std: ddof 0
    out = []
    for p, r in zip(prompts, rewards):
        grp = [x for q, x in zip(prompts, rewards) if q == p]
        out.append((r - sum(grp) / len(grp)) / std)
    return out


def test_grpo_global_std_is_flow_grpo_stat_tracker():
    r = [1.0, 2.0, 4.0, 0.0, 0.0, 3.0]
    g = [0, 0, 0, 1, 1, 1]
    got = compute_advantages("grpo", outcome_batch({"r": r}, g), scale="global_std")
    # by hand: batch mean 5/3, population variance 20/9 (std 1.490712); group means 7/3 and 1
    std = math.sqrt(20) / 3 + 1e-4
    hand = [(1 - 7 / 3) / std, (2 - 7 / 3) / std, (4 - 7 / 3) / std, -1 / std, -1 / std, 2 / std]
    torch.testing.assert_close(got[:, 0], torch.tensor(hand), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[:, 1], torch.tensor(flow_grpo_tracker(g, r), dtype=torch.float32))
    # "batch" is TRL's unbiased std: a different scale by sqrt(n / (n - 1))
    batch = compute_advantages("grpo", outcome_batch({"r": r}, g), scale="batch")
    assert float(got[2, 0] / batch[2, 0]) == pytest.approx(math.sqrt(6 / 5), rel=1e-4)
    # an invalid sample takes no part in the statistics (the reference's batch without it) and gets 0
    r7, g7 = r + [100.0], g + [1]
    got7 = compute_advantages("grpo", outcome_batch({"r": r7}, g7, valid=[True] * 6 + [False]), scale="global_std")
    torch.testing.assert_close(got7[:6], got)
    assert got7[6].abs().sum() == 0


def test_grpo_scale_is_checked_when_the_config_is_read():
    with pytest.raises(ConfigError, match="global_std"):
        load(TrainConfig, ROOT / "configs" / "digits" / "flow_grpo.yaml", ["advantage.params={scale: global}"])
    with pytest.raises(ValueError, match="global_std"):
        compute_advantages("grpo", outcome_batch({"r": [0.0, 1.0]}, [0, 0]), scale="globl")


def test_shipped_recipes_take_the_references_forms():
    sd3 = load(TrainConfig, ROOT / "configs" / "sd3" / "flow_grpo_pickscore.yaml", [])
    assert sd3.advantage.estimator == "grpo" and sd3.advantage.params["scale"] == "global_std"
    tp = load(TrainConfig, ROOT / "configs" / "digits" / "tp_grpo.yaml", [])
    assert tp.advantage.params["balance"] is True
    for path in ("digits/dance_grpo.yaml", "flux/dance_grpo_hps.yaml"):
        c = load(TrainConfig, ROOT / "configs" / path, [])
        assert c.advantage.estimator == "grpo_per_reward" and c.flow.timestep_subset == "sample", path


# ----------------------------------------------------------------------------- DanceGRPO: several rewards
def dance_reference(parts, group_size, coefs, logp, old, clip, adv_clip):
    """train_grpo_hunyuan.py: each reward normalised in its group (torch .std(), + 1e-8), then per step t
    loss_k = mean_b max(-A^k r, -A^k clamp(r, 1 - clip, 1 + clip)) with A^k clamped to +-adv_clip,
    final = sum_k coef_k loss_k, averaged over the trained steps."""
    B, T = logp.shape
    advs = {}
    for k, r in parts.items():
        a = torch.zeros(B, dtype=torch.float64)
        for s in range(0, B, group_size):
            grp = r[s:s + group_size].double()
            a[s:s + group_size] = (grp - grp.mean()) / (grp.std() + 1e-8)
        advs[k] = a
    total = 0.0
    for t in range(T):
        ratio = torch.exp(logp[:, t].double() - old[:, t].double())
        for k, a in advs.items():
            a = a.clamp(-adv_clip, adv_clip)
            unclipped = -a * ratio
            clipped = -a * torch.clamp(ratio, 1 - clip, 1 + clip)
            total = total + coefs[k] * torch.mean(torch.maximum(unclipped, clipped)) / T
    return advs, total


def test_per_reward_advantages_and_clipped_losses_match_dance_grpo():
    parts = {"hps": [1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5], "clip": [0.0, 1.0, 0.0, 1.0, 3.0, 1.0, 2.0, 9.0]}
    batch = outcome_batch(parts, [0, 0, 0, 0, 1, 1, 1, 1], T=3)
    coefs = {"hps": 1.0, "clip": 0.7}
    cols = per_reward_advantages(batch, weights=coefs)
    # by hand, group 0 of hps: mean 3, unbiased std sqrt(14 / 3); group 1 all equal -> 0
    s = math.sqrt(14 / 3)
    torch.testing.assert_close(cols["hps"][1][:, 0], torch.tensor([-2 / s, -1 / s, 0.0, 3 / s, 0, 0, 0, 0]))
    torch.testing.assert_close(cols["clip"][1][:4, 2], torch.tensor([-0.866025, 0.866025, -0.866025, 0.866025]))

    g = torch.Generator().manual_seed(0)
    old = torch.randn(8, 3, generator=g)
    logp = (old + 0.3 * torch.randn(8, 3, generator=g)).requires_grad_(True)  # ratios well outside the clip range
    ref_adv, ref_loss = dance_reference({k: torch.tensor(v) for k, v in parts.items()}, 4, coefs, logp, old,
                                        clip=0.05, adv_clip=1.2)
    for k in parts:
        torch.testing.assert_close(cols[k][1][:, 0].double(), ref_adv[k], rtol=1e-6, atol=1e-6)
    cfg = SimpleNamespace(loss=SimpleNamespace(name="ppo_clip", agg="token_mean",
                                               params={"eps_low": 0.05, "adv_clip": 1.2}))
    loss, metrics = policy_loss_columns(cfg, logp, old, cols, batch.mask)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-7)
    (g_ours,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(ref_loss, logp)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert {"policy/clip_frac/hps", "policy/clip_frac/clip", "policy/ratio_mean"} <= set(metrics)
    # one clipped loss on the summed advantage is a different objective here
    summed = compute_advantages("grpo_per_reward", batch, weights=coefs)
    one, _ = policy_loss_columns(cfg, logp, old, {"sum": (1.0, summed)}, batch.mask)
    assert abs(float(one.detach()) - float(ref_loss.detach())) > 1e-3
    torch.testing.assert_close(summed, cols["hps"][1] + 0.7 * cols["clip"][1])
    # gdpo whitens the sum again over the batch: not DanceGRPO's scale
    assert not torch.allclose(compute_advantages("gdpo", batch, weights=coefs), summed, atol=1e-3)
    with pytest.raises(KeyError, match="hpsv2"):
        per_reward_advantages(batch, weights={"hpsv2": 1.0})


def test_chunk_steps_orders_each_samples_own_steps_step_major():
    steps = torch.tensor([[0, 2, 5], [1, 3, 4], [0, 1, 2]])
    got = chunk_steps(steps, torch.tensor([1, 0]), torch.tensor([1, 2]))
    assert got.tolist() == [3, 2, 4, 5]  # (col 1: rows 1, 0), (col 2: rows 1, 0)
    assert chunk_steps(torch.tensor([3, 4, 5]), torch.tensor([2, 0]), torch.tensor([0, 2])).tolist() == [3, 3, 5, 5]


# ----------------------------------------------------------------------------- rollouts on the digits model
def digits_task(config: str, *overrides):
    from accelerate import Accelerator

    from flowrl.train.algorithms import ALGORITHMS
    from flowrl.train.task import iteration_generator

    cfg = load(TrainConfig, ROOT / "configs" / "digits" / config,
               ["prompts_per_iter=2", "group_size=4", "progress=false", "trackers=[]", *overrides])
    task = ALGORITHMS[cfg.algorithm].build_task(cfg, Accelerator(cpu=True))
    return cfg, task, task.rollout(0, iteration_generator(0, 0, 0))


def test_dance_grpo_trains_each_samples_own_random_steps():
    cfg, task, roll = digits_task("dance_grpo.yaml", "flow.steps_per_backward=1", "flow.micro_batch=3")
    steps, traj, batch = roll.side["steps"], roll.side["traj"], roll.batch
    sde = traj.sde_steps.tolist()  # the steps with noise (the last one is deterministic)
    n = round(0.6 * len(sde))
    assert n == 3 and tuple(steps.shape) == (8, n) and batch.mask.shape == (8, n)
    for row in steps.tolist():  # exactly n distinct SDE steps each, sorted
        assert len(set(row)) == n and row == sorted(row) and set(row) <= set(sde)
    assert len({tuple(r) for r in steps.tolist()}) > 1  # samples draw different subsets
    torch.testing.assert_close(batch.old_logp, traj.log_probs.gather(1, steps).float())
    # the update recomputes each sample's own steps (chunks of 3 samples x 1 step): on-policy ratio 1
    adv = compute_advantages(cfg.advantage.estimator, batch.validate(), **cfg.advantage.params)
    adv, prep = task.prepare_update(roll, batch, adv, 0)
    assert "adv/abs_mean/digits" in prep and set(roll.side["adv_columns"]) == {"digits"}
    m = task.backward(roll, torch.arange(8), batch, adv, 0)
    assert m["policy/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert m["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    # an algorithm whose hooks take one set of steps refuses per-sample subsets when the config is read
    with pytest.raises(ConfigError, match="timestep_subset"):
        load(TrainConfig, ROOT / "configs" / "digits" / "dance_grpo.yaml", ["algorithm=flow_grpo"])
    with pytest.raises(ConfigError, match="timestep_subset"):
        load(TrainConfig, ROOT / "configs" / "digits" / "dance_grpo.yaml", ["flow.timestep_subset=each"])


def test_euphonium_guided_state_is_the_references_process_reward():
    """guided_state: r(x_k) on the guidance window's steps, the value the sampler recorded for its drift, NaN
    elsewhere; the dual-level process advantage (beta 1, the reference's coefficient) is 0 off the window."""
    cfg, task, roll = digits_task("euphonium.yaml", "flow.guidance.step_reward=guided_state")
    steps, traj, sr = roll.side["steps"], roll.side["traj"], roll.batch.step_reward
    lo, hi = cfg.flow.guidance.window
    inside = ((steps >= lo) & (steps < hi)).expand_as(sr)
    assert steps.tolist() == [0, 1, 2, 3, 4] and (lo, hi) == (2, 5)
    assert torch.isnan(sr[~inside]).all()
    torch.testing.assert_close(sr[inside], traj.process_rewards[:, steps][inside], rtol=1e-5, atol=1e-6)
    # steps 2 and 4 as the task sees them with per-sample steps (long [b, T]): the same values
    two = task.algorithm.step_rewards(task, traj, torch.tensor([[2, 4]] * 8), roll.side["prompts"])
    torch.testing.assert_close(two, sr[:, [2, 4]])
    b = roll.batch.validate()
    params = dict(mode="per_step", gamma=0.0, outcome_coef=1.0, beta=1.0)
    both = compute_advantages("dual_level", b, **params)
    outcome_only = compute_advantages("grpo", b)
    torch.testing.assert_close(both[~inside], outcome_only[~inside])
    assert not torch.allclose(both[inside], outcome_only[inside])
    with pytest.raises(ConfigError, match="timestep_subset"):  # its per-(group, step) statistic needs shared steps
        load(TrainConfig, ROOT / "configs" / "digits" / "euphonium.yaml",
             ["flow.timestep_fraction=0.6", "flow.timestep_subset=sample"])
    with pytest.raises(ConfigError, match="guided_state"):
        load(TrainConfig, ROOT / "configs" / "digits" / "euphonium.yaml",
             ["flow.guidance.step_reward=guided_state", "flow.guidance.enabled=false"])
