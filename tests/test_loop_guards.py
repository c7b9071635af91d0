"""The loop's guards, on a task small enough to reason about: a NaN loss stops the run naming the iteration and
keeps the last good checkpoint; `ema.every` sets how often the average moves; the loop takes a task factory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from flowrl.config import load
from flowrl.core import TrajectoryBatch, compute_policy_loss
from flowrl.train.checkpoint import latest_checkpoint
from flowrl.train.config import TrainConfig
from flowrl.train.ema import EMA
from flowrl.train.loop import TrainingDiverged, train
from flowrl.train.task import Rollout

ROOT = Path(__file__).resolve().parents[1]


class LinearBandit:
    """A 2-armed bandit policy (one logit row per prompt): enough to run the loop's every step in milliseconds.
    ``nan_at``: from this iteration on, the loss is NaN."""

    def __init__(self, cfg, accelerator, nan_at: int | None = None):
        self.cfg, self.acc, self.nan_at = cfg, accelerator, nan_at
        self.module = nn.Linear(1, 2, bias=False)
        self.forward_module = self.module

    def set_forward_module(self, module):
        self.forward_module = module

    def rollout(self, it, generator):
        P, G = self.cfg.prompts_per_iter, self.cfg.group_size
        with torch.no_grad():
            logits = self.forward_module(torch.ones(P * G, 1))
        action = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        logp = logits.log_softmax(-1).gather(1, action[:, None])
        reward = action.float()  # arm 1 pays 1
        batch = TrajectoryBatch(group=torch.arange(P).repeat_interleave(G) + it * P, mask=torch.ones(P * G, 1, dtype=torch.bool),
                                step=torch.zeros(P * G, 1, dtype=torch.long), old_logp=logp, outcome=reward)
        return Rollout(batch=batch, side={"action": action, "it": it}, metrics={"reward": float(reward.mean())})

    def prepare_update(self, rollout, batch, adv, it):
        return adv, {}

    def backward(self, rollout, index, batch, adv, it):
        logits = self.forward_module(torch.ones(len(index), 1))
        logp = logits.log_softmax(-1).gather(1, rollout.side["action"][index][:, None])
        loss, m = compute_policy_loss("ppo_clip", logp, batch.old_logp, adv, batch.mask)
        if self.nan_at is not None and it >= self.nan_at:
            loss = loss * float("nan")
        self.acc.backward(loss)
        return {k: float(v) for k, v in m.items()}

    def evaluate(self, step, out_dir):
        with torch.no_grad():
            return {"reward": float(self.module(torch.ones(1, 1)).softmax(-1)[0, 1])}

    def extra_state(self):
        return {}

    def load_extra_state(self, state):
        pass

    def export(self, out_dir):
        pass

    def report_plan(self):
        return None  # the generic report


def cfg_of(*overrides):
    base = ["iterations=6", "prompts_per_iter=4", "group_size=4", "eval.every=2", "save_every=2", "progress=false",
            "trackers=[]", "optim.lr=0.1", "loss.params={eps_low: 0.2}"]
    return load(TrainConfig, ROOT / "configs/digits/flow_grpo.yaml", base + list(overrides))


def test_a_nan_loss_stops_the_run_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = cfg_of()
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, tmp_path / "run", build_task=lambda c, acc: LinearBandit(c, acc, nan_at=3))
    msg = str(e.value)
    assert "iteration 4" in msg and "step_000002" in msg, msg
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2  # nothing written after the NaN


def test_a_nan_loss_is_caught_without_grad_clipping_too(tmp_path):
    with pytest.raises(TrainingDiverged, match="iteration 1: the weights"):
        train(cfg_of("optim.grad_clip=0"), tmp_path / "run", build_task=lambda c, acc: LinearBandit(c, acc, nan_at=0))


def test_the_loop_runs_a_task_factory_and_the_reward_rises(tmp_path):
    result = train(cfg_of("iterations=8"), tmp_path / "run", build_task=lambda c, acc: LinearBandit(c, acc))
    assert result["reward"] > 0.8  # starts near 0.5 (random init of 2 logits); measured 0.99


@pytest.mark.parametrize("every,expected", [(1, 24), (3, 8), (5, 4)])
def test_ema_every_sets_how_often_the_average_moves(tmp_path, monkeypatch, every, expected):
    """6 iterations x 2 passes x 2 minibatches = 24 optimiser steps; the average moves on every ``every``-th."""
    calls = []
    monkeypatch.setattr(EMA, "update", lambda self, params=None: calls.append(1))
    cfg = cfg_of("ema.enabled=true", f"ema.every={every}", "minibatches=2", "updates_per_rollout=2")
    train(cfg, tmp_path / "run", build_task=lambda c, acc: LinearBandit(c, acc))
    assert len(calls) == expected
