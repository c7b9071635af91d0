"""Image outcome rewards: CLIP score, PickScore, LAION aesthetic, HPSv2, JPEG (in)compressibility.

Every reward takes images float [B, C, H, W] in [0, 1] (or a list of PIL images), prompts list[str] of
length B, and returns ``{name: float [B]}`` (see :mod:`flowrl.rewards.base`). The model rewards load
weights as a user would (open_clip ``create_model_and_transforms``, transformers ``from_pretrained``, or a
local path) and preprocess in torch (resize of the short side, centre crop, normalisation), so a float
image batch stays differentiable through the reward model (AlignProp-style use).
"""
from __future__ import annotations

import io
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    MissingWeightsError,
    Reward,
    hub_guard,
    hub_offline,
    load_state_dict,
    register_reward,
    require_path,
    to_image_tensor,
    to_pil,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _device(device: Optional[str]) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"reward dtype {dtype!r} is not valid; valid values: {sorted(table)}")
    return table[dtype]


def clip_preprocess(x: Tensor, size: Any, mean: Sequence[float], std: Sequence[float], *, crop: Any = None) -> Tensor:
    """CLIP's image transform in torch: resize the short side to ``size`` (bicubic, antialiased), centre
    crop ``crop`` (default ``size``), normalise (x - mean) / std. Grey images are repeated to RGB.

    x: float [B, C, H, W] in [0, 1]. Returns float [B, 3, h, w]; differentiable in x.
    """
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"CLIP preprocessing: need 1 or 3 channels; got images of shape {tuple(x.shape)}")
    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    ch, cw = (th, tw) if crop is None else ((crop, crop) if isinstance(crop, int) else tuple(crop))
    H, W = x.shape[-2:]
    s = max(th / H, tw / W)  # short side to the target
    nh, nw = max(ch, round(H * s)), max(cw, round(W * s))
    if (nh, nw) != (H, W):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[..., top : top + ch, left : left + cw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / sd


# --------------------------------------------------------------------------------------------- open_clip
def load_open_clip(model_name: str, pretrained: Optional[str], *, device: torch.device, dtype: torch.dtype,
                   checkpoint: Optional[str] = None, **model_kwargs: Any):
    """(model, tokenizer, preprocess cfg) from open_clip, as a user would build them.

    ``pretrained`` is an open_clip tag (``"openai"``, ``"laion2b_s32b_b79k"``) or a local checkpoint
    file; ``checkpoint`` (a local file, e.g. HPSv2's) is loaded into the model afterwards with
    ``weights_only=True``. Offline without cached weights: :class:`MissingWeightsError` at once.
    """
    import open_clip

    how = (f"give a local file: pretrained='/path/to/{model_name}.safetensors' (open_clip checkpoint), "
           f"or set HF_HOME to a cache that holds it")
    if pretrained is not None and not os.path.isfile(os.path.expanduser(pretrained)):
        if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise MissingWeightsError(f"open_clip {model_name!r}: weight file {pretrained!r} does not exist. {how}")
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not cfg:
            raise ValueError(
                f"open_clip has no pretrained tag {pretrained!r} for model {model_name!r}; valid tags: "
                f"{open_clip.list_pretrained_tags_by_model(model_name)} (or give a local checkpoint path)"
            )
        if hub_offline() and not cfg.get("hf_hub"):  # a plain URL download would hang without network
            cache = os.path.expanduser(os.path.join("~", ".cache", "clip", os.path.basename(cfg.get("url", ""))))
            if not os.path.isfile(cache):
                raise MissingWeightsError(f"open_clip {model_name!r}/{pretrained!r} ({cfg.get('url')}) is not cached and the hub is offline. {how}")
        if cfg.get("hf_hub"):  # fetch (or find cached) before building the model: a miss fails at once
            from open_clip.pretrained import download_pretrained

            with hub_guard(f"open_clip {model_name}/{pretrained} ({cfg['hf_hub']})", how):
                download_pretrained(cfg)
    elif pretrained is not None:
        pretrained = os.path.expanduser(pretrained)
    with hub_guard(f"open_clip {model_name}/{pretrained}", how):
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device="cpu", **model_kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint), strict=True)
    from open_clip.model import get_model_preprocess_cfg

    pp = dict(get_model_preprocess_cfg(model))
    pp.setdefault("size", model.visual.image_size)
    pp.setdefault("mean", OPENAI_CLIP_MEAN)
    pp.setdefault("std", OPENAI_CLIP_STD)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, tokenizer, pp


class _OpenClipReward(Reward):
    """Shared part of the open_clip rewards: normalised image and text embeddings."""

    def _setup(self, model_name, pretrained, device, dtype, checkpoint=None, model_kwargs=None):
        self.device, self.dtype = _device(device), _dtype(dtype)
        self.model, self.tokenizer, self.pp = load_open_clip(
            model_name, pretrained, device=self.device, dtype=self.dtype, checkpoint=checkpoint, **(model_kwargs or {})
        )

    def image_features(self, samples) -> Tensor:
        """L2-normalised image embeddings float [B, D]."""
        x = to_image_tensor(samples).to(self.device, self.dtype)
        x = clip_preprocess(x, self.pp["size"], self.pp["mean"], self.pp["std"])
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings float [B, D]."""
        tok = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tok).float(), dim=-1)


@register_reward("clip")
class ClipScore(_OpenClipReward):
    """CLIP score (Radford et al., 2021; as a reward: Hessel et al., 2021 "CLIPScore").

    r_i = scale * cos(E_img(x_i), E_txt(p_i)), with open_clip encoders. ``scale`` = 1 gives the raw cosine
    (CLIPScore uses 2.5 * max(cos, 0)). Images float [B, C, H, W] in [0, 1]. Returns {name: float [B]}.

    model_name / pretrained: any open_clip model and pretrained tag, or a local checkpoint file.
    """

    def __init__(self, model_name: str = "ViT-H-14", pretrained: Optional[str] = "laion2b_s32b_b79k", *,
                 scale: float = 1.0, device: Optional[str] = None, dtype: str = "float32",
                 model_kwargs: Optional[dict] = None, name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        self.scale = float(scale)
        self._setup(model_name, pretrained, device, dtype, model_kwargs=model_kwargs)

    def score(self, samples, prompts, meta):
        s = (self.image_features(samples) * self.text_features(prompts)).sum(-1)
        return {self.name: self.scale * s}


@register_reward("hpsv2")
class HPSv2(_OpenClipReward):
    """Human Preference Score v2 / v2.1 (Wu et al., 2023, "Human Preference Score v2").

    r_i = cos(E_img(x_i), E_txt(p_i)) with open_clip ViT-H-14 whose weights are replaced by the HPS
    checkpoint (``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``, read with ``weights_only=True``).
    Images float [B, C, H, W] in [0, 1]. Returns {name: float [B]} (typically 0.2 - 0.35).
    """

    def __init__(self, checkpoint: Optional[str] = None, *, model_name: str = "ViT-H-14", device: Optional[str] = None,
                 dtype: str = "float32", model_kwargs: Optional[dict] = None, name: Optional[str] = None,
                 on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        ckpt = require_path(checkpoint, "HPSv2", "download HPS_v2.1_compressed.pt (xswu/HPSv2 on the Hugging Face hub) "
                            "and pass checkpoint='/path/to/HPS_v2.1_compressed.pt'")
        self._setup(model_name, None, device, dtype, checkpoint=ckpt, model_kwargs=model_kwargs)

    def score(self, samples, prompts, meta):
        return {self.name: (self.image_features(samples) * self.text_features(prompts)).sum(-1)}


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor head (Schuhmann, 2022): an MLP on the L2-normalised CLIP
    ViT-L/14 image embedding. Layer indices match the published ``sac+logos+ava1-l14-linearMSE.pth``.

    D -> 1024 -> 128 -> 64 -> 16 -> 1 (dropout between, no activations, as published). [B, D] -> [B].
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb).squeeze(-1)


@register_reward("aesthetic")
class Aesthetic(_OpenClipReward):
    """LAION aesthetic score (the improved predictor of Schuhmann, 2022; DDPO's aesthetic reward).

    r_i = MLP(E_img(x_i) / ||E_img(x_i)||) with E_img the CLIP ViT-L/14 image encoder (open_clip
    ``ViT-L-14`` / ``openai``) and the MLP head weights from ``head`` (a path). Prompts are unused.
    Images float [B, C, H, W] in [0, 1]. Returns {name: float [B]} (about 1 - 10).
    """

    def __init__(self, head: Optional[str] = None, *, clip_model: str = "ViT-L-14", clip_pretrained: Optional[str] = "openai",
                 device: Optional[str] = None, dtype: str = "float32", model_kwargs: Optional[dict] = None,
                 name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        head = require_path(head, "LAION aesthetic head", "download sac+logos+ava1-l14-linearMSE.pth "
                            "(christophschuhmann/improved-aesthetic-predictor) and pass head='/path/to/it.pth'")
        self._setup(clip_model, clip_pretrained, device, dtype, model_kwargs=model_kwargs)
        dim = int(self.model.visual.output_dim)
        self.head = AestheticMLP(dim)
        try:
            self.head.load_state_dict(load_state_dict(head), strict=True)
        except RuntimeError as e:
            raise ValueError(f"aesthetic head {head!r} does not fit an MLP over {dim}-d CLIP embeddings: {e}") from e
        self.head = self.head.to(self.device, torch.float32).eval().requires_grad_(False)

    def score(self, samples, prompts, meta):
        return {self.name: self.head(self.image_features(samples))}


# --------------------------------------------------------------------------------------------- transformers
@register_reward("pickscore")
class PickScore(Reward):
    """PickScore (Kirstain et al., 2023, "Pick-a-Pic").

    r_i = exp(logit_scale) * cos(E_img(x_i), E_txt(p_i)) with a transformers ``CLIPModel`` (default
    ``yuvalkirstain/PickScore_v1``) and the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, both
    by ``from_pretrained`` (a hub id or a local directory). Images float [B, C, H, W] in [0, 1].
    Returns {name: float [B]} (typically 18 - 24).
    """

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 *, device: Optional[str] = None, dtype: str = "float32", name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        from transformers import AutoProcessor, CLIPModel

        self.device, self.dtype = _device(device), _dtype(dtype)
        how = "pass a local directory saved with save_pretrained: {}='/path/to/dir'"
        with hub_guard(model, how.format("model")):
            self.model = CLIPModel.from_pretrained(model, dtype=self.dtype)
        with hub_guard(processor, how.format("processor")):
            self.processor = AutoProcessor.from_pretrained(processor)
        self.model = self.model.to(self.device, self.dtype).eval().requires_grad_(False)
        ip = self.processor.image_processor

        def field(v, k):
            return v.get(k) if isinstance(v, dict) else getattr(v, k, None)

        size = field(ip.size, "shortest_edge") or (field(ip.size, "height"), field(ip.size, "width"))
        crop = ip.crop_size if getattr(ip, "do_center_crop", True) else None
        crop = None if crop is None else (field(crop, "height"), field(crop, "width"))
        self.pp = {"size": size, "crop": crop, "mean": ip.image_mean, "std": ip.image_std}

    @staticmethod
    def _embeds(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output  # transformers >= 5 returns an output object

    def score(self, samples, prompts, meta):
        x = to_image_tensor(samples).to(self.device, self.dtype)
        x = clip_preprocess(x, self.pp["size"], self.pp["mean"], self.pp["std"], crop=self.pp["crop"])
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        img = F.normalize(self._embeds(self.model.get_image_features(pixel_values=x)).float(), dim=-1)
        txt = F.normalize(self._embeds(self.model.get_text_features(**tok)).float(), dim=-1)
        return {self.name: self.model.logit_scale.exp().float() * (img * txt).sum(-1)}


# --------------------------------------------------------------------------------------------- model-free
def jpeg_size_kb(samples, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG at ``quality`` (DDPO, Black et al., 2023).

    Images are rounded to uint8 (round(255 x)). samples: float [B, C, H, W] in [0, 1] or PIL. Returns float [B].
    """
    sizes = []
    for im in to_pil(samples):  # PIL encodes one image at a time
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """DDPO's compressibility reward (Black et al., 2023): r_i = -size_kB(JPEG_q(x_i)), q = 95.

    Images float [B, C, H, W] in [0, 1] or PIL; prompts unused. Returns {name: float [B]}.
    """

    sign = -1.0

    def __init__(self, quality: int = 95, *, name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: JPEG quality must be in [1, 100]; got {quality}")
        self.quality = int(quality)

    def score(self, samples, prompts, meta):
        x = samples if isinstance(samples, (list, tuple)) else to_image_tensor(samples)
        return {self.name: self.sign * jpeg_size_kb(x, self.quality)}


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """DDPO's incompressibility reward (Black et al., 2023): r_i = +size_kB(JPEG_q(x_i)), q = 95.

    Images float [B, C, H, W] in [0, 1] or PIL; prompts unused. Returns {name: float [B]}.
    """

    sign = 1.0
