"""Token trajectories: batched generation with per-token log-probs and entropies, and their recompute.

A completion is a trajectory whose actions are tokens. :func:`generate` samples completions for a
left-padded batch of prompts through ``model.generate`` (transformers) and returns, for every
sampled token ``y_t``, the behaviour log-prob and the entropy of the step's distribution:

    pi_tau(. | y_<t) = softmax(z_t / tau),    logp_t = log pi_tau(y_t | y_<t),
    H_t = -sum_v pi_tau(v) log pi_tau(v) = logsumexp(z / tau) - sum_v pi_tau(v) z_v / tau,

where ``z_t`` are the model's output logits (``output_logits=True``: the raw logits, before any
logits processor) and ``tau`` the temperature (1 for greedy decoding, whose action is the argmax).
:func:`token_logprobs` recomputes the same quantity teacher-forced, with position ids from the
attention mask's cumsum as during generation, so that with unchanged weights the ratio
``exp(logp_new - logp_old)`` is 1 up to float error (tested within 1e-5 in float32).

Top-k / top-p. With truncation the sampler draws from ``pi_S(v) = pi_tau(v) / Z_S`` on the kept set
``S`` (``Z_S`` the kept mass), not from ``pi_tau``. ``logp`` stays the log-prob under ``pi_tau`` (what
the trainer recomputes and differentiates, ratio 1 at unchanged weights); the behaviour policy's own
log-prob ``log pi_S(y_t) = logp_t - log Z_S`` is returned separately as ``sampler_logp`` (from the
processed scores), so an off-policy correction ``w = pi_tau / pi_S = Z_S <= 1`` can be applied with
:func:`flowrl.core.importance_weights` (a ratio against ``sampler_logp`` would otherwise carry a spurious
``log Z_S``). Without truncation ``sampler_logp`` is None.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Generation:
    """A batch of sampled completions (``B`` prompts padded on the left to ``P``, completions to ``T``).

    prompt_ids: long [B, P], left-padded; prompt_mask: bool [B, P].
    completion_ids: long [B, T]; positions after the stop are the pad id.
    completion_mask: bool [B, T]; True on generated tokens up to and including the first EOS.
    logp: float32 [B, T]; log pi_tau(y_t) of each sampled token; 0 off the mask.
    entropy: float32 [B, T] or None; entropy of pi_tau at each step; 0 off the mask (None from a
        backend that cannot see the full distribution, e.g. vLLM).
    truncated: bool [B]; True where the completion hit the length limit without EOS.
    sampler_logp: float32 [B, T] or None; log-prob under the truncated (top-k/top-p) sampling
        distribution when it differs from ``logp``; 0 off the mask.
    temperature: the tau used (1.0 for greedy).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    logp: Tensor
    entropy: Optional[Tensor]
    truncated: Tensor
    sampler_logp: Optional[Tensor] = None
    temperature: float = 1.0

    @property
    def input_ids(self) -> Tensor:
        """long [B, P + T]: prompt and completion side by side (the recompute's input)."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """long [B, P + T]: 1 on real prompt tokens and on completion tokens up to the stop."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()

    @property
    def lengths(self) -> Tensor:
        """long [B]: completion lengths (EOS included)."""
        return self.completion_mask.sum(dim=1)


def _eos_ids(model, eos_token_id) -> list[int]:
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        raise ValueError("generate: no eos_token_id given and none in the model's generation/model config")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def stop_mask(completion_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """bool [B, T]: True up to and including the first EOS of each row (every token if none).

    mask_t = (number of EOS strictly before t) == 0, by an exclusive cumsum (no loop over tokens).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    before = is_eos.long().cumsum(dim=1) - is_eos.long()
    return before == 0


def _logp_entropy(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log softmax(z / tau)[y] and the entropy of softmax(z / tau); logits [..., V], tokens [...]."""
    z = logits.float() / temperature
    logz = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logz
    p = torch.softmax(z, dim=-1)
    ent = logz - (p * z).sum(dim=-1)
    return logp, ent


# generation_config fields whose logits processors have no neutral non-None value: generate() cannot
# switch them off for one call, and they would make the sampler's distribution differ from softmax(z / tau).
_UNSUPPORTED = ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "min_p", "top_h",
                "watermarking_config")


def _refuse_processors(model) -> None:
    gc = getattr(model, "generation_config", None)
    bad = [k for k in _UNSUPPORTED if gc is not None and getattr(gc, k, None) is not None]
    if gc is not None and getattr(gc, "min_length", None) not in (None, 0):
        bad.append("min_length")
    if bad:
        raise ValueError(
            f"generate: the model's generation_config sets {bad}, logits processors that change the sampling "
            "distribution and would bias the log-probs; set them to None in model.generation_config"
        )


def _check_prompts(input_ids: Tensor, attention_mask: Tensor) -> None:
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, P]"
        )
    am = attention_mask.bool()
    if bool((~am[:, -1]).any()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] is 0 for some row (right padding?)")
    if bool((am[:, 1:].long() - am[:, :-1].long() < 0).any()):
        raise ValueError("prompts must be left-padded: attention_mask has a 0 after a 1 in some row")


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int | Sequence[int]] = None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    with_entropy: bool = True,
) -> Generation:
    """Sample completions for left-padded prompts; see the module docstring for the formulas.

    input_ids, attention_mask: long [B, P], left-padded. ``temperature`` 0 means greedy decoding
    (log-probs and entropies then use tau = 1). ``top_k`` / ``top_p`` truncate sampling (see the
    module docstring for what that does to the ratio). Stops on any EOS id or after
    ``max_new_tokens``. ``generator`` seeds sampling: its next 63-bit draw seeds torch's global RNG for
    the call, which is restored afterwards. Returns a :class:`Generation` whose tensors are on the
    input's device (``logp``/``entropy`` in float32).
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; must be >= 1")
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature}; must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k}; must be >= 1 or None (no truncation)")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p={top_p}; must lie in (0, 1] or be None")
    _check_prompts(input_ids, attention_mask)
    eos = _eos_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0]
    greedy = temperature == 0
    truncating = not greedy and ((top_k is not None) or (top_p is not None and top_p < 1.0))
    _refuse_processors(model)
    # transformers fills every None field from the model's generation_config and then from global
    # defaults (top_k=50!): every sampling knob is set explicitly to its neutral value here.
    # (Greedy decoding adds no sampling warpers, so their knobs are left unset there.)
    sampling = {} if greedy else dict(
        temperature=float(temperature), top_k=(top_k if truncating and top_k else 0),
        top_p=(top_p if truncating and top_p is not None else 1.0), typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0,
    )
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=not greedy, num_beams=1, **sampling,
        repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        guidance_scale=1.0, renormalize_logits=False, remove_invalid_values=False,
        eos_token_id=eos, pad_token_id=int(pad),
        output_logits=True, output_scores=truncating, return_dict_in_generate=True,
    )
    state = None
    if generator is not None:
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(seed)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=cfg)
    finally:
        if state is not None:
            torch.random.set_rng_state(state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
    P = input_ids.shape[1]
    comp = out.sequences[:, P:]
    mask = stop_mask(comp, eos)
    comp = torch.where(mask, comp, torch.full_like(comp, int(pad)))
    tau = 1.0 if greedy else float(temperature)
    logits = torch.stack(out.logits, dim=1)  # [B, T, V], raw
    logp, ent = _logp_entropy(logits, comp, tau)
    zero = torch.zeros((), device=logp.device)
    logp = torch.where(mask, logp, zero)
    ent = torch.where(mask, ent, zero) if with_entropy else None
    sampler_logp = None
    if truncating:
        scores = torch.stack(out.scores, dim=1).float()  # processed: /tau, then -inf outside the kept set
        s_logp = scores.gather(-1, comp.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scores, dim=-1)
        sampler_logp = torch.where(mask, s_logp, zero)
    is_eos = torch.isin(comp, torch.tensor(eos, device=comp.device)) & mask
    truncated = ~is_eos.any(dim=1)
    return Generation(
        prompt_ids=input_ids, prompt_mask=attention_mask.bool(), completion_ids=comp, completion_mask=mask,
        logp=logp, entropy=ent, truncated=truncated, sampler_logp=sampler_logp, temperature=tau,
    )


def token_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Teacher-forced log-probs of the completion tokens: the recompute of :func:`generate`'s ``logp``.

    input_ids, attention_mask: [B, P + T], a left-padded prompt followed by the completion (as
    ``Generation.input_ids`` / ``.attention_mask``); completion_mask: bool [B, T], aligned with the
    last ``T`` columns. Position ids are ``cumsum(attention_mask) - 1`` (clamped at 0), as during
    generation. logp_t = log softmax(z_{t-1} / tau)[y_t], where z_{t-1} are the logits at the
    position before token t. Returns float [B, T] (0 off the mask), keeping the graph for training;
    with ``with_entropy`` also the entropy float [B, T] of softmax(z / tau).
    """
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"token_logprobs: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be [B, P + T]"
        )
    if completion_mask.dim() != 2 or completion_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"token_logprobs: completion_mask has shape {tuple(completion_mask.shape)}; expected [B, T] with "
            f"B = {input_ids.shape[0]}"
        )
    B, L = input_ids.shape
    T = completion_mask.shape[1]
    if not (1 <= T < L):
        raise ValueError(f"token_logprobs: completion width T={T} must satisfy 1 <= T < P + T = {L}")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature={temperature}; must be > 0 (use 1 for greedy samples)")
    am = attention_mask.long()
    position_ids = (am.cumsum(dim=-1) - 1).clamp(min=0)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = T + 1  # only the positions that predict completion tokens
    logits = model(input_ids=input_ids, attention_mask=am, position_ids=position_ids, use_cache=False, **kwargs).logits
    logits = logits[:, -(T + 1) : -1]
    tokens = input_ids[:, -T:]
    logp, ent = _logp_entropy(logits, tokens, float(temperature))
    mask = completion_mask.bool()
    zero = torch.zeros((), device=logp.device, dtype=logp.dtype)
    logp = torch.where(mask, logp, zero)
    if with_entropy:
        return logp, torch.where(mask, ent, zero)
    return logp
