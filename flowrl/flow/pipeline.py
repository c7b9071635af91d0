"""The one protocol every flow model adapter implements (SD3/SD3.5, FLUX.1, Wan2.1, digits).

The sampler, the guidance and the trainer only ever talk to a model through this protocol, so the
flow side of flowrl knows no diffusers class. Adapters live in ``pipelines/`` (``flowrl.pipelines``), where
``FlowAdapterBase`` implements the training half for any adapter whose network is one ``transformer`` module.

Optional abilities are detected through their own protocols (``isinstance``), never by a model's name:
``PromptDefaults`` (a default training prompt set), ``OwnEvaluation`` (a model-specific fixed evaluation,
e.g. the digits model's judge and realism scores) and ``OwnReport`` (what the report checks from it).

Conventions (shared with ``flowrl.flow.sde``): sigma runs from 1 (noise) to 0 (data);
x_sigma = (1 - sigma) * x0 + sigma * eps; the model predicts v ~= eps - x0.

Conditioning (``Cond``) is a dict of batch-first tensors (prompt embeddings, pooled embeddings,
attention masks, digit labels, ...). The sampler indexes and repeats it generically with
``cond_select`` / ``cond_repeat``; only the adapter knows what the keys mean.
"""
from __future__ import annotations

from typing import Any, ContextManager, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

Cond = dict[str, Tensor]


@runtime_checkable
class FlowPipeline(Protocol):
    """A flow-matching generator seen as a policy over denoising steps."""

    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: list[str], *, cfg: bool = False) -> Cond:
        """Conditioning for ``prompts`` (batch-first tensors). With ``cfg`` it also holds what
        ``velocity`` needs for the unconditional branch (negative-prompt embeddings)."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, *, cfg_scale: Optional[float] = None) -> Tensor:
        """v(x, sigma, cond), shaped like ``x``; ``sigma`` float [B] in [0, 1]. With ``cfg_scale`` (and a
        cond encoded with ``cfg=True``): v_u + cfg_scale * (v_c - v_u), both branches in one batched call."""
        ...

    def initial_noise(self, batch_size: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Latent noise eps ~ N(0, I) of the model's latent shape: [B, C, H, W] (images) or
        [B, C, F, H, W] (video), or the packed layout the model consumes."""
        ...

    def sigmas(self, num_steps: int) -> Tensor:
        """float [num_steps + 1], from 1 down to 0, with the model's timestep shift applied."""
        ...

    def decode(self, x: Tensor) -> Tensor:
        """Final latents to pixels in [0, 1]: images float [B, C, H, W], video float [B, F, C, H, W]."""
        ...

    @property
    def trainable(self) -> nn.Module:
        """The module that RL updates (the transformer, with LoRA adapters when added)."""
        ...

    # ------------------------------------------------------------------ what the trainer needs (not the sampler)
    def set_forward_module(self, module: Optional[nn.Module]) -> None:
        """Run forward passes through ``module`` (the DDP/FSDP-wrapped ``trainable``; None: ``trainable`` itself).
        Attribute reads (a model's config) still go to ``trainable``."""
        ...

    def using_weights(self, module: nn.Module) -> ContextManager[Any]:
        """Inside the context, forward passes run ``module`` (a network of ``trainable``'s architecture, e.g. the
        frozen copy of the initial weights) in place of ``trainable``; everything is restored on exit."""
        ...

    def lora_disabled(self) -> ContextManager[Any]:
        """Inside the context, forward passes run with the LoRA adapters disabled (the base model)."""
        ...

    def add_lora(self, rank: int, alpha: Optional[float] = None, *,
                 target_modules: Optional[Sequence[str]] = None) -> nn.Module:
        """Add a LoRA adapter to ``trainable`` (only its parameters train afterwards); returns ``trainable``."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Recompute ``trainable``'s activations in the backward pass; an error when the network cannot."""
        ...

    def save_lora(self, directory: Any) -> None:
        """Write the LoRA adapter in diffusers' format (``DiffusionPipeline.load_lora_weights(directory)`` reads it)."""
        ...

    def load_lora(self, directory: Any) -> None:
        """Load and activate a LoRA written by ``save_lora`` (after ``add_lora`` or on the base model)."""
        ...

    def save_weights(self, path: Any) -> None:
        """Write ``trainable``'s full weights as one safetensors file."""
        ...

    def load_weights(self, path: Any) -> None:
        """Load full weights written by ``save_weights`` into ``trainable`` (every key must match)."""
        ...


@runtime_checkable
class PromptDefaults(Protocol):
    """Optional: an adapter that knows its own training prompts (the digits model: the ten digits)."""

    def default_prompts(self) -> list[str]: ...


@runtime_checkable
class OwnEvaluation(Protocol):
    """Optional: an adapter with its own fixed evaluation, used instead of scoring samples with the run's rewards.

    ``evaluate(num_per_prompt=, seed=, guidance=, **sample_options)`` returns metrics that include ``reward``;
    ``sample_options`` are :func:`flowrl.flow.sampler.sample`'s (num_steps, kind, noise_level, cfg_scale).
    """

    def evaluate(self, *, num_per_prompt: int, seed: int, guidance: Any = None, **sample_options: Any) -> dict[str, float]: ...


@runtime_checkable
class OwnReport(Protocol):
    """Optional: what the run's report shows and checks from the adapter's own evaluation metrics.

    ``report_plan()`` returns ``{"metrics": [metric names, in the order shown and plotted], "checks": [names of
    checks registered in flowrl.train.report.REPORT_CHECKS]}`` (the digits model: judge, realism, diversity).
    """

    def report_plan(self) -> dict[str, list[str]]: ...


@runtime_checkable
class SavesPretrained(Protocol):
    """Optional: an adapter whose full fine-tune exports in its library's ``from_pretrained`` layout (diffusers'
    ``save_pretrained``: ``config.json`` + safetensors) instead of ``save_weights``' single file.

    ``save_pretrained(directory, state=None)`` writes ``trainable`` (``state``: a whole state dict to write in its
    place, gathered from an FSDP-sharded model); ``load_pretrained(directory)`` reads it back into ``trainable``.
    """

    def save_pretrained(self, directory: Any, *, state: Optional[dict[str, Tensor]] = None) -> None: ...

    def load_pretrained(self, directory: Any) -> None: ...


def cond_select(cond: Cond, index: Tensor) -> Cond:
    """Rows ``index`` of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def cond_repeat(cond: Cond, n: int) -> Cond:
    """Each row repeated ``n`` times in place (row i -> rows i*n .. i*n+n-1): one prompt, n samples."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}
