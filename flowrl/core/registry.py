"""One registry type for every kind of plug-in: estimators, losses, rewards, process rewards, model adapters
and training algorithms.

A :class:`Registry` is a ``dict`` from name to object (a function, a class or a factory) with

- ``register(name, **meta)``: a decorator; registering a taken name with another object is an error;
- lookup by ``registry[name]`` / ``get(name)``: an unknown name raises :class:`UnknownNameError`, whose
  message lists the registered names (and the modules that failed to import, when a lazy loader has one);
- ``check_params(name, params)``: the keyword parameters checked against the object's signature, so an
  unknown or misspelt parameter is an error that names the valid ones (no guessing from exception text);
- ``meta(name)``: what was given to ``register`` besides the name (for example the batch fields an
  estimator reads);
- an optional ``loader``: called once before the first lookup, so that a package whose modules register
  themselves on import (one file per plug-in) is complete however it was imported.

The core imports nothing above it, so this module is the one place every layer takes its registries from.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Callable, Iterable, Optional


class UnknownNameError(KeyError, ValueError):
    """A name that no plug-in of this kind is registered under (the message lists the valid ones)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class ParameterError(TypeError, ValueError):
    """A keyword parameter that the plug-in does not take (the message lists the ones it takes)."""


def signature_params(obj: Callable, *, skip: int = 0) -> tuple[list[str], bool]:
    """The keyword parameters of ``obj`` after its first ``skip`` positional ones, and whether it takes ``**kw``.

    For a class this is ``__init__`` without ``self``.
    """
    sig = inspect.signature(obj)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    names = [p.name for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, var_kw


def check_params(kind: str, name: str, obj: Callable, params: Iterable[str], *, skip: int = 0) -> None:
    """Raise :class:`ParameterError` when ``params`` holds a name ``obj`` does not accept (``skip`` leading
    positional parameters are not keywords). An object that takes ``**kwargs`` accepts any name."""
    valid, var_kw = signature_params(obj, skip=skip)
    if var_kw:
        return
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ParameterError(f"{kind} {name!r}: unknown parameter(s) {unknown}; valid: {valid}")


class Registry(dict):
    """Name -> plug-in, for one kind of plug-in (see the module docstring)."""

    def __init__(self, kind: str, *, skip: int = 0, loader: Optional[Callable[[], dict[str, str]]] = None):
        """``kind`` names the plug-ins in messages ("advantage estimator"); ``skip`` is the number of leading
        positional parameters that are data, not options (an estimator's ``batch``: 1); ``loader`` imports
        the modules that register the built-in plug-ins and returns {module: error} for those that failed."""
        super().__init__()
        self.kind, self.skip = kind, skip
        self._loader, self._loaded = loader, loader is None
        self._meta: dict[str, dict[str, Any]] = {}
        self.import_errors: dict[str, str] = {}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: register the decorated object under ``name`` with ``meta``; returns the object unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind}: a registered name must be a non-empty string; got {name!r}")

        def deco(obj: Any) -> Any:
            old = dict.get(self, name)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise ValueError(f"{self.kind} {name!r} is already registered (by {_qualname(old)})")
            dict.__setitem__(self, name, obj)
            self._meta[name] = dict(meta)
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a plug-in of their own)."""
        dict.pop(self, name, None)
        self._meta.pop(name, None)

    # ------------------------------------------------------------------ lookup
    def load(self) -> None:
        """Run the loader once (the built-in plug-ins register themselves on import)."""
        if not self._loaded:
            self._loaded = True
            self.import_errors.update(self._loader() or {})

    def __missing__(self, name: str) -> Any:
        if not self._loaded:
            self.load()
            if dict.__contains__(self, name):
                return dict.__getitem__(self, name)
        extra = f"; modules that failed to import: {self.import_errors}" if self.import_errors else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}; valid: {self.names()}{extra}")

    def __contains__(self, name: object) -> bool:
        self.load()
        return dict.__contains__(self, name)

    def __iter__(self):
        self.load()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.load()
        return dict.__len__(self)

    def keys(self):
        self.load()
        return dict.keys(self)

    def items(self):
        self.load()
        return dict.items(self)

    def values(self):
        self.load()
        return dict.values(self)

    def get(self, name: str, default: Any = None) -> Any:  # noqa: D401 (dict's signature)
        """The plug-in ``name``; an unknown name raises :class:`UnknownNameError` unless a default is given."""
        if default is not None:
            self.load()
            return dict.get(self, name, default)
        return self[name]

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self.load()
        return sorted(dict.keys(self))

    def meta(self, name: str) -> dict[str, Any]:
        """What ``register`` was given for ``name`` besides the name."""
        self[name]  # noqa: B018 (the lookup raises for an unknown name)
        return self._meta.get(name, {})

    # ------------------------------------------------------------------ parameters
    def check_params(self, name: str, params: Iterable[str], *, skip: Optional[int] = None) -> None:
        """Raise :class:`ParameterError` when ``params`` holds a keyword the plug-in ``name`` does not take."""
        check_params(self.kind, name, self[name], params, skip=self.skip if skip is None else skip)

    def build(self, name: str, /, *args: Any, **params: Any) -> Any:
        """Check ``params`` against the plug-in's signature, then call it with ``args`` and ``params``."""
        self.check_params(name, params, skip=len(args))
        return self[name](*args, **params)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def import_submodules(package: str, *, exclude: Iterable[str] = ()) -> dict[str, str]:
    """Import every module of ``package`` (its plug-ins register on import). Returns {module: error} for the
    modules that failed, so one broken optional plug-in does not hide the others."""
    import importlib
    import pkgutil

    skip = set(exclude)
    errors: dict[str, str] = {}
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name in skip:
            continue
        mod = f"{package}.{info.name}"
        try:
            importlib.import_module(mod)
        except Exception as e:  # reported by the registry's unknown-name error
            errors[mod] = f"{type(e).__name__}: {e}"
    return errors


def import_file(path) -> ModuleType:
    """Import the Python file ``path`` (a user's plug-in or reward) once: one module name per resolved path, so a
    file named in two places (``plugins:`` and a reward reference) runs, and registers its plug-ins, once. A file
    that raises while importing leaves no half-built module behind."""
    import hashlib
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path).expanduser().resolve()
    name = f"flowrl_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
