"""Rollouts of a flow model as a policy over denoising steps, and the trainer's log-prob recompute.

Only the ``FlowPipeline`` protocol (``flowrl.flow.pipeline``) is used: encode_prompts, velocity (with
CFG), initial_noise, sigmas, decode. Every step goes through ``flowrl.flow.sde.sde_step``; the trainer's
:func:`recompute_log_prob` calls the same function on the stored latents, so with unchanged weights it
returns the sampler's log-probs exactly (ratio 1).

Contents:
  - :class:`FlowTrajectory`: what a rollout hands to the trainer.
  - :func:`rollout`: CFG, SDE window (Flow-GRPO-Fast, MixGRPO), shared initial noise per prompt,
    reward-gradient guidance (Euphonium), progress bar.
  - ``flowrl.flow.chunks``: the same rollout in micro-batches (memory).
  - :func:`ode_complete` / :func:`complete_with_ode`: finish a trajectory from any step with the ODE
    (TP-GRPO scores these completions as step rewards).
  - :func:`recompute_log_prob`: the log-prob of stored actions under the current weights.
  - :func:`sample`: the scripting entry point (``flowrl.sample``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowrl.flow.guidance import Guidance
from flowrl.flow.pipeline import Cond, FlowPipeline, cond_repeat, cond_select
from flowrl.flow.sde import KINDS, LOGP_REDUCTIONS, SDEStep, check_noise_level, noise_scale, sde_step

Window = Union[None, tuple[int, int], Sequence[bool], Tensor]

# What ``progress=None`` means: off, unless a caller up the stack (the trainer's evaluation, which reaches the
# sampler through an adapter's own evaluation code) turned bars on with :func:`progress_bars`.
_PROGRESS_DEFAULT = [False]


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, sampler calls that leave ``progress`` as None show (or hide) their tqdm bar."""
    old = _PROGRESS_DEFAULT[0]
    _PROGRESS_DEFAULT[0] = bool(enabled)
    try:
        yield
    finally:
        _PROGRESS_DEFAULT[0] = old


def _show(progress: Optional[bool]) -> bool:
    return _PROGRESS_DEFAULT[0] if progress is None else bool(progress)


@dataclass
class FlowTrajectory:
    """One rollout of B = num_prompts * samples_per_prompt samples over K steps.

    latents: [B, K+1, ...] (the pipeline's latent dtype): latents[:, k] is x at sigmas[k]; latents[:, 0] the
        initial noise, latents[:, K] the final latent. Step k is the action latents[:, k] -> latents[:, k+1].
    log_probs: float32 [B, K]: behaviour log-prob of each action (``sde_step``'s ``log_prob``); NaN on ODE
        steps, which are not actions (select steps with ``sde_mask``).
    sigmas: float32 [K+1], from sigmas[0] (1) to sigmas[K] (0).
    sde_mask: bool [K]: True where step k was drawn from the SDE kernel (an action with a log-prob).
    cond: conditioning of every sample (batch-first tensors, [B, ...]; CFG branches included when cfg_scale).
    prompts: list of B prompt strings; group: long [B], the prompt index of each sample (rows
        i*n .. i*n+n-1 belong to prompt i).
    samples: decoded final samples (pixels in [0, 1]), or None when the rollout ran with decode=False.
    kind, noise_level, cfg_scale, logp_reduce: the kernel settings, reused by :func:`recompute_log_prob`.
    guided_mask: bool [K]: where reward guidance ran.
    drifts: float32 [B, K, ...] or None: the guidance drift of each step (0 where it did not run); kept only
        when log-probs are taken under the guided mean, so that the recompute adds the same drift.
    process_rewards: float32 [B, K] or None (no guidance): the process reward at each guided step, NaN on
        the others (the ``step_reward`` convention of TrajectoryBatch).
    """

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    sde_mask: Tensor
    cond: Cond
    prompts: list[str]
    group: Tensor
    samples: Optional[Tensor]
    kind: str
    noise_level: float
    cfg_scale: Optional[float]
    logp_reduce: str
    guided_mask: Tensor
    drifts: Optional[Tensor] = None
    process_rewards: Optional[Tensor] = None

    @property
    def num_steps(self) -> int:
        return int(self.log_probs.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.latents.shape[0])

    @property
    def final_latents(self) -> Tensor:
        return self.latents[:, -1]

    @property
    def sde_steps(self) -> Tensor:
        """long [n]: indices of the SDE steps (the actions the trainer trains on)."""
        return self.sde_mask.nonzero().flatten()


def _generator(pipeline: FlowPipeline, seed: Optional[int], generator: Optional[torch.Generator]):
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is None:
        return generator
    return torch.Generator(device=torch.device(pipeline.device)).manual_seed(int(seed))


def _check_sigmas(sigmas: Tensor, num_steps: int) -> Tensor:
    sigmas = torch.as_tensor(sigmas).detach().float()
    if sigmas.dim() != 1 or sigmas.shape[0] != num_steps + 1:
        raise ValueError(f"sigmas must have shape [num_steps + 1]=[{num_steps + 1}]; got {tuple(sigmas.shape)}")
    if not bool(((sigmas >= 0) & (sigmas <= 1)).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing within [0, 1]; got {sigmas.tolist()}")
    return sigmas


def sde_window_mask(kind: str, num_steps: int, window: Window = None) -> Tensor:
    """bool [K]: which steps use the SDE kernel ``kind`` (the others use the ODE).

    window None: every step but the last for a stochastic kind (the last step, to sigma 0, is taken by the
    ODE: cps has no density there and flow_sde / dance_sde would leave noise of size g sqrt(Delta) in the
    final sample); no step for ``kind="ode"``. (start, stop): steps start <= k < stop (Flow-GRPO-Fast's and
    MixGRPO's window; a sliding window is a new (start, stop) per rollout). A bool sequence/tensor of
    length K: that mask.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; valid kinds are {KINDS}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if kind == "ode":
        if window is not None:
            raise ValueError("sde_window was given with kind='ode': choose a stochastic kind "
                             f"({', '.join(k for k in KINDS if k != 'ode')}) for the SDE steps")
        return torch.zeros(num_steps, dtype=torch.bool)
    if window is None:
        mask = torch.ones(num_steps, dtype=torch.bool)
        mask[-1] = False
        return mask
    if isinstance(window, tuple) and len(window) == 2 and all(isinstance(w, int) for w in window):
        start, stop = window
        if not 0 <= start < stop <= num_steps:
            raise ValueError(f"sde_window=(start, stop) needs 0 <= start < stop <= num_steps={num_steps}; got {window}")
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[start:stop] = True
        return mask
    mask = torch.as_tensor(window)
    if mask.dtype != torch.bool or mask.shape != (num_steps,):
        raise ValueError(
            f"sde_window must be None, (start, stop) or a bool mask of length num_steps={num_steps}; got {window!r}"
        )
    return mask.clone().cpu()


def rollout(
    pipeline: FlowPipeline,
    prompts: Union[str, Sequence[str]],
    *,
    num_steps: int,
    kind: str = "flow_sde",
    noise_level: float = 0.7,
    cfg_scale: Optional[float] = None,
    samples_per_prompt: int = 1,
    sde_window: Window = None,
    same_noise_per_prompt: bool = False,
    guidance: Optional[Guidance] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    logp_reduce: str = "mean",
    decode: bool = True,
    sigmas: Optional[Tensor] = None,
    cond: Optional[Cond] = None,
    progress: Optional[bool] = None,
    noise: Optional[Tensor] = None,
) -> FlowTrajectory:
    """Sample B = len(prompts) * samples_per_prompt trajectories, recording each step's action and log-prob.

    Each step k (K = num_steps) computes v = pipeline.velocity(x_k, sigma_k, cond, cfg_scale) and then
    ``sde_step(kind if sde_mask[k] else "ode", x_k, v, sigma_k, sigma_{k+1}, drift=...)``.

    pipeline: a FlowPipeline. prompts: one string or P strings. cfg_scale: classifier-free guidance
    v_u + s (v_c - v_u) (the pipeline's batched call; conditioning encoded with cfg=True).
    samples_per_prompt: n samples per prompt, rows i*n .. i*n+n-1 for prompt i (GRPO groups).
    sde_window: see :func:`sde_window_mask` (default: SDE on every step but the last).
    same_noise_per_prompt: all n samples of a prompt start from the same initial noise (DanceGRPO;
        Flow-GRPO's ``same_latent``); they then differ only through the SDE noise.
    guidance: Euphonium reward-gradient drift (:class:`flowrl.flow.guidance.Guidance`) on its window.
    seed / generator: the random source of the initial noise, the SDE noise and SPSA directions (a seed
        builds a generator on pipeline.device; the same seed gives the same trajectory).
    logp_reduce: "mean" or "sum" over the latent's elements (see ``sde_step``).
    decode: decode the final latents with pipeline.decode. sigmas: float [K+1] schedule overriding
        pipeline.sigmas(num_steps). cond: conditioning already encoded for the P prompts (with the CFG
        branch when cfg_scale is set) instead of pipeline.encode_prompts. progress: show a tqdm bar (None: as
        :func:`progress_bars` set it, off by default).
    noise: pre-drawn noise [B, K+1, ...] instead of the generator: noise[:, 0] is the initial noise and
        noise[:, k+1] the SDE noise of step k. The trainer draws it for the global batch and hands each rank
        its rows, so a run on R ranks samples exactly what one process samples.

    Runs without autograd except inside the guidance gradient. Returns a :class:`FlowTrajectory`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) == 0:
        raise ValueError("rollout: prompts is empty")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1; got {samples_per_prompt}")
    if logp_reduce not in LOGP_REDUCTIONS:
        raise ValueError(f"logp_reduce={logp_reduce!r}; valid values are {LOGP_REDUCTIONS}")
    check_noise_level(kind, noise_level)
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a flowrl.flow.guidance.Guidance or None; got {type(guidance).__name__}")
    sde_mask = sde_window_mask(kind, num_steps, sde_window)
    if guidance is not None and guidance.kl_beta is not None:
        guided_ode = [k for k in range(num_steps) if guidance.applies(k) and not bool(sde_mask[k])]
        if guided_ode:
            raise ValueError(
                f"KL-mode guidance (lambda = g^2 / (2 beta)) on ODE steps {guided_ode}: g = 0 there, so the "
                "guidance would silently vanish; put Guidance.window inside the SDE window or use a fixed scale"
            )

    device = torch.device(pipeline.device)
    gen = _generator(pipeline, seed, generator)
    P, n = len(prompts), samples_per_prompt
    B = P * n

    sig = _check_sigmas(pipeline.sigmas(num_steps) if sigmas is None else sigmas, num_steps).to(device)
    with torch.no_grad():
        if cond is None:
            cond = pipeline.encode_prompts(prompts, cfg=cfg_scale is not None)
        cond = cond_repeat(cond, n)
        if noise is not None:
            if noise.shape[0] != B or noise.shape[1] != num_steps + 1:
                raise ValueError(f"noise must be [B, K+1, ...] = [{B}, {num_steps + 1}, ...]; got {tuple(noise.shape)}")
            x = noise[:, 0].to(device=device, dtype=pipeline.dtype)
            if same_noise_per_prompt:
                x = x[::n].repeat_interleave(n, dim=0)
        elif same_noise_per_prompt:
            x = pipeline.initial_noise(P, generator=gen).repeat_interleave(n, dim=0)
        else:
            x = pipeline.initial_noise(B, generator=gen)
    if x.shape[0] != B:
        raise ValueError(f"pipeline.initial_noise returned batch {x.shape[0]}, expected {B}")

    # SPSA directions come from their own generator (seeded from the rollout's), so a guided rollout draws
    # the same initial and SDE noise as the unguided rollout with the same seed.
    guide_gen = None
    if guidance is not None and gen is not None:
        guide_gen = torch.Generator(device=device).manual_seed(gen.initial_seed() + 1)
    keep_drift = guidance is not None and guidance.logprob_mean == "guided"
    latents = [x]
    log_probs = torch.full((B, num_steps), float("nan"), device=device, dtype=torch.float32)
    guided = torch.zeros(num_steps, dtype=torch.bool)
    drifts: list[Optional[Tensor]] = [None] * num_steps
    prm = torch.full((B, num_steps), float("nan"), device=device, dtype=torch.float32) if guidance else None

    for k in tqdm(range(num_steps), disable=not _show(progress), desc="sampling", leave=False):
        s = sig[k].expand(B)
        sn = sig[k + 1].expand(B)
        step_kind = kind if bool(sde_mask[k]) else "ode"
        with torch.no_grad():
            v = pipeline.velocity(x, s, cond, cfg_scale=cfg_scale)
        drift = None
        if guidance is not None and guidance.applies(k):
            g = noise_scale(step_kind, s, sn, noise_level)
            drift, r = guidance.drift(x, v, s, sn, cond, g=g, generator=guide_gen)
            guided[k] = True
            prm[:, k] = r
            if keep_drift:
                drifts[k] = drift
        with torch.no_grad():
            eps = None if noise is None or step_kind == "ode" else noise[:, k + 1].to(device=device, dtype=torch.float32)
            out = sde_step(step_kind, x, v, s, sn, noise_level=noise_level, generator=gen, drift=drift,
                           logp_reduce=logp_reduce, noise=eps)
            lp = out.log_prob
            if lp is not None and drift is not None and not keep_drift:
                # Euphonium: drawn from the guided kernel, scored under the unguided mean.
                lp = sde_step(step_kind, x, v, s, sn, noise_level=noise_level, prev_sample=out.prev_sample,
                              logp_reduce=logp_reduce).log_prob
        if lp is not None:
            log_probs[:, k] = lp
        x = out.prev_sample
        latents.append(x)

    drift_t = None
    if keep_drift:
        zero = torch.zeros(x.shape, device=device, dtype=torch.float32)
        drift_t = torch.stack([d if d is not None else zero for d in drifts], dim=1)
    samples = None
    if decode:
        with torch.no_grad():
            samples = pipeline.decode(x)
    return FlowTrajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=log_probs,
        sigmas=sig,
        sde_mask=sde_mask.to(device),
        cond=cond,
        prompts=[p for p in prompts for _ in range(n)],
        group=torch.arange(P, device=device).repeat_interleave(n),
        samples=samples,
        kind=kind,
        noise_level=float(noise_level),
        cfg_scale=cfg_scale,
        logp_reduce=logp_reduce,
        guided_mask=guided.to(device),
        drifts=drift_t,
        process_rewards=prm,
    )


def ode_complete(
    pipeline: FlowPipeline,
    x: Tensor,
    sigmas: Tensor,
    cond: Cond,
    *,
    start: int,
    cfg_scale: Optional[float] = None,
    decode: bool = False,
    progress: Optional[bool] = None,
) -> Tensor:
    """Finish a trajectory with the ODE from step ``start``: x at sigmas[start] -> x at sigmas[-1] (0).

    x_{k+1} = x_k - (sigma_k - sigma_{k+1}) v(x_k, sigma_k) for k = start .. K-1 (TP-GRPO scores the
    ODE completion after each SDE step: start = k + 1 for the state after step k). start == K returns x.
    x: [B, ...] latents at sigmas[start]; sigmas: float [K+1]; cond: [B, ...] conditioning (with the CFG
    branch when cfg_scale). Returns the final latents, or the decoded samples with ``decode``. No autograd.
    """
    K = int(sigmas.shape[0]) - 1
    if not 0 <= start <= K:
        raise ValueError(f"ode_complete: start must be in [0, K={K}]; got {start}")
    B = x.shape[0]
    sig = sigmas.to(device=x.device, dtype=torch.float32)
    with torch.no_grad():
        for k in tqdm(range(start, K), disable=not _show(progress), desc="ode completion", leave=False):
            s, sn = sig[k].expand(B), sig[k + 1].expand(B)
            v = pipeline.velocity(x, s, cond, cfg_scale=cfg_scale)
            x = sde_step("ode", x, v, s, sn).prev_sample
        return pipeline.decode(x) if decode else x


def complete_with_ode(
    pipeline: FlowPipeline,
    trajectory: FlowTrajectory,
    step: int,
    *,
    index: Optional[Tensor] = None,
    decode: bool = True,
    progress: Optional[bool] = None,
) -> Tensor:
    """ODE completion of ``trajectory`` from latents[:, step] (the state after step - 1) to sigma 0.

    Uses the trajectory's sigmas, conditioning and cfg_scale; ``index`` (long [b]) selects rows.
    Returns decoded samples (default) or final latents [b, ...].
    """
    rows = index if index is not None else torch.arange(trajectory.batch_size, device=trajectory.latents.device)
    return ode_complete(
        pipeline, trajectory.latents[rows, step], trajectory.sigmas, cond_select(trajectory.cond, rows),
        start=step, cfg_scale=trajectory.cfg_scale, decode=decode, progress=progress,
    )


def recompute_log_prob(
    pipeline: FlowPipeline,
    trajectory: FlowTrajectory,
    step_index: Union[int, Tensor],
    *,
    index: Optional[Tensor] = None,
) -> SDEStep:
    """Log-prob of the stored actions of ``trajectory`` under ``pipeline``'s current weights (the trainer's call).

    For rows b (``index``, long [b], default all) and steps k (``step_index``: an int, or long [b] with one
    step per row), with x = latents[b, k], x' = latents[b, k+1]:
        v = pipeline.velocity(x, sigmas[k], cond[b], cfg_scale=trajectory.cfg_scale)
        sde_step(trajectory.kind, x, v, sigmas[k], sigmas[k+1], noise_level=..., prev_sample=x',
                 drift=trajectory.drifts[b, k] (when log-probs were taken under the guided mean),
                 logp_reduce=...)
    the very call the sampler made, so with unchanged weights log_prob equals trajectory.log_probs[b, k]
    (ratio 1). Runs under the caller's autograd mode (gradients flow to the pipeline's trainable module).
    A reference policy's log-prob / mean (for the KL term) is the same call with the reference pipeline.

    Returns SDEStep(prev_sample [b, ...], log_prob float32 [b], mean float32 [b, ...], std float32 [b]).
    Errors: a step that was not an SDE step (no log-prob), an index out of range.
    """
    K = trajectory.num_steps
    device = trajectory.latents.device
    rows = index if index is not None else torch.arange(trajectory.batch_size, device=device)
    rows = torch.as_tensor(rows, device=device, dtype=torch.long)
    if rows.dim() != 1:
        raise ValueError(f"recompute_log_prob: index must be long [b]; got shape {tuple(rows.shape)}")
    if isinstance(step_index, Tensor):
        steps = step_index.to(device=device, dtype=torch.long)
        if steps.shape != rows.shape:
            raise ValueError(
                f"recompute_log_prob: step_index tensor must have one step per row, shape {tuple(rows.shape)}; "
                f"got {tuple(steps.shape)}"
            )
    else:
        steps = torch.full_like(rows, int(step_index))
    if bool(((steps < 0) | (steps >= K)).any()):
        raise ValueError(f"recompute_log_prob: step_index must be in [0, K={K}); got {steps.tolist()}")
    if not bool(trajectory.sde_mask[steps].all()):
        bad = sorted(set(steps[~trajectory.sde_mask[steps]].tolist()))
        raise ValueError(
            f"recompute_log_prob: steps {bad} were ODE steps (no action, no log-prob); "
            f"SDE steps are {trajectory.sde_steps.tolist()}"
        )
    x = trajectory.latents[rows, steps]
    x_next = trajectory.latents[rows, steps + 1]
    s = trajectory.sigmas[steps]
    sn = trajectory.sigmas[steps + 1]
    v = pipeline.velocity(x, s, cond_select(trajectory.cond, rows), cfg_scale=trajectory.cfg_scale)
    drift = trajectory.drifts[rows, steps] if trajectory.drifts is not None else None
    return sde_step(
        trajectory.kind, x, v, s, sn, noise_level=trajectory.noise_level, prev_sample=x_next, drift=drift,
        logp_reduce=trajectory.logp_reduce,
    )


def sample(
    pipeline: FlowPipeline,
    prompts: Union[str, Sequence[str]],
    *,
    num_steps: int,
    kind: str = "flow_sde",
    noise_level: float = 0.7,
    cfg_scale: Optional[float] = None,
    guidance: Optional[Guidance] = None,
    seed: Optional[int] = None,
    samples_per_prompt: int = 1,
    return_trajectory: bool = False,
    **rollout_kwargs,
):
    """Sample from a flow pipeline: ``flowrl.sample(pipeline, prompts, num_steps=..., ...)``.

    Decoded samples [P * samples_per_prompt, ...] in [0, 1] (rows i*n .. i*n+n-1 for prompt i), or
    (samples, FlowTrajectory) with ``return_trajectory``. Deterministic under ``seed``. ``kind="ode"`` is
    the deterministic sampler; other keyword arguments go to :func:`rollout` (sde_window,
    same_noise_per_prompt, sigmas, progress, ...).
    """
    traj = rollout(
        pipeline, prompts, num_steps=num_steps, kind=kind, noise_level=noise_level, cfg_scale=cfg_scale,
        guidance=guidance, seed=seed, samples_per_prompt=samples_per_prompt, decode=True, **rollout_kwargs,
    )
    return (traj.samples, traj) if return_trajectory else traj.samples
