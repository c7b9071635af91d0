"""Process rewards for flow models, and the digits outcome reward.

A flow process reward is ``(x_t [B, ...], sigma float [B], cond) -> float [B]`` (see
:class:`flowrl.rewards.base.FlowProcessReward`), the signature :mod:`flowrl.flow.guidance` consumes.

- :class:`ModelProcessReward` ("model"): any differentiable model of that signature, checked.
- :class:`NoisyDigitsProcessReward` ("digits_noisy"): the embedded noisy-digit classifier,
  log p(d | x_sigma, sigma) (or p) of the asked digit.
- :class:`ODECompletionReward` ("ode_completion"): the outcome reward of the sample obtained by finishing the
  trajectory with the ODE from step t (TP-GRPO's per-step score).
- :class:`DigitsReward` (outcome, "digits"): the embedded classifier's p(d | x) with accuracy as a second part.
- :class:`DigitsGaussianReward` (outcome, "digits_gaussian"): the same from a Gaussian generative classifier.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .base import Reward, RewardError, register_process_reward, register_reward
from .build import build_reward


def _check_out(r: Any, B: int, who: str) -> Tensor:
    if not isinstance(r, Tensor) or tuple(r.shape) != (B,):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise RewardError(f"process reward {who!r} must return float [B] = ({B},); got {shape}")
    if not bool(torch.isfinite(r).all()):
        raise RewardError(f"process reward {who!r} returned a non-finite value for samples "
                          f"{(~torch.isfinite(r)).nonzero().flatten().tolist()}")
    return r


@register_process_reward("model")
class ModelProcessReward:
    """Any model r(x_t, sigma, cond) -> float [B] made a checked process reward.

    r = fn(x_t, sigma, cond); x_t [B, ...] a noisy latent, sigma float [B] (a scalar is broadcast), cond a
    dict of batch-first tensors. ``differentiable`` (default True) tells guidance it may use autograd;
    gradients flow through unchanged. The output must be float [B] and finite (else RewardError).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor], *, name: str = "model",
                 differentiable: bool = True):
        if not callable(fn):
            raise TypeError(f"process reward 'model': fn must be callable (x_t, sigma, cond) -> [B]; got {type(fn).__name__}")
        self.fn, self.name, self.differentiable = fn, name, bool(differentiable)

    def __call__(self, x_t: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        B = x_t.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_t.device)
        sigma = sigma.expand(B) if sigma.dim() == 0 else sigma
        if tuple(sigma.shape) != (B,):
            raise ValueError(f"process reward {self.name!r}: sigma must be float [B] = ({B},) or a scalar; got {tuple(sigma.shape)}")
        return _check_out(self.fn(x_t, sigma, cond), B, self.name)


def _asked_digits(prompts: Optional[Sequence[str]], meta: Optional[Mapping[str, Any]], key: str, B: int, device) -> Tensor:
    """long [B]: meta[key] when given, else parsed from prompts "a handwritten digit d"."""
    from flowrl.pipelines.digits import parse_digits

    if meta is not None and key in meta:
        d = torch.as_tensor(meta[key], dtype=torch.long, device=device)
    elif prompts is not None:
        d = parse_digits(prompts).to(device)
    else:
        raise ValueError(f"digits reward: give the asked digits as meta[{key!r}] (long [B]) or as prompts 'a handwritten digit d'")
    if tuple(d.shape) != (B,) or bool(((d < 0) | (d > 9)).any()):
        raise ValueError(f"digits reward: asked digits must be long [B] = ({B},) in 0..9; got {d.tolist()}")
    return d


@register_reward("digits")
class DigitsReward(Reward):
    """The embedded digits outcome reward (flowrl's digits task; classifier from ``pipelines/digits.py``).

    r_b = softmax(C(x_b))[d_b], and part "<name>/accuracy" = 1[argmax C(x_b) = d_b], with C the shipped CNN
    classifier and d_b the asked digit (meta["digit"] or parsed from the prompt). Images float
    [B, 1, 8, 8] in [0, 1]. Differentiable in the images. Returns {name: float [B], name/accuracy: float [B]}.
    ``directory``: where classifier.safetensors/.json live (default: the shipped weights).
    ``saturate_at`` = s in (0, 1]: the score is min(p / s, 1) instead of p, so a sample the classifier is already
    sure of (p >= s) earns no more for looking even more like the classifier's prototype of its digit. Every such
    sample of a group then scores alike, which leaves the group's correct drawings as varied as they are: the
    reward stops pulling them toward one mode (the diversity recipe's choice; None keeps p).
    """

    def __init__(self, *, directory: Optional[str] = None, digit_key: str = "digit", device: Optional[str] = None,
                 name: Optional[str] = None, on_error: str = "raise", saturate_at: Optional[float] = None):
        super().__init__(name=name, on_error=on_error)
        if saturate_at is not None and not 0.0 < float(saturate_at) <= 1.0:
            raise ValueError(f"digits reward: saturate_at={saturate_at!r} must be in (0, 1] (or null: the probability itself)")
        self.saturate_at = None if saturate_at is None else float(saturate_at)
        self.device = torch.device(device or "cpu")
        self.classifier = self._load_classifier(directory)
        self.digit_key = digit_key

    def _load_classifier(self, directory: Optional[str]):
        from flowrl.pipelines.digits import load_digit_classifier

        return load_digit_classifier(device=self.device, directory=directory)

    def score(self, samples, prompts, meta):
        x = samples.to(self.device, torch.float32) if isinstance(samples, Tensor) else samples
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: need images float [B, 1, 8, 8] in [0, 1]; got {type(samples).__name__}")
        d = _asked_digits(prompts, meta, self.digit_key, x.shape[0], self.device)
        logits = self.classifier(x)
        p = logits.softmax(-1).gather(1, d[:, None]).squeeze(1)
        score = p if self.saturate_at is None else (p / self.saturate_at).clamp_max(1.0)
        return {self.name: score, f"{self.name}/accuracy": (logits.argmax(-1) == d).float()}


@register_reward("digits_gaussian")
class DigitsGaussianReward(DigitsReward):
    """The digits reward of a second model family: the Gaussian generative classifier of
    ``pipelines/digits_gaussian.py`` (one Gaussian per digit in the top-``rank`` principal components of the reward
    split's pixels, covariance + ``ridge`` I), fitted in closed form on the CNN's own data, never the judge's.

    r_b = p_G(d_b | x_b) = softmax_d(-1/2 (z_b - mu_d)^T S_d^-1 (z_b - mu_d) - 1/2 log det S_d)[d_b], and part
    "<name>/accuracy" = 1[argmax = d_b]; images float [B, 1, 8, 8] in [0, 1]; ``saturate_at`` as for "digits".
    Differentiable in the images. Alone it is a weaker reader than the CNN; as the second member of a
    conservative ensemble (``ensemble`` with ``reduce: min``) it vetoes drawings the CNN is sure of but that
    look like no real digit of the class.
    """

    def __init__(self, *, rank: int = 20, ridge: float = 0.05, digit_key: str = "digit", device: Optional[str] = None,
                 name: Optional[str] = None, on_error: str = "raise", saturate_at: Optional[float] = None):
        self.rank, self.ridge = int(rank), float(ridge)
        super().__init__(digit_key=digit_key, device=device, name=name, on_error=on_error, saturate_at=saturate_at)

    def _load_classifier(self, directory: Optional[str]):
        from flowrl.pipelines.digits_gaussian import load_digit_gaussian

        return load_digit_gaussian(rank=self.rank, ridge=self.ridge, device=self.device)


@register_process_reward("digits_noisy")
class NoisyDigitsProcessReward:
    """The embedded noisy-digit classifier as a flow process reward (Euphonium's latent PRM; classifier
    guidance of Dhariwal & Nichol, 2021).

    r(x_t, sigma, cond) = log softmax(C(x_t, sigma))[d]  (``output="log_prob"``, default; its gradient is the
    classifier-guidance direction) or softmax(...)[d] (``output="prob"``), with d = cond[digit_key] long [B].
    x_t float [B, 1, 8, 8] (the model's latent scale [-1, 1] plus noise); sigma float [B]. Differentiable.
    """

    OUTPUTS = ("log_prob", "prob")

    def __init__(self, *, directory: Optional[str] = None, digit_key: str = "digit", output: str = "log_prob",
                 device: Optional[str] = None, name: str = "digits_noisy"):
        from flowrl.pipelines.digits import load_noisy_digit_classifier

        if output not in self.OUTPUTS:
            raise ValueError(f"digits_noisy: output={output!r} is not valid; valid values: {list(self.OUTPUTS)}")
        self.classifier = load_noisy_digit_classifier(device=torch.device(device or "cpu"), directory=directory)
        self.digit_key, self.output, self.name, self.differentiable = digit_key, output, name, True

    def __call__(self, x_t: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        if self.digit_key not in cond:
            raise KeyError(f"digits_noisy: cond has no {self.digit_key!r} (the asked digit, long [B]); keys: {sorted(cond)}")
        B = x_t.shape[0]
        d = torch.as_tensor(cond[self.digit_key], dtype=torch.long, device=x_t.device)
        if tuple(d.shape) != (B,):
            raise ValueError(f"digits_noisy: cond[{self.digit_key!r}] must be long [B] = ({B},); got {tuple(d.shape)}")
        sigma = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
        sigma = sigma.expand(B) if sigma.dim() == 0 else sigma
        logp = self.classifier(x_t, sigma).log_softmax(-1).gather(1, d[:, None]).squeeze(1)
        return _check_out(logp if self.output == "log_prob" else logp.exp(), B, self.name)


@register_process_reward("ode_completion")
class ODECompletionReward:
    """ODE-completion process reward (TP-GRPO): score the state x_t by the outcome reward of the sample the
    ODE reaches from it.

    R_t(x_t) = r(D(ODE_{sigma_t -> 0}(x_t)), prompt), with the Euler ODE x_{k+1} = x_k - (sigma_k - sigma_{k+1})
    v(x_k, sigma_k) of ``flowrl.flow.sampler.ode_complete`` over the schedule's remaining steps, D the
    pipeline's decode and r any outcome reward (its score part). Not differentiable (no autograd).

    pipeline: a FlowPipeline. reward: an outcome reward object, a registered name, or {"type": name, **options}.
    """

    def __init__(self, pipeline: Any, reward: Any, *, sigmas: Optional[Tensor] = None, cfg_scale: Optional[float] = None,
                 name: str = "ode_completion"):
        if isinstance(reward, str):
            reward = build_reward(reward)
        elif isinstance(reward, Mapping):
            opts = dict(reward)
            reward = build_reward(opts.pop("type"), **opts)
        if not callable(reward):
            raise TypeError(f"ode_completion: reward must be an outcome reward, a registered name or a spec; got {reward!r}")
        self.pipeline, self.reward, self.cfg_scale, self.name = pipeline, reward, cfg_scale, name
        self.differentiable = False
        self.sigmas = None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32)

    def _score(self, images: Tensor, prompts: Optional[Sequence[str]], meta) -> Tensor:
        B = images.shape[0]
        parts = self.reward(images, list(prompts) if prompts is not None else [""] * B, meta)
        key = getattr(self.reward, "name", None)
        if key not in parts:
            raise RewardError(f"ode_completion: the outcome reward gave no score part {key!r}; parts: {sorted(parts)}")
        return parts[key].float()

    def __call__(self, x_t: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], *, sigmas: Optional[Tensor] = None,
                 prompts: Optional[Sequence[str]] = None, meta: Optional[Mapping[str, Any]] = None) -> Tensor:
        """R_t for x_t [B, ...] at noise level sigma (float [B], one value, found in the schedule ``sigmas``
        float [K+1], default: the one given at construction). Returns float [B] (NaN where the outcome
        reward masks a sample)."""
        from flowrl.flow.sampler import ode_complete

        sigmas = self.sigmas if sigmas is None else sigmas
        if sigmas is None:
            raise ValueError("ode_completion: give the schedule sigmas (float [K+1]) at construction or in the call")
        sig = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
        sched = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
        if sig.numel() == 0 or not bool((sig == sig[0]).all()):
            raise ValueError(f"ode_completion: every sample must be at one sigma; got {sig.tolist()}")
        hit = (sched - sig[0]).abs() < 1e-6
        if not bool(hit.any()):
            raise ValueError(f"ode_completion: sigma {float(sig[0])} is not in the schedule {sched.tolist()}")
        start = int(hit.nonzero()[0, 0])
        images = ode_complete(self.pipeline, x_t, sched.to(x_t.device), dict(cond), start=start,
                              cfg_scale=self.cfg_scale, decode=True)
        return self._score(images, prompts, meta)

    def score_trajectory(self, trajectory: Any, steps: Optional[Sequence[int]] = None,
                         meta: Optional[Mapping[str, Any]] = None) -> Tensor:
        """float [B, K]: entry [b, k] = R of the ODE completion of the state after step k (latents[:, k + 1]),
        for k in ``steps`` (default: every step); NaN elsewhere (the ``step_reward`` convention).
        The state after the last step is the final sample itself (no ODE step left)."""
        from flowrl.flow.sampler import complete_with_ode

        B, K = trajectory.batch_size, trajectory.num_steps
        steps = range(K) if steps is None else list(steps)
        out = torch.full((B, K), float("nan"), dtype=torch.float32)
        for k in steps:  # one ODE completion per scored step (K is small)
            if not 0 <= int(k) < K:
                raise ValueError(f"ode_completion: step {k} outside [0, {K})")
            images = complete_with_ode(self.pipeline, trajectory, int(k) + 1, decode=True)
            out[:, int(k)] = self._score(images, trajectory.prompts, meta).cpu()
        return out
