"""Sample features for diversity: ``fn(samples) -> float [B, D]``, found by name in :data:`FEATURES`.

The diversity metrics and the diversity bonuses (``flowrl.core.diversity``) measure distances between the rows
of a feature matrix. What a row is depends on the model: the pixels themselves for the small digits model, an
image embedding (CLIP) for real image and video models. A feature extractor is built once from its config,
``build_features(name, **params)``, and then called on a batch of decoded samples:

- images float [B, C, H, W] in [0, 1], or video float [B, F, C, H, W] in [0, 1] -> float [B, D].

Registered: ``pixels`` (the samples themselves, optionally average-pooled to a thumbnail), ``clip`` (CLIP image
embeddings through the open_clip loading code of the ``clip`` reward, ``flowrl.rewards.image``) and
``digits_classifier`` (the embedded digits reward classifier's penultimate layer).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from flowrl.core.registry import Registry

FEATURES = Registry("sample feature")

FeatureFn = Callable[[Tensor], Tensor]


def build_features(name: str, **params) -> FeatureFn:
    """The feature extractor registered as ``name``, built with ``params`` (checked against its signature)."""
    FEATURES.check_params(name, params)
    return FEATURES[name](**params)


def _check_samples(samples, who: str) -> None:
    if not isinstance(samples, Tensor) or samples.dim() not in (4, 5):
        raise ValueError(f"{who} features need images float [B, C, H, W] or video [B, F, C, H, W]; got "
                         f"{type(samples).__name__} {tuple(getattr(samples, 'shape', ()))}")


# vendi: the Vendi kernel that the evaluation uses on these features. Pixels: cosine of the samples centred over the
# evaluation batch (scale-free, so it means the same at any resolution; raw non-negative pixels all look alike).
@FEATURES.register("pixels", vendi={"kernel": "cosine", "center": True})
def pixel_features(size: Optional[int] = None) -> FeatureFn:
    """Each sample flattened: images [B, C, H, W] (or video [B, F, C, H, W]) -> float [B, C*H*W (*F)].

    ``size``: first average-pool every image (frame) whose height or width exceeds it to at most ``size`` x
    ``size`` pixels (``adaptive_avg_pool2d``, aspect ratio kept), so that large images give a thumbnail's
    distances and the features of a whole evaluation set stay small. None: the pixels as they are."""
    if size is not None and (int(size) != size or size < 1):
        raise ValueError(f"pixels features: size={size!r}; must be a positive integer (or None: no pooling)")

    def features(samples: Tensor) -> Tensor:
        _check_samples(samples, "pixel")
        x = samples.float()
        H, W = x.shape[-2:]
        if size is not None and max(H, W) > size:
            s = size / max(H, W)
            lead = x.shape[:-3]
            x = F.adaptive_avg_pool2d(x.flatten(0, -4), (max(1, round(H * s)), max(1, round(W * s))))
            x = x.view(*lead, *x.shape[1:])
        return x.flatten(1)

    return features


@FEATURES.register("clip", vendi={"kernel": "cosine"})  # the Vendi paper's kernel on embeddings
def clip_features(model_name: str = "ViT-H-14", pretrained: Optional[str] = "laion2b_s32b_b79k", *,
                  device: Optional[str] = None, dtype: str = "float32", batch_size: int = 32,
                  model_kwargs: Optional[dict] = None) -> FeatureFn:
    """CLIP image embeddings (Radford et al., 2021), the feature space of diversity for real image and video models.

    The open_clip model is loaded exactly as the ``clip`` reward loads it (``flowrl.rewards.image.ClipScore``:
    ``model_name`` / ``pretrained`` an open_clip model and tag or a local checkpoint file; the defaults are the
    reward's, ViT-H-14 on LAION-2B) and images go through the same torch preprocessing. Images [B, C, H, W] in
    [0, 1] -> the L2-normalised embeddings float [B, D]; video [B, F, C, H, W] -> the mean over the F frames of the
    frames' normalised embeddings [B, D] (not renormalised: a video whose frames differ sits nearer the origin).
    Encoded ``batch_size`` images (frames) at a time."""
    from .image import ClipScore

    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"clip features: batch_size={batch_size!r}; must be a positive integer")
    encoder = ClipScore(model_name, pretrained, device=device, dtype=dtype, model_kwargs=model_kwargs)

    def features(samples: Tensor) -> Tensor:
        _check_samples(samples, "clip")
        frames = samples.flatten(0, 1) if samples.dim() == 5 else samples
        emb = torch.cat([encoder.image_features(frames[i:i + batch_size]) for i in range(0, len(frames), batch_size)])
        return emb.view(*samples.shape[:2], -1).mean(1) if samples.dim() == 5 else emb

    return features


def _check_digits(samples, who: str) -> None:
    from flowrl.pipelines.digits import IMAGE_SIZE

    if not isinstance(samples, Tensor) or samples.dim() != 4 or tuple(samples.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{who} features need digits images float [B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]; "
                         f"got {type(samples).__name__} {tuple(getattr(samples, 'shape', ()))}")


@FEATURES.register("digits_classifier", vendi={"kernel": "cosine", "center": True})
def digits_classifier_features(*, directory: Optional[str] = None, device: Optional[str] = None) -> FeatureFn:
    """The digits reward classifier's penultimate layer, the one its logits are read from:
    f(x) = silu(fc1(conv features of 2x - 1)) (``flowrl.pipelines.digits.DigitClassifier.features``); images float
    [B, 1, 8, 8] in [0, 1] -> float [B, D], D = 32 for the shipped classifier.

    Why a diversity bonus may want it: distances there ignore the pixel noise and odd strokes the classifier does
    not read, so a bonus in this space spreads a digit's samples over the ways the reward's own model tells drawings
    apart. On digits it keeps realism at the base's where the pixel bonus drifts it (docs/results.md). Post-SiLU
    features are mostly non-negative, hence the centred cosine for Vendi, as for pixels. ``directory``: where
    classifier.safetensors/.json live (default: the shipped weights). No gradient flows through it."""
    from flowrl.pipelines.digits import load_digit_classifier

    dev = torch.device(device or "cpu")
    classifier = load_digit_classifier(device=dev, directory=directory)

    def features(samples: Tensor) -> Tensor:
        _check_digits(samples, "digits_classifier")
        with torch.no_grad():
            return classifier.features(samples.to(dev, torch.float32) * 2.0 - 1.0).to(samples.device)

    return features


@FEATURES.register("digits_pca", vendi={"kernel": "cosine", "center": True})
def digits_pca_features(*, rank: int = 20, device: Optional[str] = None) -> FeatureFn:
    """Real digits' principal subspace: f(x) = (2x - 1 - m) P, with m and P [64, rank] the mean and the top-``rank``
    principal directions of the ``reward`` split's pixels (the Gaussian digits reader's own projection,
    ``flowrl.pipelines.digits_gaussian``); images float [B, 1, 8, 8] in [0, 1] -> float [B, rank].

    Why a diversity bonus may want it: the subspace holds the ways real drawings of digits vary (20 directions keep
    90% of their pixel variance) and leaves out what they do not do, such as isolated speckles in the background,
    which pixel distances reward as much as a different stroke. No gradient flows through it."""
    from flowrl.pipelines.digits_gaussian import load_digit_gaussian

    dev = torch.device(device or "cpu")
    reader = load_digit_gaussian(rank=rank, device=dev)

    def features(samples: Tensor) -> Tensor:
        _check_digits(samples, "digits_pca")
        with torch.no_grad():
            return reader.project(samples.to(dev, torch.float32)).to(samples.device)

    return features
