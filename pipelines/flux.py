"""FLUX.1 as a flowrl ``FlowPipeline`` (Black Forest Labs, 2024; rectified flow transformer as in Esser et al., 2024).

Components as diffusers names them: ``transformer`` (FluxTransformer2DModel), ``text_encoder`` (CLIP-L,
``CLIPTextModel``: only its pooled output is used) with ``tokenizer``, ``text_encoder_2`` (T5) with ``tokenizer_2``,
``vae`` (AutoencoderKL, 16 channels, scaling and shift factors), ``scheduler`` (FlowMatchEulerDiscreteScheduler with
resolution-dependent shift: mu = a * seq_len + b from the scheduler's base/max shift).

Latents are packed as FLUX consumes them: the VAE latent [B, C, h, w] is cut into 2x2 patches and flattened to
[B, (h/2)(w/2), 4C]; ``latent_image_ids`` [(h/2)(w/2), 3] hold each patch's (0, row, col). FLUX.1-dev is
guidance-distilled: ``guidance_scale`` (default 3.5) enters the transformer's guidance embedding; ``cfg_scale``
in ``velocity`` adds true CFG with a negative prompt on top (both branches batched). The transformer takes
timestep = sigma (it multiplies by 1000 itself) and guidance as given (also multiplied by 1000 inside).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from flowrl.flow.pipeline import Cond
from flowrl.pipelines.base import (DiffusersExport, FlowAdapterBase, NEGATIVE_PREFIX, cfg_velocity, check_cond, check_num_steps,
                                   check_xsigma, freeze, load_component, load_model_index, to_unit_range, require_path)
from flowrl.pipelines.registry import register_pipeline

FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2", "proj_mlp", "proj_out")


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches flattened as (channel, dy, dx), row-major over patches."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack_latents``: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, n, c4 = packed.shape
    if n != (h // 2) * (w // 2) or c4 % 4:
        raise ValueError(f"packed latents {tuple(packed.shape)} do not match a {h}x{w} latent")
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h2: int, w2: int, device=None, dtype=torch.float32) -> Tensor:
    """float [h2 * w2, 3]: (0, row, col) of every packed patch (FLUX's RoPE positions of the image tokens)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def flux_mu(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Resolution-dependent shift: mu = base_shift + (max_shift - base_shift) (L - L_base) / (L_max - L_base)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + base_shift - m * base_seq_len


class FluxPipeline(DiffusersExport, FlowAdapterBase):
    """FLUX.1 through the ``FlowPipeline`` protocol.

    Cond keys: ``prompt_embeds`` float [B, L, 4096], ``pooled_prompt_embeds`` float [B, 768] (and ``negative_`` twins
    with ``cfg=True``). Latents: packed float [B, (h/2)(w/2), 4C] with h = 2 * (height // (2 f)), f the VAE factor.
    """

    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_lora_targets = FLUX_LORA_TARGETS
    lora_loader_class = "FluxPipeline"

    def __init__(self, transformer: nn.Module, scheduler, vae: nn.Module, *, clip: tuple, t5: tuple,
                 height: int = 1024, width: int = 1024, max_sequence_length: int = 512, guidance_scale: float = 3.5,
                 negative_prompt: str = "", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.transformer, self.scheduler, self.vae = transformer, scheduler, vae
        self.clip, self.t5 = tuple(clip), tuple(t5)
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        self.latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        if self.latent_h < 2 or self.latent_w < 2:
            raise ValueError(f"height/width ({height}, {width}) too small for VAE factor {self.vae_scale_factor} and 2x2 packing")
        self.height, self.width = self.latent_h * self.vae_scale_factor, self.latent_w * self.vae_scale_factor
        self.tokenizer_max_length = getattr(self.clip[0], "model_max_length", 77)
        freeze(vae, self.clip[1], self.t5[1])
        self.to(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, text_encoder_dtype: Optional[torch.dtype] = None,
                        height: int = 1024, width: int = 1024, max_sequence_length: int = 512,
                        guidance_scale: float = 3.5, negative_prompt: str = "", **hub_kwargs) -> "FluxPipeline":
        """Load a FLUX.1 diffusers repo (``black-forest-labs/FLUX.1-dev`` or a local directory) component by component."""
        index = load_model_index(path, **hub_kwargs)
        ted = text_encoder_dtype or dtype
        return cls(load_component(path, index, "transformer", dtype=dtype, **hub_kwargs),
                   load_component(path, index, "scheduler", **hub_kwargs),
                   load_component(path, index, "vae", dtype=dtype, **hub_kwargs),
                   clip=(load_component(path, index, "tokenizer", **hub_kwargs),
                         load_component(path, index, "text_encoder", dtype=ted, **hub_kwargs)),
                   t5=(load_component(path, index, "tokenizer_2", **hub_kwargs),
                       load_component(path, index, "text_encoder_2", dtype=ted, **hub_kwargs)),
                   height=height, width=width, max_sequence_length=max_sequence_length,
                   guidance_scale=guidance_scale, negative_prompt=negative_prompt, device=device, dtype=dtype)

    def to(self, device: str | torch.device) -> "FluxPipeline":
        self.device = torch.device(device)
        for m in (self.transformer, self.vae, self.clip[1], self.t5[1]):
            m.to(self.device)
        self.image_ids = latent_image_ids(self.latent_h // 2, self.latent_w // 2, self.device, self.dtype)
        return self

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        tok, enc = self.clip
        ids = tok(texts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        pooled = enc(ids, output_hidden_states=False).pooler_output
        tok2, enc2 = self.t5
        ids2 = tok2(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device)
        emb = enc2(ids2, output_hidden_states=False)[0]
        return emb.to(self.dtype), pooled.to(self.dtype)

    def encode_prompts(self, prompts: list[str], *, cfg: bool = False, negative_prompt: Optional[str | list[str]] = None) -> Cond:
        """Cond: prompt_embeds (T5) [B, L, D], pooled_prompt_embeds (CLIP pooled) [B, D_pool]; ``negative_*`` with cfg."""
        texts, b = self.prompt_texts(prompts, cfg=cfg, negative_prompt=negative_prompt)
        emb, pooled = self._encode(texts)
        cond = {"prompt_embeds": emb[:b], "pooled_prompt_embeds": pooled[:b]}
        if cfg:
            cond[NEGATIVE_PREFIX + "prompt_embeds"], cond[NEGATIVE_PREFIX + "pooled_prompt_embeds"] = emb[b:], pooled[b:]
        return cond

    def _forward(self, x: Tensor, sigma: Tensor, c: dict[str, Tensor]) -> Tensor:
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance_scale, device=x.device, dtype=torch.float32)
        txt_ids = torch.zeros(c["prompt_embeds"].shape[1], 3, device=x.device, dtype=self.dtype)
        return self.denoiser(hidden_states=x.to(self.dtype), timestep=sigma.to(self.dtype), guidance=guidance,
                                pooled_projections=c["pooled_prompt_embeds"], encoder_hidden_states=c["prompt_embeds"],
                                txt_ids=txt_ids, img_ids=self.image_ids, return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, *, cfg_scale: Optional[float] = None) -> Tensor:
        """v(x, sigma, cond) on packed latents [B, N, 4C]; ``sigma`` float [B]; true CFG with ``cfg_scale``."""
        n, c4 = (self.latent_h // 2) * (self.latent_w // 2), self.transformer.config.in_channels
        if x.dim() != 3 or tuple(x.shape[1:]) != (n, c4):
            raise ValueError(f"x must be packed latents float [B, {n}, {c4}], got {tuple(x.shape)}")
        sigma = check_xsigma(x, sigma)
        check_cond(cond, self.cond_keys, x.shape[0], cfg_scale=cfg_scale)
        return cfg_velocity(self._forward, x, sigma, cond, self.cond_keys, cfg_scale, self.cfg_grad)

    def initial_noise(self, batch_size: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Packed eps [B, N, 4C], drawn as diffusers' FluxPipeline does (unpacked [B, C, h, w] noise, then packed)."""
        from diffusers.utils.torch_utils import randn_tensor

        c = self.transformer.config.in_channels // 4
        eps = randn_tensor((batch_size, c, self.latent_h, self.latent_w), generator=generator, device=self.device,
                           dtype=self.dtype)
        return pack_latents(eps)

    def sigmas(self, num_steps: int) -> Tensor:
        """float [num_steps + 1]: linspace(1, 1/N, N) through the scheduler's (resolution-dependent) shift, then 0."""
        check_num_steps(num_steps)
        cfg = self.scheduler.config
        mu = flux_mu((self.latent_h // 2) * (self.latent_w // 2), cfg.get("base_image_seq_len", 256),
                     cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return self.scheduler.sigmas.to(torch.float32).clone()

    def decode(self, x: Tensor) -> Tensor:
        """Packed latents -> images float [B, 3, H, W] in [0, 1] (unpack, / scaling + shift, VAE decode);
        ``decode_batch`` latents per VAE call."""
        return self.decode_in_chunks(x, self._decode)

    def _decode(self, x: Tensor) -> Tensor:
        z = unpack_latents(x, self.latent_h, self.latent_w).to(self.vae.dtype)
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return to_unit_range(self.vae.decode(z, return_dict=False)[0].float())


@register_pipeline("flux", family="flow")
def load_flux(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              **options) -> FluxPipeline:
    """FLUX.1 from ``path`` (a hub id or a local diffusers directory); ``options`` go to ``FluxPipeline.from_pretrained``
    (``flow.model_kwargs``)."""
    return FluxPipeline.from_pretrained(require_path("flux", path), device=device, dtype=dtype, **options)
