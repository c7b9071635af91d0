"""The registry of model adapters: ``flow.model`` / ``llm.model`` name a registered loader.

A loader is a function ``load(path, *, device, dtype, **options) -> adapter`` registered with
``@register_pipeline("name", family="flow" | "llm")``; ``path`` is the hub id or local directory from the config
(None where the adapter ships its own weights). A flow adapter implements
:class:`flowrl.flow.pipeline.FlowPipeline`. Adding a model is one new module in this package (or a user's
module that registers itself) plus a YAML that names it. See ``docs/extending.md``.
"""
from __future__ import annotations

from flowrl.core.registry import Registry, import_submodules

PIPELINES: Registry = Registry(
    "model adapter", loader=lambda: import_submodules("flowrl.pipelines", exclude=("registry", "base")),
)


def register_pipeline(name: str, *, family: str):
    """Decorator: register a loader ``(path, *, device, dtype, **options) -> adapter`` under ``name``;
    ``family`` is "flow" (a FlowPipeline) or "llm" (a causal LM pipeline)."""
    if family not in ("flow", "llm"):
        raise ValueError(f"register_pipeline({name!r}): family={family!r}; valid: ['flow', 'llm']")
    return PIPELINES.register(name, family=family)


def pipeline_names(family: str) -> list[str]:
    """The registered adapters of ``family``."""
    return [n for n in PIPELINES.names() if PIPELINES.meta(n).get("family") == family]


def load_pipeline(name: str, path, *, family: str, **kwargs):
    """Load adapter ``name`` (of ``family``) from ``path``; an unknown name lists the valid ones."""
    if name not in PIPELINES or PIPELINES.meta(name).get("family") != family:
        from flowrl.core.registry import UnknownNameError

        raise UnknownNameError(f"unknown {family} model adapter {name!r}; valid: {pipeline_names(family)}")
    return PIPELINES[name](path, **kwargs)
