"""Sample features for diversity: ``fn(samples) -> float [B, D]``, found by name in :data:`FEATURES`.

The diversity metrics and the diversity bonuses (``flowrl.core.diversity``) measure distances between the rows
of a feature matrix. What a row is depends on the model: the pixels themselves for the small digits model, an
image embedding (CLIP) for real image and video models. A feature extractor is built once from its config,
``build_features(name, **params)``, and then called on a batch of decoded samples:

- images float [B, C, H, W] in [0, 1], or video float [B, F, C, H, W] in [0, 1] -> float [B, D].
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor

from flowrl.core.registry import Registry

FEATURES = Registry("sample feature")

FeatureFn = Callable[[Tensor], Tensor]


def build_features(name: str, **params) -> FeatureFn:
    """The feature extractor registered as ``name``, built with ``params`` (checked against its signature)."""
    FEATURES.check_params(name, params)
    return FEATURES[name](**params)


@FEATURES.register("pixels")
def pixel_features() -> FeatureFn:
    """Each sample flattened: images [B, C, H, W] (or video [B, F, C, H, W]) -> float [B, C*H*W (*F)]."""

    def features(samples: Tensor) -> Tensor:
        if not isinstance(samples, Tensor) or samples.dim() not in (4, 5):
            raise ValueError("pixel features need images float [B, C, H, W] or video [B, F, C, H, W]; got "
                             f"{type(samples).__name__} {tuple(getattr(samples, 'shape', ()))}")
        return samples.float().flatten(1)

    return features
