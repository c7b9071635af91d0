"""DanceGRPO (Xue et al., 2025, "DanceGRPO: Unleashing GRPO on Visual Generation").

Flow-GRPO's objective with DanceGRPO's rollout settings, all of them config keys the task reads: the
constant-noise SDE (``flow.kind: dance_sde``), one initial noise per prompt's group
(``flow.same_noise_per_prompt``), a random fraction of the denoising steps trained per iteration
(``flow.timestep_fraction``), drawn for each sample on its own (``flow.timestep_subset: sample``, as the
reference's ``perms = torch.stack([torch.randperm(K) for _ in range(batch_size)])``), and several rewards each
normalised in its group with its own clipped loss (``advantage.estimator: grpo_per_reward``, weights in
``advantage.params.weights``; reference: XueZeyue/DanceGRPO/fastvideo/train_grpo_hunyuan.py,
``final_loss = vq_coef * vq_loss + mq_coef * mq_loss``). Recipes: ``configs/digits/dance_grpo.yaml``,
``configs/flux/dance_grpo_hps.yaml``.

When the estimator offers per-reward advantage columns (its ``columns`` attribute, as ``grpo_per_reward``),
the update is sum_k w_k L_clip(A^k): each reward's advantage is clipped (``loss.params.adv_clip``) and its ratio
clipped on its own. Otherwise it is the flow base's single loss on the estimator's advantage.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from flowrl.core import ADVANTAGES
from flowrl.core.masks import and_rows
from flowrl.train.algorithms import register_algorithm
from flowrl.train.algorithms.flow_base import FlowAlgorithm
from flowrl.train.algorithms.flow_ppo import ppo_backward


@register_algorithm("dance_grpo")
class DanceGRPO(FlowAlgorithm):
    """DanceGRPO: per-sample step subsets (a rollout setting) and one clipped loss per reward column."""

    per_sample_steps = True

    def prepare_update(self, task: Any, rollout: Any, batch: Any, adv: Tensor, it: int) -> tuple[Tensor, dict]:
        """Per-reward advantage columns {k: (w_k, A^k float [B, T])} into ``rollout.side["adv_columns"]`` when the
        estimator offers them (``columns``); the advantage ``adv`` itself is unchanged."""
        adv_cfg = self.cfg.advantage
        columns_fn = getattr(ADVANTAGES[adv_cfg.estimator], "columns", None)
        if columns_fn is None:
            return adv, {}
        if batch.sample_valid is not None:  # as compute_advantages: an invalid sample has no actions
            batch = batch.with_mask(and_rows(batch.mask, batch.sample_valid))
        cols = columns_fn(batch, **adv_cfg.params)
        rollout.side["adv_columns"] = cols
        metrics = {f"adv/abs_mean/{k}": float(a[batch.mask].abs().mean()) if bool(batch.mask.any()) else 0.0
                   for k, (_, a) in cols.items()}
        return adv, metrics

    def backward(self, task: Any, rollout: Any, index: Tensor, batch: Any, adv: Tensor, it: int) -> dict:
        cols = rollout.side.get("adv_columns")
        if cols is None:
            return ppo_backward(task, rollout, index, batch, adv)
        return ppo_backward(task, rollout, index, batch, adv,
                            columns={k: (w, a[index.to(a.device)]) for k, (w, a) in cols.items()})
