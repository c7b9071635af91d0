"""The default update of a flow algorithm: per-step PPO on the kernel log-probs recomputed through the model,
with an optional KL to the reference policy (Flow-GRPO, Liu et al., 2025; DanceGRPO; TP-GRPO; Euphonium)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flowrl.core import TrajectoryBatch, aggregate, compute_policy_loss
from flowrl.flow.sampler import recompute_log_prob

if TYPE_CHECKING:  # types only
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import Rollout


def ppo_backward(task: "FlowTask", roll: "Rollout", index: Tensor, batch: TrajectoryBatch, adv: Tensor) -> dict:
    """Per-step policy loss (``loss.name``, e.g. PPO-clip) on the recomputed log-probs of minibatch ``index``.

    For trained step t of sample b the action is x_{k+1} with k = ``steps[t]``; its log-prob log N(x_{k+1};
    mu_theta(x_k), s_k^2) is recomputed with the current weights and compared with ``batch.old_logp[b, t]``.
    With ``loss.kl_beta`` > 0 the loss adds beta * KL(N(mu, s^2) || N(mu_ref, s^2)) = beta * ||mu - mu_ref||^2 /
    (2 s^2) (averaged over the latent's elements, aggregated like the loss). Accumulated over chunks of
    ``flow.micro_batch`` samples x ``flow.steps_per_backward`` steps (0: all); each chunk's loss is weighted by its
    share of the valid actions, so the accumulated gradient equals one pass over the whole minibatch (exactly for
    token_mean; for the other aggregations whenever no sample is masked, as in a flow rollout where every sample
    has the same steps). batch: b trajectories x T steps; adv float [b, T]. Returns the chunk-weighted metrics.
    """
    cfg, fc, traj, steps = task.cfg, task.cfg.flow, roll.side["traj"], roll.side["steps"]
    b, T = batch.mask.shape
    tc = fc.steps_per_backward or T
    rc = fc.micro_batch or b
    metrics: dict[str, float] = {}
    n_valid = batch.mask.float().sum().clamp_min(1)
    dev = batch.mask.device
    for r0 in range(0, b, rc):  # micro-batches of samples
        rsel = torch.arange(r0, min(r0 + rc, b), device=dev)
        for t0 in range(0, T, tc):  # chunks of denoising steps (time)
            # gradients of the chunks accumulate locally; the last chunk of the minibatch reduces them once
            with task.grad_sync(last=r0 + rc >= b and t0 + tc >= T):
                cols = torch.arange(t0, min(t0 + tc, T), device=dev)
                c, r = len(cols), len(rsel)
                rows = index.to(traj.latents.device)[rsel].repeat(c)
                st = steps[cols].repeat_interleave(r)
                out = recompute_log_prob(task.pipe, traj, st, index=rows)
                logp = out.log_prob.view(c, r).T
                m = batch.mask[rsel][:, cols]
                loss, lm = compute_policy_loss(cfg.loss.name, logp, batch.old_logp[rsel][:, cols], adv[rsel][:, cols],
                                               m, agg=cfg.loss.agg, **cfg.loss.params)
                if cfg.loss.kl_beta > 0:
                    with torch.no_grad(), task.reference() as ref:
                        ref_mean = recompute_log_prob(ref, traj, st, index=rows).mean
                    dims = tuple(range(1, out.mean.dim()))
                    kl = ((out.mean - ref_mean) ** 2).mean(dim=dims) / (2 * out.std ** 2)
                    kl = aggregate(kl.view(c, r).T, m, cfg.loss.agg)
                    loss = loss + cfg.loss.kl_beta * kl
                    lm["policy/kl"] = kl.detach()
                weight = m.float().sum() / n_valid
                task.acc.backward(loss * weight)
            for k, v in lm.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * float(weight)
    return metrics
