"""A rollout in micro-batches: the same trajectories as one :func:`flowrl.flow.sampler.rollout` call, with the
peak activation memory of one chunk (the trainer's ``flow.sample_batch``).

  - :func:`concat_trajectories`: the rows of several trajectories of one rollout, joined.
  - :func:`rollout_in_chunks`: pre-drawn noise and conditioning sliced per chunk, each chunk a full rollout.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from flowrl.flow.pipeline import Cond, FlowPipeline
from flowrl.flow.sampler import FlowTrajectory, rollout


def concat_trajectories(parts: Sequence[FlowTrajectory]) -> FlowTrajectory:
    """One trajectory of the rows of ``parts`` in order (rollouts of the same schedule and kernel settings).

    Per-sample fields are concatenated on the batch dim; ``group`` of part j is offset by the number of prompts
    before it, so prompt indices stay distinct. Errors when the parts disagree on a shared field (sigmas,
    SDE mask, kernel, guided steps, decoded or not).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("concat_trajectories: no trajectory given")
    first = parts[0]
    if len(parts) == 1:
        return first
    for t in parts[1:]:
        same = (torch.equal(t.sigmas, first.sigmas) and torch.equal(t.sde_mask, first.sde_mask)
                and torch.equal(t.guided_mask, first.guided_mask)
                and (t.kind, t.noise_level, t.cfg_scale, t.logp_reduce) == (first.kind, first.noise_level, first.cfg_scale, first.logp_reduce)
                and (t.samples is None) == (first.samples is None) and (t.drifts is None) == (first.drifts is None)
                and (t.process_rewards is None) == (first.process_rewards is None) and set(t.cond) == set(first.cond))
        if not same:
            raise ValueError("concat_trajectories: the trajectories differ in sigmas, SDE mask, kernel settings, "
                             "guidance, conditioning keys or decoding; only chunks of one rollout can be joined")

    def cat(name: str):
        xs = [getattr(t, name) for t in parts]
        return None if xs[0] is None else torch.cat(xs, dim=0)

    offsets, groups = 0, []
    for t in parts:  # a few chunks
        groups.append(t.group + offsets)
        offsets += int(t.group.max()) + 1
    return FlowTrajectory(
        latents=cat("latents"), log_probs=cat("log_probs"), sigmas=first.sigmas, sde_mask=first.sde_mask,
        cond={k: torch.cat([t.cond[k] for t in parts], dim=0) for k in first.cond},
        prompts=[p for t in parts for p in t.prompts], group=torch.cat(groups), samples=cat("samples"),
        kind=first.kind, noise_level=first.noise_level, cfg_scale=first.cfg_scale, logp_reduce=first.logp_reduce,
        guided_mask=first.guided_mask, drifts=cat("drifts"), process_rewards=cat("process_rewards"),
    )


def rollout_in_chunks(pipeline: FlowPipeline, prompts: Sequence[str], *, chunk: int, noise: Tensor, cond: Cond,
                      **kwargs) -> FlowTrajectory:
    """:func:`rollout` of one sample per prompt (B = len(prompts)) in calls of at most ``chunk`` rows, joined with
    :func:`concat_trajectories` (the trainer's ``flow.sample_batch``: peak activation memory of ``chunk`` samples).

    ``noise`` [B, K+1, ...] and ``cond`` ([B, ...] per key) are pre-drawn for all B rows and sliced per chunk,
    so the samples, latents and log-probs are those of one call over B rows (each row's velocity does not depend
    on the other rows). ``chunk`` <= 0 or >= B: one call. Other keyword arguments go to :func:`rollout`;
    ``samples_per_prompt`` and ``same_noise_per_prompt`` are refused (the rows are already expanded).
    """
    prompts = list(prompts)
    B = len(prompts)
    for key in ("samples_per_prompt", "same_noise_per_prompt", "seed"):
        if kwargs.get(key) not in (None, False, 1):
            raise ValueError(f"rollout_in_chunks: {key} is not taken (rows are expanded and the noise is pre-drawn)")
    if noise.shape[0] != B:
        raise ValueError(f"rollout_in_chunks: noise has {noise.shape[0]} rows for {B} prompts")
    if chunk <= 0 or chunk >= B:
        return rollout(pipeline, prompts, noise=noise, cond=cond, **kwargs)
    parts = []
    for i in range(0, B, chunk):  # a few chunks, each a full rollout
        parts.append(rollout(pipeline, prompts[i:i + chunk], noise=noise[i:i + chunk],
                             cond={k: v[i:i + chunk] for k, v in cond.items()}, **kwargs))
    return concat_trajectories(parts)
