"""A user's own plug-ins, named in a config: ``plugins: [my_pkg.rewards, ./my_algorithm.py]``.

Each entry is a dotted module name (importable from the current environment) or the path of a ``.py`` file;
importing it runs its ``@register_*`` decorators (algorithms, advantage estimators, losses, rewards, model
adapters), so the rest of the config can name what it registers. The config loader imports them before it
checks any registered name. This is the user's own code, named by the user's own config: it is imported
like any Python module (never anything from a request or a model's output).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from flowrl.core.registry import import_file


class PluginError(ValueError):
    """A plug-in that cannot be imported: a missing file or module, or an error while importing it."""


def load_plugin(spec: str) -> ModuleType:
    """Import ``spec`` (a dotted module name or a ``.py`` path, relative to the working directory) once."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugins: {spec!r} is not a module name or a .py path")
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugins: {spec!r}: no such file (paths are relative to the working directory {Path.cwd()})")
        try:
            return import_file(path)  # once per resolved path (a reward reference to the same file shares it)
        except Exception as e:
            raise PluginError(f"plugins: importing {spec!r} failed: {type(e).__name__}: {e}") from e
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise PluginError(f"plugins: no module named {spec!r} ({e}); give a dotted module name or a .py path") from e
    except Exception as e:
        raise PluginError(f"plugins: importing {spec!r} failed: {type(e).__name__}: {e}") from e


def load_plugins(specs: list[str]) -> list[ModuleType]:
    """Import every plug-in of a config, in order."""
    return [load_plugin(s) for s in specs]
