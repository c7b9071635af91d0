"""Denoising step kernels with log-probabilities: ``ode``, ``flow_sde``, ``dance_sde``, ``cps``.

One function, :func:`sde_step`, is called by the sampler (to draw an action and its behaviour
log-prob) and by the trainer (to recompute the log-prob of the same action under the current
weights), so with unchanged weights the importance ratio is exactly 1.

Notation (shared with ``flowrl.flow.pipeline``): sigma runs from 1 (noise) to 0 (data);
x_sigma = (1 - sigma) * x0 + sigma * eps; the model predicts v ~= eps - x0; a step goes from sigma to
sigma_next < sigma with Delta = sigma - sigma_next > 0; the predictions of the clean sample and of
the noise are x0_hat = x - sigma * v and x1_hat = x + (1 - sigma) * v (= E[eps | x] for the exact v).

Kernels (every stochastic one is Gaussian: x_next ~ N(mean, std^2 I), std the same for every element
of a sample):

- ``ode``: Euler step of the probability-flow ODE, x_next = x - Delta * v. No log-prob.
- ``flow_sde`` (Flow-GRPO, Liu et al., 2025): the reverse SDE with the ODE's marginals,
  score grad log p = -x1_hat / sigma, diffusion g = a * sqrt(sigma / (1 - sigma)) (a = noise_level):
  mean = x - Delta * v - Delta * g^2 / (2 sigma) * x1_hat, std = g * sqrt(Delta).
- ``dance_sde`` (DanceGRPO, Xue et al., 2025): the same mean and std with a constant g = noise_level.
- ``cps`` (coefficient-preserving sampling, as in newer Flow-GRPO and TP-GRPO):
  std = sigma_next * sin(a * pi / 2),
  mean = (1 - sigma_next) * x0_hat + sqrt(sigma_next^2 - std^2) * x1_hat,
  so the noise coefficient of x_next is exactly sigma_next.

Also here: the reference implementations' variants of the log-prob (:func:`gaussian_log_prob`'s ``form``,
:func:`log_prob_in_form`) and of the KL to a reference policy (:func:`kernel_kl`), each chosen by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

KINDS = ("ode", "flow_sde", "dance_sde", "cps")
LOGP_REDUCTIONS = ("mean", "sum")
# "density": the true Gaussian log-density; "flow_grpo_cps": the cps log-prob of Flow-GRPO and TP-GRPO,
# -(x_next - mean)^2 without 1 / (2 std^2) and without constants (see :func:`gaussian_log_prob`).
LOGP_FORMS = ("density", "flow_grpo_cps")
# "true_kl": KL(N(mu, s^2 I) || N(mu_ref, s^2 I)) per element; "flow_grpo_sd3": Flow-GRPO's train_sd3.py
# form, the same divided by 2 g^2 in place of 2 g^2 Delta (see :func:`kernel_kl`).
KL_FORMS = ("true_kl", "flow_grpo_sd3")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

SigmaLike = Union[float, Tensor]


@dataclass
class SDEStep:
    """Result of one kernel step.

    prev_sample: the next state x_{k+1}, shaped and typed like ``x`` (the sample that was drawn, or the
        ``prev_sample`` that was given).
    log_prob: float32 [B], log N(prev_sample; mean, std^2 I) reduced over the non-batch dimensions;
        None for ``kind="ode"``.
    mean: float32, shaped like ``x``: the kernel mean (drift included).
    std: float32 [B]: the kernel standard deviation of each sample (0 for ``ode``).
    """

    prev_sample: Tensor
    log_prob: Optional[Tensor]
    mean: Tensor
    std: Tensor


def _as_sigma(name: str, s: SigmaLike, batch: int, device: torch.device) -> Tensor:
    """A float or a tensor of shape [], [1] or [B] -> float32 [B] on ``device``."""
    if isinstance(s, Tensor):
        if s.dim() > 1 or (s.dim() == 1 and s.shape[0] not in (1, batch)):
            raise ValueError(
                f"sde_step: {name} must be a float or a tensor of shape [] or [B]=[{batch}]; got shape {tuple(s.shape)}"
            )
        return s.detach().to(device=device, dtype=torch.float32).reshape(-1).expand(batch)
    if isinstance(s, (int, float)):
        return torch.full((batch,), float(s), device=device, dtype=torch.float32)
    raise TypeError(f"sde_step: {name} must be a float or a tensor; got {type(s).__name__}")


def _check_like(name: str, t: Optional[Tensor], x: Tensor) -> None:
    if t is not None and tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"sde_step: {name} must have the shape of x {tuple(x.shape)}; got {tuple(t.shape)}")


def check_noise_level(kind: str, noise_level: float) -> None:
    """Raise a clear error when ``noise_level`` is outside the valid range of ``kind``.

    flow_sde, dance_sde: a finite noise_level > 0 (0 is the ODE: use ``kind="ode"``).
    cps: 0 < noise_level <= 1 (std = sigma_next * sin(a * pi / 2) must not exceed sigma_next).
    ode: ignored.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; valid kinds are {KINDS}")
    if kind == "ode":
        return
    a = float(noise_level)
    if not math.isfinite(a) or a <= 0:
        raise ValueError(
            f"noise_level={noise_level} is invalid for kind={kind!r}: it must be finite and > 0 "
            "(noise_level 0 is the deterministic ODE: use kind='ode')"
        )
    if kind == "cps" and a > 1:
        raise ValueError(f"noise_level={noise_level} is invalid for kind='cps': valid range is 0 < noise_level <= 1")


def kernel_std(kind: str, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """Standard deviation of the step kernel, float32 with the shape of ``sigma``.

    flow_sde: g * sqrt(Delta), g = a * sqrt(sigma / (1 - sigma')), sigma' = sigma except where sigma == 1,
        where sigma' = sigma_next (the first step of a schedule starting at 1; Flow-GRPO uses sigmas[1]
        there too), so no division by zero occurs.
    dance_sde: a * sqrt(Delta). cps: sigma_next * sin(a * pi / 2). ode: 0.
    """
    return noise_scale(kind, sigma, sigma_next, noise_level) * (sigma - sigma_next).sqrt()


def noise_scale(kind: str, sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """The kernel's diffusion coefficient g at this step (std = g * sqrt(Delta)), float32 like ``sigma``.

    flow_sde: g = a * sqrt(sigma / (1 - sigma')) with sigma' = sigma_next where sigma == 1 (see
    :func:`kernel_std`); dance_sde: g = a; cps: g = sigma_next * sin(a * pi / 2) / sqrt(Delta); ode: 0.
    Euphonium's KL-mode guidance scale is lambda = g^2 / (2 beta).
    """
    sigma = sigma.float()
    sigma_next = sigma_next.float()
    if kind == "ode":
        return torch.zeros_like(sigma)
    if kind == "flow_sde":
        denom_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
        return noise_level * (sigma / (1.0 - denom_sigma)).sqrt()
    if kind == "dance_sde":
        return torch.full_like(sigma, float(noise_level))
    if kind == "cps":
        return sigma_next * math.sin(noise_level * math.pi / 2.0) / (sigma - sigma_next).sqrt()
    raise ValueError(f"unknown kernel kind {kind!r}; valid kinds are {KINDS}")


def _check_logp_form(form: str) -> None:
    if form not in LOGP_FORMS:
        raise ValueError(f"logp_form={form!r}; valid values are {LOGP_FORMS}")


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean", form: str = "density") -> Tensor:
    """Log-probability of ``sample`` under N(mean, std^2 I), reduced per sample, in the form ``form``.

    ``form="density"`` (flowrl's default): the true log-density, element-wise
    -(sample - mean)^2 / (2 std^2) - log(std) - log(2 pi) / 2.
    ``form="flow_grpo_cps"``: element-wise -(sample - mean)^2, no 1 / (2 std^2), no constants: Flow-GRPO's and
    TP-GRPO's cps log-prob (reference: yifan123/flow_grpo/flow_grpo/diffusers_patch/sd3_sde_with_logprob.py,
    branch ``sde_type == 'cps'``, "remove all constants"; the same code in
    YunzeTong/TurningPoint-GRPO/flow_grpo/diffusers_patch/sd3_sde_with_logprob.py). It equals
    2 std^2 (density + log std + log(2 pi) / 2), so its log-ratios are the density's times 2 std^2
    (std = sigma_next sin(a pi / 2) for cps): a ratio clip range written for one form is a different
    constraint in the other (the references pair this form with clip_range 1e-5).
    Then the mean (as Flow-GRPO and DanceGRPO do) or the sum over all non-batch dimensions. Computed in float32.
    sample, mean: [B, ...]; std: [B]. Returns float32 [B].
    """
    if reduce not in LOGP_REDUCTIONS:
        raise ValueError(f"logp_reduce={reduce!r}; valid values are {LOGP_REDUCTIONS}")
    _check_logp_form(form)
    sample = sample.float()
    mean = mean.float()
    std = std.float()
    view = (-1,) + (1,) * (sample.dim() - 1)
    s = std.reshape(view)
    if form == "density":
        lp = -((sample - mean) ** 2) / (2.0 * s * s) - s.log() - _LOG_SQRT_2PI
    else:
        lp = -((sample - mean) ** 2)
    if lp.dim() == 1:
        return lp
    dims = tuple(range(1, lp.dim()))
    return lp.mean(dim=dims) if reduce == "mean" else lp.sum(dim=dims)


def log_prob_in_form(log_prob: Tensor, std: Tensor, numel: int, *, reduce: str = "mean",
                     form: str = "density") -> Tensor:
    """A true Gaussian log-density (``gaussian_log_prob(..., form="density")``) rewritten in the form ``form``.

    std does not depend on the weights, so the other forms are affine in the density, per sample:
    flow_grpo_cps, reduce mean: -mean (x - mu)^2 = 2 std^2 (log_prob + log std + log(2 pi) / 2);
    reduce sum: -sum (x - mu)^2 = 2 std^2 (log_prob + numel (log std + log(2 pi) / 2)).
    The trainer uses this to score stored actions in the reference form while the sampler records the
    density (so a behaviour log-prob means the same whatever the form; the ratio with unchanged weights stays
    exactly 1, and the gradient is the reference's: d/dtheta of -mean (x - mu)^2).
    log_prob, std: float [B]; numel: elements per sample. Returns float32 [B] (log_prob itself for "density").
    """
    if reduce not in LOGP_REDUCTIONS:
        raise ValueError(f"logp_reduce={reduce!r}; valid values are {LOGP_REDUCTIONS}")
    _check_logp_form(form)
    if form == "density":
        return log_prob
    s = std.float()
    const = s.log() + _LOG_SQRT_2PI
    return 2.0 * s * s * (log_prob.float() + (const if reduce == "mean" else numel * const))


def kernel_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, delta: Tensor, *, kind: str,
              form: str = "true_kl") -> Tensor:
    """KL penalty between the trained kernel N(mean, std^2 I) and the reference's N(ref_mean, std^2 I), per sample.

    Both kernels share std (it depends only on the step), so the KL is a squared distance of the means:
      - ``true_kl`` (flowrl's default): mean over the latent's elements of (mean - ref_mean)^2 / (2 std^2), the KL
        of the two Gaussians per element, with std^2 = g^2 Delta for flow_sde / dance_sde. Flow-GRPO's Wan
        script uses this form (reference: yifan123/flow_grpo/scripts/train_wan2_1.py, divided by
        2 (std_dev_t * sqrt(-dt))^2).
      - ``flow_grpo_sd3``: Flow-GRPO's SD3 / FLUX form (reference: yifan123/flow_grpo/scripts/train_sd3.py,
        ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1,2,3), keepdim=True) / (2 * std_dev_t ** 2)``
        then ``torch.mean`` over the batch): its std_dev_t is the diffusion coefficient g of the SDE, without
        sqrt(Delta), so for flow_sde / dance_sde this is Delta * true_kl (a KL that weighs each step by its
        length). For cps its std_dev_t is the kernel std itself, so the form equals true_kl there.
    flowrl keeps ``true_kl`` by default: it is the KL of the actions the policy takes, its weight does not
    depend on the number of steps or on the schedule (flow_grpo_sd3 at 10 steps, Delta ~ 0.1, is ~10x weaker
    than at 1 step for the same beta); use ``flow_grpo_sd3`` with Flow-GRPO's beta to reproduce its SD3 recipes.

    mean, ref_mean: [B, ...]; std, delta (= sigma - sigma_next): float [B]. Returns float32 [B] (then
    aggregated over samples and steps like the policy loss).
    """
    if form not in KL_FORMS:
        raise ValueError(f"kl_form={form!r}; valid values are {KL_FORMS}")
    if kind not in KINDS or kind == "ode":
        raise ValueError(f"kernel_kl: kind={kind!r} has no kernel density; valid kinds are {KINDS[1:]}")
    dims = tuple(range(1, mean.dim()))
    sq = (mean.float() - ref_mean.float()) ** 2
    kl = (sq.mean(dim=dims) if dims else sq) / (2 * std.float() ** 2)
    if form == "flow_grpo_sd3" and kind != "cps":
        kl = kl * delta.float()
    return kl


def sde_step(
    kind: str,
    x: Tensor,
    v: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    *,
    noise_level: float = 0.7,
    prev_sample: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    drift: Optional[Tensor] = None,
    logp_reduce: str = "mean",
    logp_form: str = "density",
) -> SDEStep:
    """One denoising step from ``sigma`` to ``sigma_next`` with the log-prob of the action taken.

    Kernels (a = ``noise_level``; Delta = sigma - sigma_next; x0_hat = x - sigma v; x1_hat = x + (1 - sigma) v):
      - ``ode``: mean = x - Delta v, std = 0, log_prob None.
      - ``flow_sde`` (Flow-GRPO, Liu et al. 2025): g = a sqrt(sigma / (1 - sigma)),
        mean = x - Delta v - Delta g^2 / (2 sigma) x1_hat, std = g sqrt(Delta). At sigma == 1 (the first
        step of a schedule from pure noise) the denominator uses sigma_next instead:
        g = a sqrt(1 / (1 - sigma_next)), as Flow-GRPO does with sigmas[1]; no division by zero.
      - ``dance_sde`` (DanceGRPO, Xue et al. 2025): the same mean and std with g = a constant.
      - ``cps`` (coefficient-preserving): std = sigma_next sin(a pi / 2),
        mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat.
    ``drift`` (like x; Euphonium's reward guidance lambda Delta grad r) is added to the mean.
    Without ``prev_sample`` the step samples prev_sample = mean + std * noise (``noise`` given, or drawn
    from N(0, I) with ``generator``); with ``prev_sample`` it only evaluates its log-prob (the trainer's
    recompute path: same function, same float32 arithmetic, so the ratio with unchanged weights is 1).

    ``log_prob`` is the true Gaussian log-density log N(prev_sample; mean, std^2 I), element-wise
    -(x_next - mean)^2 / (2 std^2) - log std - log(2 pi) / 2, reduced over all non-batch dimensions by
    the mean (``logp_reduce="mean"``, as the public implementations do) or the sum. flowrl keeps the
    1/(2 std^2) factor and the constants for every kind by default, so ratio clip ranges in configs are set
    for the true density; ``logp_form="flow_grpo_cps"`` (cps only) gives Flow-GRPO's and TP-GRPO's cps
    log-prob -(x_next - mean)^2 instead (see :func:`gaussian_log_prob`). The mean, std and log-prob are computed in
    float32 whatever the input dtype (bf16 overflows there); a drawn sample is cast to x.dtype before its
    log-prob is taken, so the log-prob is that of the sample actually returned.

    Shapes: x, v, drift, prev_sample, noise: [B, ...] (the same shape); sigma, sigma_next: float or
    tensor [] / [B] with 0 <= sigma_next < sigma <= 1. Returns SDEStep(prev_sample like x,
    log_prob float32 [B] or None, mean float32 like x, std float32 [B]).

    Errors: unknown kind, noise_level outside (0, inf) (flow_sde, dance_sde) or (0, 1] (cps), shapes
    that differ from x, sigma outside [0, 1], sigma_next >= sigma, both ``noise`` and ``prev_sample``,
    cps to sigma_next == 0 (std 0, no density: take that step with the ODE), an unknown ``logp_form`` or
    ``logp_form="flow_grpo_cps"`` with another kind. flow_sde and dance_sde
    have std > 0 at every valid step, the last one to sigma 0 included.
    """
    check_noise_level(kind, noise_level)
    if logp_reduce not in LOGP_REDUCTIONS:
        raise ValueError(f"logp_reduce={logp_reduce!r}; valid values are {LOGP_REDUCTIONS}")
    _check_logp_form(logp_form)
    if logp_form == "flow_grpo_cps" and kind != "cps":
        raise ValueError(f"logp_form='flow_grpo_cps' is the cps kernel's reference log-prob; kind={kind!r} "
                         "takes logp_form='density'")
    if not isinstance(x, Tensor) or not isinstance(v, Tensor):
        raise TypeError("sde_step: x and v must be tensors")
    if x.dim() < 1:
        raise ValueError("sde_step: x must have a batch dimension, shape [B, ...]")
    _check_like("v", v, x)
    _check_like("drift", drift, x)
    _check_like("prev_sample", prev_sample, x)
    _check_like("noise", noise, x)
    if prev_sample is not None and noise is not None:
        raise ValueError("sde_step: give prev_sample (evaluate its log-prob) or noise (draw a sample), not both")

    B = x.shape[0]
    s = _as_sigma("sigma", sigma, B, x.device)
    sn = _as_sigma("sigma_next", sigma_next, B, x.device)
    bad = (s < 0) | (s > 1) | (sn < 0) | (sn >= s) | ~torch.isfinite(s) | ~torch.isfinite(sn)
    # cps has std = sigma_next sin(a pi / 2): zero (no density) at sigma_next == 0. Checked in the same
    # reduction so a step costs one host sync in all.
    degenerate = (sn <= 0) if kind == "cps" else torch.zeros_like(bad)
    if bool((bad | degenerate).any()):  # the message names the first offending row
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sde_step: need 0 <= sigma_next < sigma <= 1 for every sample; row {i} has "
                f"sigma={float(s[i])}, sigma_next={float(sn[i])}"
            )
        i = int(degenerate.nonzero()[0, 0])
        raise ValueError(
            f"sde_step: kind='cps' has std = sigma_next * sin(a pi / 2) = 0 at sigma_next == 0 (row {i}), "
            "so its log-density is undefined; take the last step, to sigma 0, with kind='ode' "
            "(the sampler's default)"
        )

    view = (-1,) + (1,) * (x.dim() - 1)
    xf = x.float()
    vf = v.float()
    sv, snv = s.reshape(view), sn.reshape(view)
    delta = sv - snv

    if kind == "ode":
        std = torch.zeros_like(s)
        mean = xf - delta * vf
    elif kind in ("flow_sde", "dance_sde"):
        g = noise_scale(kind, s, sn, noise_level)
        std = g * (s - sn).sqrt()
        gv = g.reshape(view)
        x1_hat = xf + (1.0 - sv) * vf
        mean = xf - delta * vf - delta * gv * gv / (2.0 * sv) * x1_hat
    else:  # cps
        std = sn * math.sin(noise_level * math.pi / 2.0)
        stdv = std.reshape(view)
        x0_hat = xf - sv * vf
        x1_hat = xf + (1.0 - sv) * vf
        mean = (1.0 - snv) * x0_hat + (snv * snv - stdv * stdv).clamp_min(0.0).sqrt() * x1_hat
    if drift is not None:
        mean = mean + drift.float()

    if kind == "ode":
        out = mean.to(x.dtype) if prev_sample is None else prev_sample
        return SDEStep(prev_sample=out, log_prob=None, mean=mean, std=std)

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = (mean + std.reshape(view) * noise.float()).to(x.dtype)
    log_prob = gaussian_log_prob(prev_sample, mean, std, logp_reduce, logp_form)
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)
