"""The default update of a flow algorithm: per-step PPO on the kernel log-probs recomputed through the model,
with an optional KL to the reference policy (Flow-GRPO, Liu et al., 2025; DanceGRPO; TP-GRPO; Euphonium)."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from flowrl.core import TrajectoryBatch, aggregate, compute_policy_loss
from flowrl.flow.sampler import recompute_log_prob
from flowrl.flow.sde import kernel_kl, log_prob_in_form
from flowrl.train.flow_diversity import step_kl_weights

if TYPE_CHECKING:  # types only
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import Rollout


def cfg_gradient(pipe: Any, cfg_grad: str):
    """The context in which ``pipe.velocity`` backpropagates through classifier-free guidance as ``flow.cfg_grad``
    says ("both": nothing to set; "cond_only": the adapter's ``cfg_gradient``, which detaches the unconditional
    branch). An adapter without ``cfg_gradient`` supports "both" only, and says so."""
    if cfg_grad == "both":
        return contextlib.nullcontext()
    ctx = getattr(pipe, "cfg_gradient", None)
    if ctx is None:
        raise ValueError(f"flow.cfg_grad={cfg_grad!r}: the model adapter {type(pipe).__name__} has no cfg_gradient "
                         "context (flowrl.pipelines.base.FlowAdapterBase has one); use flow.cfg_grad=both")
    return ctx(cfg_grad)


def chunk_steps(steps: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Denoising step of each (trained step, sample) pair of a chunk, flattened step-major ([c * r]: all rows of
    cols[0], then of cols[1], ...) as the recompute takes them. steps: long [T] (shared by every sample) or
    long [B, T] (each sample its own, ``flow.timestep_subset: sample``); rows long [r] index its rows."""
    if steps.dim() == 1:
        return steps[cols].repeat_interleave(len(rows))
    return steps[rows.to(steps.device)][:, cols.to(steps.device)].T.reshape(-1)


def policy_loss_columns(cfg: Any, logp: Tensor, old_logp: Tensor, columns: dict[str, tuple[float, Tensor]],
                        mask: Tensor) -> tuple[Tensor, dict]:
    """sum_k w_k L(logp, old_logp, A_k): one policy loss (``loss.name``, e.g. PPO-clip, each column clipped on its
    own) per advantage column, weighted (DanceGRPO's multi-reward loss). columns: name -> (w_k, A_k float [b, T]).
    Metrics: each column's with ``/<name>`` appended, their mean over the columns under the plain names (the
    ratio metrics are the same in every column), and ``policy/loss`` = the weighted sum."""
    total, metrics = 0.0, {}
    for name, (w, a) in columns.items():  # a handful of reward columns, not samples
        loss, lm = compute_policy_loss(cfg.loss.name, logp, old_logp, a, mask, agg=cfg.loss.agg, **cfg.loss.params)
        total = total + w * loss
        for k, v in lm.items():
            metrics[f"{k}/{name}"] = v
            metrics[k] = metrics.get(k, 0.0) + v.detach() / len(columns)
    metrics["policy/loss"] = total.detach()
    return total, metrics


def ppo_backward(task: "FlowTask", roll: "Rollout", index: Tensor, batch: TrajectoryBatch, adv: Tensor,
                 columns: Optional[dict[str, tuple[float, Tensor]]] = None) -> dict:
    """Per-step policy loss (``loss.name``, e.g. PPO-clip) on the recomputed log-probs of minibatch ``index``.

    For trained step t of sample b the action is x_{k+1} with k = ``steps[t]``; its log-prob log N(x_{k+1};
    mu_theta(x_k), s_k^2) is recomputed with the current weights and compared with ``batch.old_logp[b, t]``.
    With ``loss.kl_beta`` > 0 the loss adds beta * KL(N(mu, s^2) || N(mu_ref, s^2)) = beta * ||mu - mu_ref||^2 /
    (2 s^2) (averaged over the latent's elements, aggregated like the loss), or Flow-GRPO's SD3 form with
    ``flow.kl_form`` (:func:`flowrl.flow.sde.kernel_kl`), each step's KL weighted by ``flow.kl_weight`` at its noise
    level (:mod:`flowrl.flow.kl_weights`; uniform: 1). ``flow.logp_form`` rewrites both log-probs in the
    reference's cps form (:func:`flowrl.flow.sde.log_prob_in_form`); ``flow.cfg_grad`` sets the gradient through
    classifier-free guidance (:func:`cfg_gradient`). Accumulated over chunks of
    ``flow.micro_batch`` samples x ``flow.steps_per_backward`` steps (0: all); each chunk's loss is weighted by its
    share of the valid actions, so the accumulated gradient equals one pass over the whole minibatch (exactly for
    token_mean; for the other aggregations whenever no sample is masked, as in a flow rollout where every sample
    has the same steps). batch: b trajectories x T steps; adv float [b, T]. ``steps`` (``roll.side``) is long [T]
    or long [B, T] (each sample its own steps: :func:`chunk_steps`). ``columns`` (name -> (w_k, A_k float [b, T]))
    replaces the one policy loss on ``adv`` by sum_k w_k L(A_k) (:func:`policy_loss_columns`). Returns the
    chunk-weighted metrics.
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
                st = chunk_steps(steps, index.to(dev)[rsel], cols)
                with cfg_gradient(task.pipe, fc.cfg_grad):
                    out = recompute_log_prob(task.pipe, traj, st, index=rows)
                logp = out.log_prob.view(c, r).T
                old_logp = batch.old_logp[rsel][:, cols]
                if fc.logp_form != "density":
                    # a step's std does not depend on the weights, so out.std is the old log-prob's std too
                    conv = dict(numel=out.mean[0].numel(), reduce=traj.logp_reduce, form=fc.logp_form)
                    logp = log_prob_in_form(out.log_prob, out.std, **conv).view(c, r).T
                    old_logp = log_prob_in_form(old_logp.T.reshape(-1), out.std, **conv).view(c, r).T
                m = batch.mask[rsel][:, cols]
                if columns is None:
                    loss, lm = compute_policy_loss(cfg.loss.name, logp, old_logp, adv[rsel][:, cols],
                                                   m, agg=cfg.loss.agg, **cfg.loss.params)
                else:  # one clipped loss per advantage column (DanceGRPO's several rewards)
                    chunk = {k: (w, a[rsel][:, cols]) for k, (w, a) in columns.items()}
                    loss, lm = policy_loss_columns(cfg, logp, old_logp, chunk, m)
                if cfg.loss.kl_beta > 0:
                    with torch.no_grad(), task.reference() as ref:
                        ref_mean = recompute_log_prob(ref, traj, st, index=rows).mean
                    delta = traj.sigmas[st] - traj.sigmas[st + 1]
                    kl = kernel_kl(out.mean, ref_mean, out.std, delta, kind=traj.kind, form=fc.kl_form)
                    kl = kl * step_kl_weights(fc, traj.sigmas[st].float()).to(kl.device)  # flow.kl_weight
                    kl = aggregate(kl.view(c, r).T, m, cfg.loss.agg)
                    loss = loss + cfg.loss.kl_beta * kl
                    lm["policy/kl"] = kl.detach()
                weight = m.float().sum() / n_valid
                task.acc.backward(loss * weight)
            for k, v in lm.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) * float(weight)
    return metrics
