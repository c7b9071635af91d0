"""The optimiser registry: ``optim.name`` names a factory ``(params, cfg.optim) -> torch.optim.Optimizer``.

Built in:

- ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, 2019) with ``optim.lr``, ``betas``, ``eps``, ``weight_decay``.
- ``adamw_8bit``: bitsandbytes' 8-bit AdamW (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
  Quantization"): the same update with both moments stored block-wise quantised to 8 bits, so the optimiser
  state of N trainable parameters takes ~2N bytes instead of 8N. CUDA only; bitsandbytes is not a dependency
  of flowrl (``pip install bitsandbytes``).

A plug-in adds one with ``@register_optimizer("name", requires="package")``; ``requires`` names a package that
must be importable, checked when the config is read (before any model loads).
"""
from __future__ import annotations

import importlib.util
from typing import Any, Iterable, Optional

from flowrl.core.registry import Registry, UnknownNameError

OPTIMIZERS = Registry("optimiser")


def register_optimizer(name: str, *, requires: Optional[str] = None):
    """Decorator: register ``factory(params, optim_cfg) -> Optimizer`` under ``name``; ``requires`` is a package
    the factory imports (its absence is reported when the config is read)."""
    return OPTIMIZERS.register(name, requires=requires)


def missing_package_message(name: str, package: str) -> str:
    return (f"optim.name={name!r} needs the package {package!r}, which is not installed: `pip install {package}` "
            f"(a CUDA machine), or use optim.name=adamw")


def check_optimizer_name(name: str, *, key: str = "optim.name") -> None:
    """A registered name whose required package is importable; else ValueError naming ``key`` and the valid names."""
    if name not in OPTIMIZERS:
        raise ValueError(f"{key}={name!r}: unknown optimiser; valid: {OPTIMIZERS.names()}")
    package = OPTIMIZERS.meta(name).get("requires")
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(missing_package_message(name, package))


def build_optimizer(params: Iterable[Any], optim_cfg: Any):
    """The optimiser ``optim_cfg.name`` over ``params`` (the trainable parameters)."""
    try:
        factory = OPTIMIZERS[optim_cfg.name]
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    check_optimizer_name(optim_cfg.name)
    return factory(list(params), optim_cfg)


@register_optimizer("adamw")
def adamw(params, c):
    import torch

    return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)


@register_optimizer("adamw_8bit", requires="bitsandbytes")
def adamw_8bit(params, c):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay)
