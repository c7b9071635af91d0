"""Shared plumbing of the flow-model adapters: component loading, input checks, batched CFG, LoRA.

Every adapter implements ``flowrl.flow.pipeline.FlowPipeline``. Conventions (Lipman et al., 2023, "Flow
Matching for Generative Modeling"; Esser et al., 2024, "Scaling Rectified Flow Transformers", SD3):
sigma in [0, 1] runs from 1 (noise) to 0 (data), x_sigma = (1 - sigma) * x0 + sigma * eps, and the network
predicts v = eps - x0. Classifier-free guidance (Ho & Salimans, 2022): v = v_u + w * (v_c - v_u), with both
branches in one batched forward pass ordered [uncond, cond] as diffusers does.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from flowrl.flow.pipeline import Cond

NEGATIVE_PREFIX = "negative_"


def load_model_index(path: str | os.PathLike, **hub_kwargs) -> dict[str, Any]:
    """``model_index.json`` of a diffusers repo (local directory or hub id), read with diffusers' own loader."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(str(path), **hub_kwargs))


def load_component(path: str | os.PathLike, index: dict[str, Any], name: str, *, dtype: Optional[torch.dtype] = None,
                   required: bool = True, **hub_kwargs):
    """Load component ``name`` of a diffusers repo with the class ``model_index.json`` names for it.

    Returns None where the index lists no such component (or lists it as ``[null, null]``) and it is optional.
    Models are loaded with ``from_pretrained(path, subfolder=name, torch_dtype=dtype)``; tokenizers and
    schedulers with ``from_pretrained(path, subfolder=name)``.
    """
    entry = index.get(name)
    if entry is None or entry[0] is None or entry[1] is None:
        if required:
            present = sorted(k for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[0])
            raise ValueError(f"{path!s}: model_index.json has no component {name!r} (present: {present})")
        return None
    library, class_name = entry
    module = importlib.import_module(library)
    cls = getattr(module, class_name)
    kwargs = dict(subfolder=name, **hub_kwargs)
    if isinstance(cls, type) and issubclass(cls, nn.Module) and dtype is not None:
        kwargs["torch_dtype"] = dtype
    return cls.from_pretrained(str(path), **kwargs)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Optional ``flowrl_pipeline.json`` beside ``model_index.json`` (adapter settings such as pixel-space decode).

    Only read from local directories; hub repos of the real models have none and get the diffusers defaults.
    """
    p = Path(path) / "flowrl_pipeline.json"
    if p.is_file():
        return json.loads(p.read_text())
    return {}


def check_xsigma(x: Tensor, sigma: Tensor) -> Tensor:
    """Validate ``sigma`` (float [B] or scalar, in [0, 1]) against ``x`` [B, ...]; return it as float [B]."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.dim() != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or float [B] with B = x.shape[0] = {x.shape[0]}; got shape {tuple(sigma.shape)}")
    if not torch.is_floating_point(sigma):
        raise TypeError(f"sigma must be a float tensor, got {sigma.dtype}")
    if bool(((sigma < 0) | (sigma > 1)).any()):
        raise ValueError(f"sigma must lie in [0, 1] (1 = noise, 0 = data); got min {float(sigma.min())}, max {float(sigma.max())}")
    return sigma


def check_cond(cond: Cond, keys: Sequence[str], batch: int, *, cfg_scale: Optional[float]) -> None:
    """Every key in ``keys`` (and its ``negative_`` twin when ``cfg_scale`` is set) is present with batch ``batch``."""
    need = list(keys) + ([NEGATIVE_PREFIX + k for k in keys] if cfg_scale is not None else [])
    missing = [k for k in need if k not in cond]
    if missing:
        hint = " (encode the prompts with cfg=True to use cfg_scale)" if cfg_scale is not None else ""
        raise KeyError(f"conditioning lacks {missing}{hint}; it has {sorted(cond)}")
    for k in need:
        if cond[k].shape[0] != batch:
            raise ValueError(f"cond[{k!r}] has batch {cond[k].shape[0]}, x has batch {batch}")


# How the gradient flows through classifier-free guidance (the value is the same for both):
# "both": through both branches; "cond_only": the unconditional branch is detached.
CFG_GRADS = ("both", "cond_only")


def check_cfg_grad(cfg_grad: str) -> None:
    if cfg_grad not in CFG_GRADS:
        raise ValueError(f"cfg_grad={cfg_grad!r}; valid values are {CFG_GRADS}")


def cfg_velocity(forward: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], x: Tensor, sigma: Tensor, cond: Cond,
                 keys: Sequence[str], cfg_scale: Optional[float], cfg_grad: str = "both") -> Tensor:
    """v = forward(x, sigma, cond) or, with ``cfg_scale`` w, v_u + w (v_c - v_u) from one batched call [uncond; cond].

    ``forward(x [N, ...], sigma [N], c)`` takes ``c`` = {key: tensor [N, ...]} for ``keys``.
    ``cfg_grad`` sets the gradient, never the value: "both" (default) backpropagates through both branches,
    dv = w dv_c - (w - 1) dv_u, the exact gradient of the guided velocity the sampler used; "cond_only" detaches
    the unconditional branch, dv = w dv_c, as one version of Flow-GRPO's training recompute does (reference:
    yifan123/flow_grpo/scripts/train_sd3.py ``compute_log_prob``, ``noise_pred_uncond.detach()`` in the July 2025
    revision; its later train_sd3.py, train_sd3_fast.py and train_wan2_1.py, and TP-GRPO's
    scripts/my_train_sd3_fast.py, backpropagate through both).
    """
    check_cfg_grad(cfg_grad)
    if cfg_scale is None:
        return forward(x, sigma, {k: cond[k] for k in keys})
    both = {k: torch.cat([cond[NEGATIVE_PREFIX + k], cond[k]], dim=0) for k in keys}
    v = forward(torch.cat([x, x], dim=0), torch.cat([sigma, sigma], dim=0), both)
    v_u, v_c = v.chunk(2, dim=0)
    if cfg_grad == "cond_only":
        v_u = v_u.detach()
    return v_u + cfg_scale * (v_c - v_u)


def flow_sigmas(num_steps: int, shift: float = 1.0, *, num_train_timesteps: int = 1000) -> Tensor:
    """sigma_k = s u_k / (1 + (s - 1) u_k) over u = linspace(1, 1/N_train, num_steps + 1)[:-1], then 0 appended.

    The time shift of SD3 (Esser et al., 2024, eq. 23) applied to the flow-sigma grid of diffusers' UniPC scheduler
    (the Wan2.1 default). Returns float [num_steps + 1], from 1 to 0.
    """
    u = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    s = shift * u / (1 + (shift - 1) * u)
    return torch.cat([torch.as_tensor(s, dtype=torch.float32), torch.zeros(1)])


def require_path(adapter: str, path: Optional[str | os.PathLike]) -> str:
    """``path`` as a string; an adapter without shipped weights needs one (a hub id or a local directory)."""
    if path is None:
        raise ValueError(f"model adapter {adapter!r} needs a model path (flow.model_path or --model-path: a hub id or "
                         "a local diffusers directory)")
    return str(path)


def check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")


def freeze(*modules: Optional[nn.Module]) -> None:
    """Switch frozen components (text encoders, VAE) to eval mode without gradients."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False)
            m.eval()


def to_unit_range(images: Tensor) -> Tensor:
    """Model pixels in [-1, 1] to [0, 1], clamped (diffusers' ``denormalize``)."""
    return (images / 2 + 0.5).clamp(0, 1)


class FlowAdapterBase:
    """What every adapter shares: device/dtype, the trainable transformer, LoRA through peft, and the trainer's
    half of the ``FlowPipeline`` protocol (forward module, weight swaps, export) for a network that is one
    ``transformer`` module called through :attr:`denoiser`."""

    transformer: nn.Module
    device: torch.device
    dtype: torch.dtype
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_loader_class: str = ""

    # The trainer sets this to the DDP/FSDP-wrapped transformer so that forward passes synchronise gradients;
    # attribute reads (``config``) still go to ``transformer``.
    forward_module: Optional[nn.Module] = None
    # The gradient through classifier-free guidance in ``velocity`` (see ``cfg_velocity``); the trainer sets it
    # for its log-prob recompute with ``cfg_gradient``.
    cfg_grad: str = "both"
    # Latents decoded per VAE call (0: all at once); a 512x512 VAE decode's activations grow with the batch, so
    # the trainer sets it from flow.decode_batch. Each sample is decoded independently of the others, so chunks
    # give the same images (up to the last bits of batch-size-dependent kernels).
    decode_batch: int = 0

    def decode_in_chunks(self, x: Tensor, decode_one: Callable[[Tensor], Tensor]) -> Tensor:
        """``decode_one`` over rows of ``x`` in chunks of :attr:`decode_batch`, concatenated on the batch dim."""
        n = int(self.decode_batch)
        if n <= 0 or x.shape[0] <= n:
            return decode_one(x)
        return torch.cat([decode_one(x[i:i + n]) for i in range(0, x.shape[0], n)], dim=0)

    @property
    def trainable(self) -> nn.Module:
        """The transformer (with its LoRA adapter once ``add_lora`` was called)."""
        return self.transformer

    def prompt_texts(self, prompts: list[str], *, cfg: bool, negative_prompt=None) -> tuple[list[str], int]:
        """The texts to encode for ``prompts`` (B of them): the prompts, then with ``cfg`` their negative prompts
        (``negative_prompt``: one string, or one per prompt; default the adapter's). Returns (texts, B)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a non-empty list of strings")
        texts, b = list(prompts), len(prompts)
        if cfg:
            neg = negative_prompt if negative_prompt is not None else self.negative_prompt
            neg = [neg] * b if isinstance(neg, str) else list(neg)
            if len(neg) != b:
                raise ValueError(f"{len(neg)} negative prompts for {b} prompts")
            texts += neg
        return texts, b

    @property
    def denoiser(self) -> nn.Module:
        """The module the forward pass calls: the wrapped transformer while training, else the transformer."""
        return self.forward_module if self.forward_module is not None else self.transformer

    def add_lora(self, rank: int = 32, alpha: Optional[float] = None, *, target_modules: Optional[Sequence[str]] = None,
                 dropout: float = 0.0, init_lora_weights: bool | str = True, adapter_name: str = "default") -> nn.Module:
        """Add a LoRA adapter (Hu et al., 2021: W x + (alpha / r) B A x, B initialised to 0) to the transformer.

        Uses peft through diffusers' ``add_adapter``, so the adapted model is still the diffusers class and its LoRA
        saves in diffusers' format (``save_lora``). Only the LoRA parameters require gradients afterwards.
        """
        from flowrl.pipelines.lora import add_lora

        return add_lora(self.transformer, rank=rank, alpha=alpha,
                        target_modules=tuple(target_modules or self.default_lora_targets), dropout=dropout,
                        init_lora_weights=init_lora_weights, adapter_name=adapter_name)

    def save_lora(self, directory: str | os.PathLike, *, state: Optional[dict[str, Tensor]] = None) -> None:
        """Write the transformer's LoRA in diffusers' format (``pipe.load_lora_weights(directory)`` reads it);
        ``state``: the whole state dict to take it from (an FSDP-sharded transformer's, gathered)."""
        from flowrl.pipelines.lora import save_lora

        save_lora(self.transformer, directory, self.lora_loader_class, state=state)

    def load_lora(self, directory: str | os.PathLike, *, adapter_name: str = "trained") -> None:
        """Load the LoRA that :meth:`save_lora` wrote into ``directory`` and make it the active adapter."""
        from flowrl.pipelines.lora import LORA_WEIGHT_NAME

        f = Path(directory) / LORA_WEIGHT_NAME
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (a LoRA directory written by save_lora holds it)")
        self.transformer.load_lora_adapter(str(directory), weight_name=LORA_WEIGHT_NAME, prefix="transformer",
                                           adapter_name=adapter_name)
        self.transformer.set_adapters(adapter_name)

    # ------------------------------------------------------------------ the trainer's half of the protocol
    def set_forward_module(self, module: Optional[nn.Module]) -> None:
        """Forward passes go through ``module`` (the DDP/FSDP-wrapped transformer, so that gradients synchronise)."""
        self.forward_module = module

    @contextlib.contextmanager
    def using_weights(self, module: nn.Module):
        """Forward passes run ``module`` (e.g. the frozen reference copy) in place of the transformer, unwrapped."""
        if module is None:
            raise ValueError("using_weights: no module given (the reference copy exists only when the run needs one)")
        trained, fwd = self.transformer, self.forward_module
        self.transformer, self.forward_module = module, None
        try:
            yield self
        finally:
            self.transformer, self.forward_module = trained, fwd

    @contextlib.contextmanager
    def cfg_gradient(self, cfg_grad: str):
        """Inside the block, ``velocity`` with a ``cfg_scale`` backpropagates as ``cfg_grad`` says ("both" or
        "cond_only", see :func:`cfg_velocity`); the value of the velocity does not change."""
        check_cfg_grad(cfg_grad)
        old, self.cfg_grad = self.cfg_grad, cfg_grad
        try:
            yield self
        finally:
            self.cfg_grad = old

    @contextlib.contextmanager
    def lora_disabled(self):
        """Forward passes run the base model: the transformer's LoRA adapters are disabled inside the context."""
        self.transformer.disable_adapters()
        try:
            yield self
        finally:
            self.transformer.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        if not hasattr(self.transformer, "enable_gradient_checkpointing"):
            raise ValueError(f"gradient_checkpointing: {type(self.transformer).__name__} does not support it")
        self.transformer.enable_gradient_checkpointing()

    def save_weights(self, path: str | os.PathLike) -> None:
        """The transformer's full weights as one safetensors file."""
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.transformer.state_dict().items()}, str(path))

    def load_weights(self, path: str | os.PathLike) -> None:
        """Full weights written by :meth:`save_weights` into the transformer (strict: every key must match)."""
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} is missing (a weights file written by save_weights)")
        self.transformer.load_state_dict(load_file(str(path)), strict=True)


class DiffusersExport:
    """Mixin of the adapters whose ``transformer`` is a diffusers model: a full fine-tune exports in diffusers'
    ``save_pretrained`` layout (the optional ``flowrl.flow.pipeline.SavesPretrained`` ability)."""

    transformer: nn.Module
    dtype: torch.dtype

    def save_pretrained(self, directory: str | os.PathLike, *, state: Optional[dict[str, Tensor]] = None) -> None:
        """The trained transformer in diffusers' ``save_pretrained`` layout: ``config.json`` and
        ``diffusion_pytorch_model.safetensors`` (sharded with an index above 10 GB), so
        ``<TransformerClass>.from_pretrained(directory)`` loads it, and a diffusers pipeline takes it as
        ``Pipeline.from_pretrained(base_model, transformer=...)``. Only the transformer is written: the text
        encoders and the VAE are the base model's, unchanged.

        state: the whole state dict to write (gathered from the shards of an FSDP-sharded transformer); default
        the transformer's own ``state_dict()``.
        """
        from huggingface_hub import save_torch_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.transformer.save_config(str(directory))
        state = state if state is not None else self.transformer.state_dict()
        save_torch_state_dict({k: v.detach().contiguous() for k, v in state.items()}, str(directory),
                              filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")

    def load_pretrained(self, directory: str | os.PathLike) -> None:
        """Weights written by :meth:`save_pretrained` into the transformer (strict: every key must match)."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"no transformer export at {directory} (config.json missing; save_pretrained "
                                    "writes it)")
        saved = type(self.transformer).from_pretrained(str(directory), torch_dtype=self.dtype)
        self.transformer.load_state_dict(saved.state_dict(), strict=True)
