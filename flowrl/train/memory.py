"""The memory per rank of a training run, estimated without loading a weight (``flowrl train --dry-run`` prints
it): ``estimate_memory(cfg, world_size=None) -> MemoryEstimate``, every field in bytes.

:func:`estimate_memory` reads each sub-model's ``config.json`` (a diffusers repo's ``model_index.json`` lists them)
from the local folder or the cache and builds the model on the ``meta`` device (no storage), so the parameter
counts and the LoRA shapes are the model's own:

- parameters: every loaded sub-model in its dtype (``flow.dtype``; ``flow.model_kwargs.text_encoder_dtype`` /
  ``vae_dtype`` where given), plus the LoRA adapters: ``r * (d_in + d_out)`` per adapted ``nn.Linear``;
- gradients: one per trainable parameter, in its dtype;
- optimiser state: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype (2 x 4 bytes per fp32
  parameter); ``adamw_8bit`` 2 bytes per parameter;
- reference: a frozen copy of the trained module when the algorithm needs a reference and LoRA is off (under LoRA
  the reference is the base with the adapter disabled: no copy); EMA: a copy of the trainable parameters;
- activations of one micro-batch, a ROUGH figure: ``34 * h * n * L`` bytes at 16 bits (fp32: twice) for ``L``
  blocks of width ``h`` over ``n`` tokens (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large
  Transformer Models", eq. 1 without the attention-score term that fused attention does not store); with gradient
  checkpointing ``2 * h * n * L`` (each block's input) plus one block. LLMs add the logits, ``n * V * (e + 4)``.

Buffers, CUDA context, allocator fragmentation and an algorithm's own extras (a critic, PRIME's implicit PRM)
are not counted.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from flowrl.train.model_check import ModelNotLocal, PreflightError, family, model_dir, model_ref

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LLM_PROMPT_TOKENS = 256  # assumed prompt length of the LLM activation estimate (the data is not tokenised here)


@dataclass
class ComponentSize:
    name: str
    params: int  # parameter count
    bytes: int
    dtype: str


@dataclass
class MemoryEstimate:
    """Bytes per rank. ``params`` holds every parameter (LoRA adapters included); ``trainable`` is the part of it
    that trains; ``total`` sums the terms that occupy memory at once."""

    params: int = 0
    trainable: int = 0
    trainable_params: int = 0
    gradients: int = 0
    optimizer: int = 0
    reference: int = 0
    ema: int = 0
    activations: int = 0
    components: list[ComponentSize] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    complete: bool = True  # False: a config was missing, the figures leave that part out

    @property
    def total(self) -> int:
        return self.params + self.gradients + self.optimizer + self.reference + self.ema + self.activations


# --------------------------------------------------------------------------------------------- meta models
def _elsize(dtype: str) -> int:
    return DTYPE_BYTES[str(dtype).replace("torch.", "")]


def _meta_model(root: Path, sub: Optional[str], library: str, class_name: str):
    """``class_name`` of ``library`` built from ``root/sub/config.json`` on the meta device (no storage)."""
    import importlib

    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    where = root / sub if sub else root
    with init_empty_weights():
        if hasattr(cls, "load_config"):  # diffusers ModelMixin
            return cls.from_config(cls.load_config(str(where)))
        config = cls.config_class.from_pretrained(str(where))
        model = cls(config)
    if hasattr(model, "tie_weights"):  # from_pretrained ties shared embeddings (T5's); counted once, as loaded
        model.tie_weights()
    return model


def _module_sizes(model, dtype: str) -> tuple[int, int]:
    n = sum(p.numel() for p in model.parameters())
    return n, n * _elsize(dtype)


def _lora_params(model, targets, rank: int, *, all_linear: bool) -> int:
    """LoRA parameters peft adds: ``r * (d_in + d_out)`` per ``nn.Linear`` whose name is a target or ends with
    ``.target`` (``all_linear``: every Linear but the output head, peft's ``all-linear``)."""
    from torch import nn

    total = 0
    out_emb = model.get_output_embeddings() if all_linear and hasattr(model, "get_output_embeddings") else None
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        hit = (m is not out_emb) if all_linear else any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            total += rank * (m.in_features + m.out_features)
    return total


def _component_dtype(name: str, cfg) -> str:
    kw = cfg.flow.model_kwargs
    if name.startswith("text_encoder") and kw.get("text_encoder_dtype"):
        return str(kw["text_encoder_dtype"]).replace("torch.", "")
    if name == "vae" and kw.get("vae_dtype"):
        return str(kw["vae_dtype"]).replace("torch.", "")
    return cfg.flow.dtype


def _trainable_terms(est: MemoryEstimate, cfg, module, dtype: str, default_targets, *, llm: bool) -> None:
    """Trainable parameters, gradients, optimiser state, reference copy and EMA of ``module`` (meta)."""
    from flowrl.train.algorithms import ALGORITHMS

    n_base, b_base = _module_sizes(module, dtype)
    if cfg.lora.enabled:
        targets = list(cfg.lora.target_modules) or list(default_targets)
        n = _lora_params(module, targets, cfg.lora.rank, all_linear=targets == ["all-linear"])
        if n == 0:
            raise PreflightError(f"lora.target_modules={targets}: no nn.Linear of the trained model matches")
        # peft's get_peft_model (LLMs) upcasts 16-bit adapters to fp32; diffusers' add_adapter keeps the base
        # dtype unless lora.fp32_params asks for fp32
        fp32 = llm or bool(getattr(cfg.lora, "fp32_params", False))
        e = 4 if fp32 else _elsize(dtype)
        est.params += n * e
        est.trainable_params, est.trainable = n, n * e
    else:
        est.trainable_params, est.trainable, e = n_base, b_base, _elsize(dtype)
    est.gradients = est.trainable
    name = getattr(cfg.optim, "name", "adamw")
    per_param = OPTIMIZER_STATE_BYTES.get(name)
    if per_param is None:
        per_param = OPTIMIZER_STATE_BYTES["adamw"]
        est.notes.append(f"optim.name={name!r}: state size unknown here, counted as AdamW's")
    est.optimizer = est.trainable_params * per_param(e)
    if ALGORITHMS[cfg.algorithm].needs_reference(cfg) and not cfg.lora.enabled:
        est.reference = b_base
    if cfg.ema.enabled:
        est.ema = est.trainable


# bytes of optimiser state per trainable parameter, given the parameter's element size
OPTIMIZER_STATE_BYTES = {
    "adamw": lambda e: 2 * e,  # exp_avg, exp_avg_sq like the parameter (torch.optim.AdamW)
    "adamw_8bit": lambda e: 2,  # both moments block-quantised to 8 bits (bitsandbytes)
}


def _activations(h: int, tokens: int, blocks: int, e: int, checkpointing: bool) -> int:
    per_block = 34 * h * tokens * e // 2
    if checkpointing:
        return 2 * h * tokens * e // 2 * blocks + per_block
    return per_block * blocks


def _width_and_blocks(config: dict) -> tuple[Optional[int], int]:
    h = config.get("hidden_size") or config.get("d_model")
    if h is None and config.get("num_attention_heads") and config.get("attention_head_dim"):
        h = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = sum(int(config.get(k) or 0) for k in ("num_layers", "num_single_layers", "num_hidden_layers"))
    return h, blocks


def world_size_of(world_size: Optional[int]) -> int:
    return int(world_size or os.environ.get("WORLD_SIZE", "1"))


def _micro_batch(cfg, world: int) -> int:
    b = cfg.prompts_per_iter * cfg.group_size // max(world, 1) // cfg.minibatches
    return max(1, b)


# --------------------------------------------------------------------------------------------- estimate
def estimate_memory(cfg, *, world_size: Optional[int] = None) -> MemoryEstimate:
    """Memory per rank of the run ``cfg`` (a :class:`~flowrl.train.config.TrainConfig`), in bytes; see the module
    docstring for each term. ``world_size`` (default ``$WORLD_SIZE`` or 1) splits the batch. A model given by
    no path (an adapter's own weights) or not local yields an estimate with ``complete=False`` and a note;
    PreflightError when the model cannot be used at all."""
    fam = family(cfg)
    est = MemoryEstimate()
    ref, key, how = model_ref(cfg)
    if ref is None:
        est.complete = False
        est.notes.append(f"{key}: the adapter's own shipped weights (small); not estimated")
        return est
    index = "model_index.json" if fam == "flow" else "config.json"
    try:
        root = model_dir(ref, index, key, how)
    except ModelNotLocal as e:
        est.complete = False
        est.notes.append(str(e))
        return est
    world = world_size_of(world_size)
    if fam == "flow":
        _flow_estimate(est, cfg, root, world)
    else:
        _llm_estimate(est, cfg, root, world)
    return est


def _flow_estimate(est: MemoryEstimate, cfg, root: Path, world: int) -> None:
    import importlib

    from torch import nn

    from flowrl.pipelines.registry import PIPELINES

    index = json.loads((root / "model_index.json").read_text())
    trained = "transformer" if "transformer" in index else "unet"
    configs: dict[str, dict] = {}
    for name, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers")):
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1], None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue  # tokenizers, schedulers
        if not (root / name / "config.json").is_file():
            est.complete = False
            est.notes.append(f"{name}: its config.json is not local; the estimate needs it (download the model)")
            continue
        model = _meta_model(root, name, *entry)
        dtype = _component_dtype(name, cfg)
        n, b = _module_sizes(model, dtype)
        est.components.append(ComponentSize(name, n, b, dtype))
        est.params += b
        configs[name] = json.loads((root / name / "config.json").read_text())
        if name == trained:
            adapter = PIPELINES[cfg.flow.model] if cfg.flow.model in PIPELINES else None
            defaults = _default_lora_targets(adapter)
            _trainable_terms(est, cfg, model, dtype, defaults, llm=False)
    if trained not in configs:
        est.complete = False
        return
    tc, fc = configs[trained], cfg.flow
    h, blocks = _width_and_blocks(tc)
    tokens = _flow_tokens(tc, configs.get("vae", {}), fc.model_kwargs)
    if h is None or not blocks or tokens is None:
        est.notes.append("activations: the transformer's width, depth or token count is not in its config; not estimated")
        return
    steps = len(range(*fc.sde_window)) if fc.sde_window else fc.num_steps
    steps = max(1, int(round(fc.timestep_fraction * steps)))
    chunk_steps = min(fc.steps_per_backward or steps, steps)
    b = fc.micro_batch or _micro_batch(cfg, world)
    cfg_mult = 2 if fc.cfg_scale is not None else 1
    e = 2 if (cfg.mixed_precision != "no" or fc.dtype != "float32") else 4
    est.activations = _activations(h, tokens * b * chunk_steps * cfg_mult, blocks, e, cfg.gradient_checkpointing)
    est.notes.append(f"activations (rough): {blocks} blocks x width {h} x {tokens} tokens x {b} samples x "
                     f"{chunk_steps} steps per backward{' x 2 (CFG)' if cfg_mult == 2 else ''}; text tokens of joint "
                     "attention not counted")


def _default_lora_targets(adapter) -> tuple:
    """The adapter class's ``default_lora_targets`` (read from the loader's return annotation), else q/k/v/out."""
    import typing

    try:
        cls = typing.get_type_hints(adapter).get("return") if adapter is not None else None
    except Exception:
        cls = None
    return tuple(getattr(cls, "default_lora_targets", ("to_q", "to_k", "to_v", "to_out.0")))


def _flow_tokens(tc: dict, vae: dict, kw: dict) -> Optional[int]:
    """Transformer tokens per sample: latent elements / (in_channels x patch volume)."""
    if "block_out_channels" in vae:
        f = 2 ** (len(vae["block_out_channels"]) - 1)
    elif "temperal_downsample" in vae:
        f = 2 ** len(vae["temperal_downsample"])
    else:
        return None
    c_lat = vae.get("latent_channels") or vae.get("z_dim")
    p = tc.get("patch_size") or 1
    p_vol = p * p if isinstance(p, int) else int(__import__("math").prod(p))
    size = (tc.get("sample_size") or 64) * f
    hgt, wid = int(kw.get("height") or size), int(kw.get("width") or size)
    frames = 1
    if "num_frames" in kw and "temperal_downsample" in vae:
        t = 2 ** sum(bool(x) for x in vae["temperal_downsample"])
        frames = (int(kw["num_frames"]) - 1) // t + 1
    if not c_lat or not tc.get("in_channels"):
        return None
    return int(c_lat * frames * (hgt // f) * (wid // f) // (tc["in_channels"] * p_vol))


def _llm_estimate(est: MemoryEstimate, cfg, root: Path, world: int) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(str(root))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # tied input / output embeddings count once, as from_pretrained loads them
    dtype = cfg.llm.dtype
    n, b = _module_sizes(model, dtype)
    est.components.append(ComponentSize("model", n, b, dtype))
    est.params = b
    _trainable_terms(est, cfg, model, dtype, ("all-linear",), llm=True)
    c = config.to_dict()
    h, blocks = _width_and_blocks(c)
    text = c.get("text_config") or {}
    h, blocks = h or _width_and_blocks(text)[0], blocks or _width_and_blocks(text)[1]
    vocab = c.get("vocab_size") or text.get("vocab_size")
    if h is None or not blocks or not vocab:
        est.notes.append("activations: width, depth or vocabulary not in config.json; not estimated")
        return
    rows = _micro_batch(cfg, world)
    tokens = rows * (LLM_PROMPT_TOKENS + cfg.llm.max_new_tokens)
    e = 2 if (cfg.mixed_precision != "no" or dtype != "float32") else 4
    est.activations = _activations(h, tokens, blocks, e, cfg.gradient_checkpointing) + tokens * vocab * (e + 4)
    est.notes.append(f"activations (rough): {blocks} blocks x width {h} x {rows} rows x ({LLM_PROMPT_TOKENS} prompt "
                     f"tokens assumed + {cfg.llm.max_new_tokens} new) + logits over {vocab} tokens")
