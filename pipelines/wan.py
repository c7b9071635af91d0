"""Wan2.1 text-to-video as a flowrl ``FlowPipeline`` (Wan Team, 2025, "Wan: Open and Advanced Large-Scale Video
Generative Models"; flow matching with x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0).

Components as diffusers names them: ``transformer`` (WanTransformer3DModel), ``text_encoder`` (UMT5EncoderModel)
with ``tokenizer``, ``vae`` (AutoencoderKLWan: 4x temporal, 8x spatial compression, per-channel latent mean/std),
``scheduler`` (UniPCMultistepScheduler with ``use_flow_sigmas`` and ``flow_shift``, or FlowMatchEulerDiscreteScheduler).

Latents are video latents float [B, C, F', H', W'] with F' = (F - 1) / 4 + 1; ``decode`` returns frames
float [B, F, 3, H, W] in [0, 1]. Text: UMT5 states of the prompt with padding positions set to zero
(as diffusers trims to the prompt length and zero-pads). The transformer takes timestep = sigma * 1000.
"""
from __future__ import annotations

import html
import os
import re
from typing import Optional

import torch
from torch import Tensor, nn

from flowrl.flow.pipeline import Cond
from flowrl.pipelines.base import (DiffusersExport, FlowAdapterBase, NEGATIVE_PREFIX, cfg_velocity, check_cond, check_num_steps,
                                   check_xsigma, flow_sigmas, freeze, load_component, load_model_index, to_unit_range, require_path)
from flowrl.pipelines.registry import register_pipeline


def clean_prompt(text: str) -> str:
    """HTML-unescape and collapse whitespace (Wan's prompt cleaning, without the optional ftfy pass)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class WanPipeline(DiffusersExport, FlowAdapterBase):
    """Wan2.1 T2V through the ``FlowPipeline`` protocol.

    Cond keys: ``prompt_embeds`` float [B, L, D] (zeros past the prompt's tokens), with ``negative_prompt_embeds``
    under ``cfg=True``. Latents float [B, C, F', H', W'].
    """

    cond_keys = ("prompt_embeds",)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_loader_class = "WanPipeline"

    def __init__(self, transformer: nn.Module, scheduler, vae: nn.Module, *, text: tuple, height: int = 480,
                 width: int = 832, num_frames: int = 81, max_sequence_length: int = 512, negative_prompt: str = "",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.transformer, self.scheduler, self.vae = transformer, scheduler, vae
        self.text = tuple(text)
        self.dtype = dtype
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self.t_factor = int(getattr(vae.config, "scale_factor_temporal", 4))
        self.s_factor = int(getattr(vae.config, "scale_factor_spatial", 8))
        if (num_frames - 1) % self.t_factor:
            raise ValueError(f"num_frames - 1 must be divisible by the VAE's temporal factor {self.t_factor}, got {num_frames}")
        p = transformer.config.patch_size
        if height % (self.s_factor * p[1]) or width % (self.s_factor * p[2]):
            raise ValueError(f"height/width ({height}, {width}) must be multiples of {self.s_factor * p[1]}")
        self.height, self.width, self.num_frames = int(height), int(width), int(num_frames)
        freeze(vae, self.text[1])
        self.to(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, text_encoder_dtype: Optional[torch.dtype] = None,
                        vae_dtype: Optional[torch.dtype] = torch.float32, height: int = 480, width: int = 832,
                        num_frames: int = 81, max_sequence_length: int = 512, negative_prompt: str = "",
                        **hub_kwargs) -> "WanPipeline":
        """Load a Wan2.1 T2V diffusers repo (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` or a local directory).
        The VAE stays float32 by default, as diffusers recommends for Wan."""
        index = load_model_index(path, **hub_kwargs)
        return cls(load_component(path, index, "transformer", dtype=dtype, **hub_kwargs),
                   load_component(path, index, "scheduler", **hub_kwargs),
                   load_component(path, index, "vae", dtype=vae_dtype or dtype, **hub_kwargs),
                   text=(load_component(path, index, "tokenizer", **hub_kwargs),
                         load_component(path, index, "text_encoder", dtype=text_encoder_dtype or dtype, **hub_kwargs)),
                   height=height, width=width, num_frames=num_frames, max_sequence_length=max_sequence_length,
                   negative_prompt=negative_prompt, device=device, dtype=dtype)

    def to(self, device: str | torch.device) -> "WanPipeline":
        self.device = torch.device(device)
        for m in (self.transformer, self.vae, self.text[1]):
            m.to(self.device)
        return self

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        tok, enc = self.text
        t = tok([clean_prompt(s) for s in texts], padding="max_length", max_length=self.max_sequence_length,
                truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = t.input_ids.to(self.device), t.attention_mask.to(self.device)
        h = enc(ids, mask).last_hidden_state
        return (h * mask.unsqueeze(-1).to(h.dtype)).to(self.dtype)

    def encode_prompts(self, prompts: list[str], *, cfg: bool = False, negative_prompt: Optional[str | list[str]] = None) -> Cond:
        """Cond: prompt_embeds [B, L, D] (UMT5 states, zero past each prompt); ``negative_prompt_embeds`` with cfg."""
        texts, b = self.prompt_texts(prompts, cfg=cfg, negative_prompt=negative_prompt)
        emb = self._encode(texts)
        cond = {"prompt_embeds": emb[:b]}
        if cfg:
            cond[NEGATIVE_PREFIX + "prompt_embeds"] = emb[b:]
        return cond

    def _forward(self, x: Tensor, sigma: Tensor, c: dict[str, Tensor]) -> Tensor:
        t = sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps
        return self.denoiser(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=c["prompt_embeds"],
                                return_dict=False)[0]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.transformer.config.in_channels, (self.num_frames - 1) // self.t_factor + 1,
                self.height // self.s_factor, self.width // self.s_factor)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, *, cfg_scale: Optional[float] = None) -> Tensor:
        """v(x, sigma, cond) on video latents [B, C, F', H', W']; ``sigma`` float [B]; batched CFG with ``cfg_scale``."""
        if x.dim() != 5 or x.shape[1] != self.transformer.config.in_channels:
            raise ValueError(f"x must be video latents float [B, {self.transformer.config.in_channels}, F', H', W'], "
                             f"got {tuple(x.shape)}")
        sigma = check_xsigma(x, sigma)
        check_cond(cond, self.cond_keys, x.shape[0], cfg_scale=cfg_scale)
        return cfg_velocity(self._forward, x, sigma, cond, self.cond_keys, cfg_scale, self.cfg_grad)

    def initial_noise(self, batch_size: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """eps float [B, C, F', H', W'] (diffusers' ``randn_tensor``, as WanPipeline draws it)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((batch_size, *self.latent_shape), generator=generator, device=self.device,
                            dtype=torch.float32).to(self.dtype)

    def sigmas(self, num_steps: int) -> Tensor:
        """float [num_steps + 1] from 1 to 0: the flow-sigma grid with the scheduler's ``flow_shift`` (UniPC) or the
        FlowMatchEuler scheduler's own ``set_timesteps`` grid."""
        check_num_steps(num_steps)
        cfg = self.scheduler.config
        if cfg.get("use_flow_sigmas", False):
            return flow_sigmas(num_steps, cfg.get("flow_shift", 1.0), num_train_timesteps=cfg.num_train_timesteps)
        if hasattr(self.scheduler, "sigmas") and type(self.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            self.scheduler.set_timesteps(num_steps)
            return self.scheduler.sigmas.to(torch.float32).clone()
        raise ValueError(f"scheduler {type(self.scheduler).__name__} has no flow-matching sigma schedule "
                         "(use UniPCMultistepScheduler(use_flow_sigmas=True) or FlowMatchEulerDiscreteScheduler)")

    def decode(self, x: Tensor) -> Tensor:
        """Video latents [B, C, F', H', W'] -> frames float [B, F, 3, H, W] in [0, 1] (z * std + mean, VAE decode);
        ``decode_batch`` latents per VAE call."""
        return self.decode_in_chunks(x, self._decode)

    def _decode(self, x: Tensor) -> Tensor:
        cfg = self.vae.config
        view = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=x.device, dtype=torch.float32).view(view)
        std = torch.tensor(cfg.latents_std, device=x.device, dtype=torch.float32).view(view)
        z = (x.float() * std + mean).to(self.vae.dtype)
        video = self.vae.decode(z, return_dict=False)[0].float()  # [B, 3, F, H, W] in [-1, 1]
        return to_unit_range(video.permute(0, 2, 1, 3, 4))


@register_pipeline("wan", family="flow")
def load_wan(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options) -> WanPipeline:
    """Wan2.1 text-to-video from ``path`` (a hub id or a local diffusers directory); ``options`` go to ``WanPipeline.from_pretrained``
    (``flow.model_kwargs``)."""
    return WanPipeline.from_pretrained(require_path("wan", path), device=device, dtype=dtype, **options)
