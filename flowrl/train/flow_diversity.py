"""The flow task's diversity pieces, built from the config: the diversity bonuses added to the outcome reward
(``flow.diversity_bonus``) and the noise-level weights of the KL (``flow.kl_weight``).

Both are registries (``flowrl.core.diversity_bonus.DIVERSITY_BONUSES``, ``flowrl.flow.kl_weights.KL_WEIGHTS``,
``flowrl.rewards.features.FEATURES``); this module only checks the config against them and applies them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from flowrl.core.diversity_bonus import DIVERSITY_BONUSES, diversity_bonus
from flowrl.flow.kl_weights import KL_WEIGHTS, kl_step_weights
from flowrl.rewards.features import FEATURES, build_features


def _feature_spec(spec: dict) -> tuple[str, dict]:
    f = spec.get("features", "pixels")
    if isinstance(f, str):
        return f, {}
    if not isinstance(f, dict) or "name" not in f:
        raise ValueError(f"flow.diversity_bonus: features={f!r} must be a registered name or {{name, ...options}}; "
                         f"registered: {sorted(FEATURES)}")
    f = dict(f)
    return f.pop("name"), f


def check_diversity_config(fc: Any) -> None:
    """Names and parameters of ``flow.diversity_bonus`` and ``flow.kl_weight`` against their registries."""
    for i, spec in enumerate(fc.diversity_bonus):
        DIVERSITY_BONUSES.check_params(spec["name"], spec.get("params", {}) or {})
        w = spec.get("weight", 1.0)
        if not isinstance(w, (int, float)) or not w == w:
            raise ValueError(f"flow.diversity_bonus[{i}].weight={w!r}: must be a number")
        name, opts = _feature_spec(spec)
        FEATURES.check_params(name, opts)
    kw = dict(fc.kl_weight)
    KL_WEIGHTS.check_params(kw.pop("name"), kw)


class DiversityBonuses:
    """``flow.diversity_bonus`` built once: called on a rollout's decoded samples and group ids, it returns the
    summed weighted bonus float [B] and each bonus as the part ``diversity/<name>`` (unweighted) for the batch
    and the metrics. Samples of one group must all be on this process (the bonus compares them)."""

    def __init__(self, specs: Sequence[dict]):
        self.items = []
        feats: dict[tuple, Any] = {}
        for spec in specs:
            fname, fopts = _feature_spec(spec)
            key = (fname, tuple(sorted(fopts.items())))
            if key not in feats:  # one extractor (a CLIP model, say) per distinct feature spec
                feats[key] = build_features(fname, **fopts)
            self.items.append((spec["name"], float(spec.get("weight", 1.0)), key, dict(spec.get("params", {}) or {})))
        self.features = feats

    def __bool__(self) -> bool:
        return bool(self.items)

    @torch.no_grad()
    def __call__(self, samples: Tensor, group: Tensor, reward: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cache = {k: f(samples).float() for k, f in self.features.items()}
        total = torch.zeros_like(reward, dtype=torch.float32)
        parts = {}
        for name, w, key, params in self.items:  # a few configured bonuses, not samples
            f = cache[key].to(reward.device)
            b = diversity_bonus(name, f, group.to(f.device), reward.float(), **params)
            parts[f"diversity/{name}"] = b
            total = total + w * b
        return total, parts


def step_kl_weights(fc: Any, sigma: Tensor) -> Tensor:
    """Weights of the KL of steps starting at noise levels ``sigma`` float [n] (``flow.kl_weight``; ``uniform``
    is exactly 1, so the default leaves the loss as it was)."""
    kw = dict(fc.kl_weight)
    return kl_step_weights(kw.pop("name"), sigma, **kw)
