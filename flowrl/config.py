"""Typed configs: dataclasses with a help string per field, read from YAML, overridden with ``--set``.

Every config is a (nested) dataclass whose fields carry ``metadata={"help": ...}``. ``from_dict``
builds one from plain data and rejects unknown keys and wrong types with an error that names the key
path and the valid keys; ``apply_overrides`` applies ``a.b=c`` strings (values parsed as YAML
scalars). ``describe`` prints every field with its type, default and help (``flowrl train --help-config``).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar, Union

import yaml

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's booleans: only true/false (so ``no``, ``on``, ``off`` stay strings,
    e.g. ``mixed_precision: no``) and floats without a dot (``3e-4``)."""


_Loader.yaml_implicit_resolvers = {k: [(t, r) for t, r in v if t != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", __import__("re").compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
# PyYAML (YAML 1.1) reads a float only with a dot, so ``3e-4`` would stay the string "3e-4" and fail late, inside a
# loss; YAML 1.2 reads it as a float. Added last, so an integer (``10``) still resolves to int first.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", __import__("re").compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def yaml_load(text: str) -> Any:
    """Parse YAML text with flowrl's loader (see ``_Loader``)."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config that cannot be built: unknown key, wrong type, malformed override or file."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string (required: every knob says what it does)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow int -> float; recurse into dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, path=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{path}.<key>"): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict, *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"unknown config key(s) {[_join(path, k) for k in unknown]} in {where}; valid keys: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a range or cross-field check of the section's __post_init__ ("key=value: why")
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None
    except TypeError as e:  # a required field without a default
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML dumps and run directories)."""
    return dataclasses.asdict(cfg)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=c"`` -> (["a", "b"], parsed c); the value is read as a YAML scalar (1e-4, true, [1, 2], null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key path")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``a.b=c`` overrides to plain config data (a deep copy is returned)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            if node.get(k) is None:  # an unset (null) mapping setting, e.g. loss.params: set only what is given
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Read YAML ``path`` (optional), apply overrides, build ``cls``. A missing file is a clear error."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    base = _defaults(cls) if _all_defaults(cls) else {}
    merged = _merge_sections(cls, base, data)
    return from_dict(cls, apply_overrides(merged, overrides))


def _defaults(cls: type) -> dict:
    """The defaults of ``cls`` as plain data, without building ``cls`` itself: its ``__post_init__`` may check
    registered names (importing torch and the plug-ins), which a config that fails on an unknown key or a bad
    value should not wait for. Nested sections are built (their own checks are cheap)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def _all_defaults(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _merge_sections(cls: type, base: dict, top: dict) -> dict:
    """``top`` over the defaults ``base``: a config section (a nested dataclass) is merged key by key, any other
    value is replaced whole. A mapping-valued setting (a reward table, a loss's parameters) is the file's own:
    merged, the defaults' entries would stay in it unasked (a real-model config would keep the default digits
    reward, a loss would receive another loss's default parameters)."""
    if not isinstance(top, dict):
        return top
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for k, v in top.items():
        tp = hints.get(k)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge_sections(tp, out[k], v)
        else:
            out[k] = v
    return out


def check(ok: bool, message: str) -> None:
    """Raise ValueError(``message``) unless ``ok``: a config section's ``__post_init__`` states its ranges with it."""
    if not ok:
        raise ValueError(message)


def finite(x: float) -> bool:
    """Whether ``x`` is a finite number (not NaN, not +-inf)."""
    import math

    return isinstance(x, (int, float)) and math.isfinite(x)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: ``key (type, default): help``, nested sections flattened with dots."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.extend(describe(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        lines.append(f"{key} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
