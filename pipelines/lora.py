"""LoRA on the flow transformers through peft (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

W' x = W x + (alpha / r) * B A x with A [r, d_in] random and B [d_out, r] zero at start, so the adapted model
starts equal to the base model. peft injects the layers; diffusers' ``add_adapter`` keeps the model's class so
the reference policy is the same module with the adapter disabled (``disable_adapters``).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes


def add_lora(transformer: nn.Module, *, rank: int = 32, alpha: Optional[float] = None,
             target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"), dropout: float = 0.0,
             init_lora_weights: bool | str = True, adapter_name: str = "default") -> nn.Module:
    """Inject a LoRA adapter of rank ``rank`` (alpha defaults to 2 * rank) into ``target_modules``; freeze the base.

    Returns the same module; only LoRA parameters require gradients.
    """
    from peft import LoraConfig

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if not hasattr(transformer, "add_adapter"):
        raise TypeError(f"{type(transformer).__name__} has no add_adapter (a diffusers model with PeftAdapterMixin is needed)")
    names = {n for n, _ in transformer.named_modules()}
    found = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise ValueError(f"none of the LoRA target modules {list(target_modules)} exist in {type(transformer).__name__}")
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else 2 * rank), lora_dropout=dropout,
                        init_lora_weights=init_lora_weights, target_modules=list(found))
    transformer.add_adapter(config, adapter_name=adapter_name)
    return transformer


def save_lora(transformer: nn.Module, directory: str | os.PathLike, loader_class: str) -> None:
    """Save the transformer's LoRA weights with the diffusers pipeline class ``loader_class`` (its ``save_lora_weights``)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(transformer, "_hf_peft_config_loaded", False):
        raise ValueError("the transformer has no LoRA adapter to save (call add_lora first)")
    state = get_peft_model_state_dict(transformer)
    cls = getattr(diffusers, loader_class)
    # the adapter's config (rank, alpha, targets) travels as safetensors metadata, so the loader uses alpha / r
    metadata = transformer.peft_config["default"].to_dict()
    cls.save_lora_weights(str(directory), transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)


def upcast_trainable(module: nn.Module) -> int:
    """Cast every trainable parameter of ``module`` that is not fp32 to fp32, in place; returns how many were cast.

    Under LoRA over a bf16/fp16 base the adapters then train in fp32 (their optimiser state too) while the frozen
    base stays in its dtype; peft casts a layer's input to its LoRA weights' dtype and the result back. Flow-GRPO
    does the same (diffusers' ``cast_training_params``; reference: yifan123/flow_grpo/scripts/train_sd3.py); fp16
    parameters would also make accelerate's GradScaler refuse to unscale their gradients.
    """
    import torch

    n = 0
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            n += 1
    return n
