"""The protocol every LLM adapter implements (the generic transformers causal LM and the embedded models).

The LLM task talks to a model only through these methods, so it never reaches into a peft wrapper, a vLLM
engine or a tokenizer's save format. Adapters live in ``pipelines/`` (``flowrl.pipelines``) and are found by
name in ``flowrl.pipelines.registry.PIPELINES`` (family ``"llm"``);
``flowrl.pipelines.causal_lm.CausalLMPipeline`` implements this protocol for any transformers causal LM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from .generate import Generation


@runtime_checkable
class LLMPipeline(Protocol):
    """A causal LM seen as a policy over tokens."""

    model: nn.Module  # what RL updates (a peft model under LoRA)
    tokenizer: Any  # left padding, a pad token

    def generate(self, prompts: Any, *, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Generation:
        """Sample (``temperature > 0``) or decode greedily (``temperature = 0``) one completion per prompt."""
        ...

    def decode(self, gen: Generation) -> list[str]:
        """Completion texts (EOS and padding dropped)."""
        ...

    @property
    def external_sampler(self) -> bool:
        """Whether another engine (vLLM) samples: its log-probs then differ from the trainer's recompute."""
        ...

    def sync_sampler(self) -> None:
        """Copy the trained weights into the external sampler (a no-op without one)."""
        ...

    @property
    def is_lora(self) -> bool:
        """Whether ``model`` carries LoRA adapters (the reference policy is then the model without them)."""
        ...

    def adapters_disabled(self) -> ContextManager[nn.Module]:
        """The model with its LoRA adapters disabled (the reference policy), inside a ``with`` block."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass."""
        ...

    def export(self, out_dir: Path) -> None:
        """Save the trained weights: the adapters under ``out_dir/lora``, or the model and its tokenizer
        under ``out_dir/model`` (safetensors)."""
        ...

    def load_export(self, out_dir: Path) -> None:
        """Load what :meth:`export` wrote into ``out_dir`` into ``model``."""
        ...
