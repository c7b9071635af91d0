"""Training algorithms as registered strategies: one module each, found by name.

An algorithm decides what a rollout records and what the update optimises; the task it runs on (flow or
LLM) does the model plumbing, and the loop (:mod:`flowrl.train.loop`) runs every algorithm the same way.
Adding one is a new module here (or anywhere: ``@register_algorithm`` works from a user's file) and a YAML
that names it in ``algorithm:``; nothing else in the package changes. See ``docs/extending.md``.

The interface every algorithm implements is :class:`flowrl.train.algorithms.base.Algorithm`; the flow and
LLM families add their hooks in ``flow_base`` and ``llm_base``.
"""
from __future__ import annotations

from flowrl.core.registry import Registry, import_submodules

ALGORITHMS: Registry = Registry(
    "algorithm", loader=lambda: import_submodules("flowrl.train.algorithms", exclude=("base", "flow_base", "flow_ppo", "llm_base")),
)


def register_algorithm(name: str):
    """Decorator: register an :class:`~flowrl.train.algorithms.base.Algorithm` subclass under ``name``
    (``cfg.algorithm``). The class gets ``name`` as its ``name`` attribute."""

    def deco(cls):
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return deco


__all__ = ["ALGORITHMS", "register_algorithm"]
