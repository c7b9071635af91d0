"""Video outcome rewards: any image reward averaged over frames, and temporal consistency.

Videos are float [B, F, C, H, W] in [0, 1]; prompts list[str] of length B.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Reward, register_reward
from .build import build_reward
from .image import _OpenClipReward


def _check_video(samples: Any, who: str) -> Tensor:
    if not isinstance(samples, Tensor) or samples.dim() != 5:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"{who}: need videos float [B, F, C, H, W] in [0, 1]; got {shape}")
    if not samples.is_floating_point():
        raise TypeError(f"{who}: video dtype {samples.dtype} is not float")
    return samples


def _repeat_meta(meta: Optional[Mapping[str, Any]], B: int, n: int) -> Optional[dict]:
    """Every batch-first value of meta repeated n times in place (row b -> rows b*n .. b*n+n-1)."""
    if meta is None:
        return None
    out = {}
    for k, v in meta.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B:
            out[k] = v.repeat_interleave(n, dim=0)
        elif isinstance(v, np.ndarray) and v.ndim > 0 and v.shape[0] == B:
            out[k] = np.repeat(v, n, axis=0)
        elif isinstance(v, (list, tuple)) and len(v) == B:
            out[k] = [x for x in v for _ in range(n)]
        else:
            out[k] = v
    return out


@register_reward("video_frames")
class FrameAverage(Reward):
    """An image reward averaged over the frames of each video.

    r_b = (1 / |S|) sum_{f in S} r_img(video[b, f], prompt_b), S = frames 0, stride, 2 stride, ...; every
    part of the image reward is averaged the same way (its score part is renamed to this reward's name,
    ``"<image>/<what>"`` parts to ``"<name>/<what>"``).

    image: a registered image reward name, or a built reward object; image_kwargs: its options.
    samples: float [B, F, C, H, W] in [0, 1]. Returns {name: float [B], ...}.
    """

    def __init__(self, image: Any = "clip", image_kwargs: Optional[dict] = None, *, frame_stride: int = 1,
                 name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        if int(frame_stride) < 1:
            raise ValueError(f"{self.name}: frame_stride must be >= 1; got {frame_stride}")
        self.stride = int(frame_stride)
        self.image = build_reward(image, **(image_kwargs or {})) if isinstance(image, str) else image
        if not callable(self.image) or not hasattr(self.image, "name"):
            raise TypeError(f"{self.name}: image must be a registered reward name or a reward object; got {image!r}")

    def score(self, samples, prompts, meta):
        v = _check_video(samples, self.name)[:, :: self.stride]
        B, Fr = v.shape[:2]
        frames = v.reshape(B * Fr, *v.shape[2:])
        parts = self.image(frames, [p for p in prompts for _ in range(Fr)], _repeat_meta(meta, B, Fr))
        out = {}
        inner = self.image.name
        for k, val in parts.items():
            key = self.name if k == inner else (self.name + k[len(inner):] if k.startswith(inner + "/") else f"{self.name}/{k}")
            out[key] = val.float().reshape(B, Fr).mean(1)  # a bool 'valid' part becomes the valid fraction
        return out


@register_reward("temporal_consistency")
class TemporalConsistency(_OpenClipReward):
    """Temporal consistency of a video: mean cosine similarity of consecutive frames' CLIP image embeddings.

    r_b = (1 / (F - 1)) sum_{f=0}^{F-2} cos(E(video[b, f]), E(video[b, f + 1])), with E an open_clip image
    encoder (any model name with a pretrained tag or a local checkpoint). Prompts unused.
    samples: float [B, F, C, H, W] in [0, 1], F >= 2. Returns {name: float [B]} in [-1, 1].
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: Optional[str] = "laion2b_s34b_b79k", *,
                 device: Optional[str] = None, dtype: str = "float32", model_kwargs: Optional[dict] = None,
                 name: Optional[str] = None, on_error: str = "raise"):
        super().__init__(name=name, on_error=on_error)
        self._setup(model_name, pretrained, device, dtype, model_kwargs=model_kwargs)

    def score(self, samples, prompts, meta):
        v = _check_video(samples, self.name)
        B, Fr = v.shape[:2]
        if Fr < 2:
            raise ValueError(f"{self.name}: temporal consistency needs at least 2 frames; got F = {Fr}")
        e = self.image_features(v.reshape(B * Fr, *v.shape[2:])).reshape(B, Fr, -1)
        return {self.name: (e[:, 1:] * e[:, :-1]).sum(-1).mean(1)}
