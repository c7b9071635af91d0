"""Stable Diffusion 3 / 3.5 as a flowrl ``FlowPipeline`` (Esser et al., 2024, "Scaling Rectified Flow Transformers
for High-Resolution Image Synthesis").

Components as diffusers names them: ``transformer`` (SD3Transformer2DModel), ``text_encoder`` / ``text_encoder_2``
(CLIP-L / CLIP-G, ``CLIPTextModelWithProjection``) with ``tokenizer`` / ``tokenizer_2``, ``text_encoder_3`` (T5)
with ``tokenizer_3``, ``vae`` (AutoencoderKL) and ``scheduler`` (FlowMatchEulerDiscreteScheduler, whose ``shift``
gives the sigma schedule sigma' = s sigma / (1 + (s - 1) sigma)).

Prompt conditioning, as in SD3: the CLIP encoders' penultimate hidden states are concatenated on features
[B, 77, 768 + 1280], zero-padded to the joint attention width, and concatenated on the sequence with the T5
states [B, L_t5, 4096] (zeros when T5 is absent); the pooled embedding is the concatenation of the CLIP
projections [B, 768 + 1280]. The transformer takes timestep = sigma * num_train_timesteps (= sigma * 1000).

The same class drives the embedded digits model: a model directory whose ``flowrl_pipeline.json`` says
``"decode": "pixel"`` has no VAE (pixels in [-1, 1] are the latents), and ``"max_sequence_length": 0`` appends
no T5 tokens when there is no T5 encoder.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from flowrl.flow.pipeline import Cond
from flowrl.pipelines.base import (DiffusersExport, FlowAdapterBase, NEGATIVE_PREFIX, cfg_velocity, check_cond, check_num_steps,
                                   check_xsigma, freeze, load_component, load_model_index, read_adapter_config,
                                   to_unit_range, require_path)
from flowrl.pipelines.registry import register_pipeline

SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class SD3Pipeline(DiffusersExport, FlowAdapterBase):
    """SD3 / SD3.5 (or the pixel-space digits model) seen through the ``FlowPipeline`` protocol.

    Cond keys: ``prompt_embeds`` float [B, L, D_joint], ``pooled_prompt_embeds`` float [B, D_pool] (and the
    ``negative_`` twins with ``cfg=True``). Latents: float [B, C, H / f, W / f] (f = VAE scale factor, 1 in pixel space).
    """

    cond_keys = ("prompt_embeds", "pooled_prompt_embeds")
    default_lora_targets = SD3_LORA_TARGETS
    lora_loader_class = "StableDiffusion3Pipeline"

    def __init__(self, transformer: nn.Module, scheduler, *, clip: Sequence[tuple] = (), t5: Optional[tuple] = None,
                 vae: Optional[nn.Module] = None, height: Optional[int] = None, width: Optional[int] = None,
                 max_sequence_length: int = 256, negative_prompt: str = "", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, prompt_labeler: Optional[Callable[[list[str]], dict[str, Tensor]]] = None):
        if not clip:
            raise ValueError("SD3Pipeline needs at least one (tokenizer, CLIP text encoder) pair")
        self.transformer = transformer
        self.scheduler = scheduler
        self.clip = [tuple(p) for p in clip]
        self.t5 = tuple(t5) if t5 is not None else None
        self.vae = vae
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self.prompt_labeler = prompt_labeler
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        size = transformer.config.sample_size * self.vae_scale_factor
        self.height = int(height or size)
        self.width = int(width or size)
        if self.height % (self.vae_scale_factor * transformer.config.patch_size) or self.width % (self.vae_scale_factor * transformer.config.patch_size):
            raise ValueError(f"height/width ({self.height}, {self.width}) must be multiples of "
                             f"VAE factor x patch size = {self.vae_scale_factor * transformer.config.patch_size}")
        self.tokenizer_max_length = getattr(self.clip[0][0], "model_max_length", 77)
        freeze(vae, *(enc for _, enc in self.clip), self.t5[1] if self.t5 else None)
        self.to(self.device)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, text_encoder_dtype: Optional[torch.dtype] = None,
                        height: Optional[int] = None, width: Optional[int] = None,
                        max_sequence_length: Optional[int] = None, negative_prompt: str = "",
                        load_t5: bool = True, **hub_kwargs) -> "SD3Pipeline":
        """Load an SD3 / SD3.5 diffusers repo (hub id such as ``stabilityai/stable-diffusion-3.5-medium`` or a local
        directory) with each component's ``from_pretrained``. ``load_t5=False`` skips the T5 encoder (zeros instead,
        as diffusers does with ``text_encoder_3=None``). ``hub_kwargs`` (``revision``, ``local_files_only``, ...)
        go to every ``from_pretrained`` call.
        """
        index = load_model_index(path, **hub_kwargs)
        settings = read_adapter_config(path)
        pixel = settings.get("decode") == "pixel"
        ted = text_encoder_dtype or dtype
        transformer = load_component(path, index, "transformer", dtype=dtype, **hub_kwargs)
        scheduler = load_component(path, index, "scheduler", **hub_kwargs)
        clip = []
        for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            enc = load_component(path, index, enc_name, dtype=ted, required=enc_name == "text_encoder", **hub_kwargs)
            if enc is not None:
                clip.append((load_component(path, index, tok_name, **hub_kwargs), enc))
        t5 = None
        if load_t5:
            enc3 = load_component(path, index, "text_encoder_3", dtype=ted, required=False, **hub_kwargs)
            if enc3 is not None:
                t5 = (load_component(path, index, "tokenizer_3", **hub_kwargs), enc3)
        vae = None if pixel else load_component(path, index, "vae", dtype=dtype, **hub_kwargs)
        msl = max_sequence_length if max_sequence_length is not None else settings.get("max_sequence_length", 256)
        return cls(transformer, scheduler, clip=clip, t5=t5, vae=vae, height=height or settings.get("height"),
                   width=width or settings.get("width"), max_sequence_length=msl, negative_prompt=negative_prompt,
                   device=device, dtype=dtype)

    def to(self, device: str | torch.device) -> "SD3Pipeline":
        self.device = torch.device(device)
        self.transformer.to(self.device)
        for _, enc in self.clip:
            enc.to(self.device)
        if self.t5 is not None:
            self.t5[1].to(self.device)
        if self.vae is not None:
            self.vae.to(self.device)
        return self

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, pooled = [], []
        for tokenizer, encoder in self.clip:
            ids = tokenizer(texts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip_h = torch.cat(hidden, dim=-1)
        joint = self.transformer.config.joint_attention_dim
        if clip_h.shape[-1] > joint:
            raise ValueError(f"CLIP hidden width {clip_h.shape[-1]} exceeds the transformer's joint_attention_dim {joint}")
        clip_h = nn.functional.pad(clip_h, (0, joint - clip_h.shape[-1]))
        parts = [clip_h]
        if self.t5 is not None:
            tokenizer, encoder = self.t5
            ids = tokenizer(texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
            parts.append(encoder(ids)[0].to(clip_h.dtype))
        elif self.max_sequence_length > 0:
            parts.append(clip_h.new_zeros(len(texts), self.max_sequence_length, joint))
        return torch.cat(parts, dim=1).to(self.dtype), torch.cat(pooled, dim=-1).to(self.dtype)

    def encode_prompts(self, prompts: list[str], *, cfg: bool = False, negative_prompt: Optional[str | list[str]] = None) -> Cond:
        """Cond for ``prompts``: prompt_embeds [B, L, D_joint], pooled_prompt_embeds [B, D_pool]; with ``cfg`` also
        the embeddings of ``negative_prompt`` (default: the adapter's, "" unless set) as ``negative_*``; plus the
        tensors of ``prompt_labeler(prompts)`` when the adapter has one (the digits model adds ``digit`` long [B],
        which process rewards read)."""
        texts, b = self.prompt_texts(prompts, cfg=cfg, negative_prompt=negative_prompt)
        emb, pooled = self._encode(texts)
        cond = {"prompt_embeds": emb[:b], "pooled_prompt_embeds": pooled[:b]}
        if cfg:
            cond[NEGATIVE_PREFIX + "prompt_embeds"] = emb[b:]
            cond[NEGATIVE_PREFIX + "pooled_prompt_embeds"] = pooled[b:]
        if self.prompt_labeler is not None:  # task labels parsed from the prompts (digits: "digit" long [B])
            cond.update({k: v.to(self.device) for k, v in self.prompt_labeler(list(prompts)).items()})
        return cond

    def _forward(self, x: Tensor, sigma: Tensor, c: dict[str, Tensor]) -> Tensor:
        t = sigma.to(torch.float32) * self.scheduler.config.num_train_timesteps
        return self.denoiser(hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=c["prompt_embeds"],
                                pooled_projections=c["pooled_prompt_embeds"], return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, *, cfg_scale: Optional[float] = None) -> Tensor:
        """v(x, sigma, cond) float [B, C, h, w]; ``sigma`` float [B] in [0, 1]; batched CFG with ``cfg_scale``."""
        if x.dim() != 4 or x.shape[1] != self.transformer.config.in_channels:
            raise ValueError(f"x must be float [B, {self.transformer.config.in_channels}, h, w], got {tuple(x.shape)}")
        sigma = check_xsigma(x, sigma)
        check_cond(cond, self.cond_keys, x.shape[0], cfg_scale=cfg_scale)
        return cfg_velocity(self._forward, x, sigma, cond, self.cond_keys, cfg_scale, self.cfg_grad)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    def initial_noise(self, batch_size: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """eps ~ N(0, I), float [B, C, H / f, W / f] (drawn like diffusers' ``randn_tensor``)."""
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor((batch_size, *self.latent_shape), generator=generator, device=self.device, dtype=self.dtype)

    def sigmas(self, num_steps: int) -> Tensor:
        """float [num_steps + 1] from 1 to 0: the scheduler's own ``set_timesteps`` grid (with its shift) and a final 0."""
        check_num_steps(num_steps)
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.sigmas.to(torch.float32).clone()

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images float [B, 3, H, W] in [0, 1]: (x / scaling + shift) through the VAE, then (y + 1) / 2.
        In pixel space (no VAE) the latents are the pixels in [-1, 1]. ``decode_batch`` latents per VAE call."""
        return self.decode_in_chunks(x, self._decode)

    def _decode(self, x: Tensor) -> Tensor:
        if self.vae is None:
            return to_unit_range(x.float())
        z = x.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return to_unit_range(self.vae.decode(z, return_dict=False)[0].float())


@register_pipeline("sd3", family="flow")
def load_sd3(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             **options) -> SD3Pipeline:
    """SD3 / SD3.5 from ``path`` (a hub id or a local diffusers directory); ``options`` go to ``SD3Pipeline.from_pretrained``
    (``flow.model_kwargs``)."""
    return SD3Pipeline.from_pretrained(require_path("sd3", path), device=device, dtype=dtype, **options)
