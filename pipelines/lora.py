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


def save_lora(transformer: nn.Module, directory: str | os.PathLike, loader_class: str,
              state: Optional[dict] = None) -> None:
    """Save the transformer's LoRA weights with the diffusers pipeline class ``loader_class`` (its ``save_lora_weights``).

    state: the transformer's whole state dict to take the LoRA weights from (gathered from an FSDP-sharded
    transformer); default the transformer's own."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    if not getattr(transformer, "_hf_peft_config_loaded", False):
        raise ValueError("the transformer has no LoRA adapter to save (call add_lora first)")
    state = get_peft_model_state_dict(transformer, state_dict=state)
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


PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # the file peft's save_pretrained writes
_PREFIXES = ("base_model.model.", "transformer.")


def _strip(key: str) -> str:
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key


def lora_file(path: str | os.PathLike) -> "os.PathLike":
    """The weights file of a LoRA at ``path``: a ``.safetensors`` file, or a directory holding diffusers'
    ``pytorch_lora_weights.safetensors`` or peft's ``adapter_model.safetensors``; FileNotFoundError otherwise."""
    from pathlib import Path

    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return p
    for name in (LORA_WEIGHT_NAME, PEFT_WEIGHT_NAME):
        if (p / name).is_file():
            return p / name
    raise FileNotFoundError(f"no LoRA at {p}: expected a .safetensors file or a directory holding {LORA_WEIGHT_NAME} "
                            f"(diffusers) or {PEFT_WEIGHT_NAME} (peft)")


def _saved_rank_alpha(f) -> tuple[Optional[int], Optional[float]]:
    """(r, lora_alpha) recorded with a LoRA file: diffusers' safetensors metadata or peft's adapter_config.json."""
    import json

    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as st:
        meta = (st.metadata() or {}).get("lora_adapter_metadata")
    cfg = json.loads(meta) if meta else None
    if isinstance(cfg, dict):  # diffusers prefixes each key with the component ("transformer.lora_alpha")
        cfg = {k.split(".", 1)[-1]: v for k, v in cfg.items()}
    if cfg is None and (f.parent / "adapter_config.json").is_file():
        cfg = json.loads((f.parent / "adapter_config.json").read_text())
    return (cfg.get("r"), cfg.get("lora_alpha")) if isinstance(cfg, dict) else (None, None)


def load_lora_into(model: nn.Module, path: str | os.PathLike, *, adapter_name: str = "default") -> int:
    """Copy a saved LoRA (diffusers' or peft's format) into ``model``'s existing adapter ``adapter_name`` (made by
    ``add_lora`` / ``get_peft_model`` with the same rank, alpha and target modules), so training continues from it.

    Keys are matched after dropping the ``transformer.`` (diffusers) and ``base_model.model.`` (peft) prefixes. A
    ValueError names what does not match: keys the model lacks or misses, another rank (tensor shapes) or another
    alpha (recorded metadata). Returns the number of tensors loaded.
    """
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    f = lora_file(path)
    saved = {_strip(k): v for k, v in load_file(str(f)).items()}
    own = {_strip(k): k for k in get_peft_model_state_dict(model, adapter_name=adapter_name)}
    if not own:
        raise ValueError(f"lora.init_from: the model has no LoRA adapter {adapter_name!r} to load {f} into")
    extra, missing = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
    if extra or missing:
        raise ValueError(f"lora.init_from={str(path)!r} does not match the model's LoRA (lora.target_modules): "
                         f"{len(extra)} of its tensors are not in the model (e.g. {extra[:3]}), {len(missing)} of the "
                         f"model's are not in it (e.g. {missing[:3]})")
    ref = get_peft_model_state_dict(model, adapter_name=adapter_name)
    for k, v in saved.items():
        if tuple(v.shape) != tuple(ref[own[k]].shape):
            raise ValueError(f"lora.init_from={str(path)!r}: {k} has shape {tuple(v.shape)}, the model's adapter "
                             f"{tuple(ref[own[k]].shape)}; set lora.rank to the adapter's rank")
    r, alpha = _saved_rank_alpha(f)
    cfg = model.peft_config[adapter_name]
    if alpha is not None and float(alpha) != float(cfg.lora_alpha):
        raise ValueError(f"lora.init_from={str(path)!r} was trained with lora_alpha={alpha} (rank {r}); the config has "
                         f"lora.alpha={cfg.lora_alpha}: set lora.alpha={alpha} so the adapter computes what it did")
    result = set_peft_model_state_dict(model, {own[k]: v for k, v in saved.items()}, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"lora.init_from={str(path)!r}: the model did not take {result.unexpected_keys[:3]}")
    return len(saved)
