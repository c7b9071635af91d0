"""Rewards built from a config: a registered name (:mod:`flowrl.rewards.base`'s registries) or a reference to the
user's own code (``"module:function"``, ``"file.py:function"``; :mod:`flowrl.rewards.user`), with options.

- :func:`build_reward` / :func:`build_process_reward`: one reward from its name or reference and options.
- :func:`build_rewards`: a config mapping ``{key: {weight, type, **options}}`` -> :class:`CombinedReward`.
- :func:`check_reward_spec` / :func:`check_process_reward_spec`: the shape of such a mapping and every
  reference in it, checked when the config is read (from the sources only: nothing of the user's is imported,
  no reward model loads).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from flowrl.core.registry import check_params

from .base import PROCESS_REWARDS, REWARDS, CombinedReward, Reward
from .user import check_reference, default_name, is_reference, reference_factory


def build_reward(name: str, /, **kwargs: Any) -> Reward:
    """Build the outcome reward ``name`` with its options (``on_error``, model paths, ...): a registered name, or
    a reference to the user's code (:mod:`flowrl.rewards.user`). ``kwargs["name"]`` (default: ``name``, or a
    reference's function name) is the key of its score part. An unknown reward raises
    :class:`~flowrl.core.registry.UnknownNameError`, an option the reward does not take
    :class:`~flowrl.core.registry.ParameterError` (both name the valid ones)."""
    if is_reference(name):
        factory = reference_factory(name)
        check_params("reward", name, factory, kwargs)
        return factory(**kwargs)
    return REWARDS.build(name, **kwargs)


def build_process_reward(name: str, /, **kwargs: Any):
    """Build the process reward ``name`` (registered, or a reference) with its options (errors as
    :func:`build_reward`)."""
    if is_reference(name):
        factory = reference_factory(name, process=True)
        check_params("process reward", name, factory, kwargs)
        return factory(**kwargs)
    return PROCESS_REWARDS.build(name, **kwargs)


def _entries(spec: Any, key: str) -> list[tuple[str, str, float, dict]]:
    """``[(config key, name or reference, weight, options)]`` of a rewards mapping; its shape is checked."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"{key}: need a non-empty mapping {{name: {{weight: ..., options}}}}; got {spec!r}")
    out = []
    for k, cfg in spec.items():
        if isinstance(cfg, (int, float)) and not isinstance(cfg, bool):
            cfg = {"weight": float(cfg)}
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{key}: entry {k!r} must be a mapping with 'weight' and options; got {cfg!r}")
        cfg = dict(cfg)
        w = cfg.pop("weight", 1.0)
        if not isinstance(w, (int, float)) or isinstance(w, bool):
            raise TypeError(f"{key}: weight of {k!r} must be a number; got {w!r}")
        typ = cfg.pop("type", k)
        if not isinstance(typ, str) or not typ:
            raise TypeError(f"{key}: type of {k!r} must be a registered reward name or a reference; got {typ!r}")
        # a reference's score part is named after its function unless the key or `name` says otherwise
        cfg.setdefault("name", default_name(k) if is_reference(k) else k)
        out.append((k, typ, float(w), cfg))
    return out


def build_rewards(spec: Mapping[str, Any]) -> CombinedReward:
    """Build several rewards from a config ``{key: {"weight": w, "type": name or reference, **options}}``.

    ``type`` defaults to ``key`` (give it to use one reward twice under two names); the remaining keys are that
    reward's options. A reward given as a number is ``{"weight": number}``. The score part of each is
    ``options["name"]``, by default the key (a reference as key: its function's name).
    Example: ``{"pickscore": {"weight": 1.0}, "my_rewards.py:sharpness": {"weight": 0.1, "on_error": "mask"}}``.
    """
    rewards: dict[str, Any] = {}
    weights: dict[str, float] = {}
    for key, typ, w, cfg in _entries(spec, "build_rewards"):
        rewards[key] = build_reward(typ, **cfg)
        score_key = getattr(rewards[key], "name", key)  # the part a weight multiplies
        if score_key in weights:
            raise ValueError(f"build_rewards: two rewards score under the name {score_key!r}; give them distinct names")
        weights[score_key] = w
    return CombinedReward(rewards, weights)


def check_reward_spec(spec: Any, key: str = "rewards") -> None:
    """ValueError / TypeError naming ``key`` for a malformed rewards mapping, a duplicate score name, or a
    reference whose module/file or function does not exist (read from the source, not imported)."""
    names = set()
    for k, typ, _, cfg in _entries(spec, key):
        if is_reference(typ):
            check_reference(typ, key=f"{key}[{k!r}]")
        if cfg["name"] in names:
            raise ValueError(f"{key}: two rewards score under the name {cfg['name']!r}; give one a `name` option")
        names.add(cfg["name"])


def check_process_reward_spec(spec: Optional[Mapping[str, Any]], key: str = "process_reward") -> None:
    """The process reward ``{type: name or reference, **options}``: a type, and a reference that resolves."""
    if spec is None:
        return
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise ValueError(f"{key}={spec!r}: needs a 'type' (a registered process reward or a reference "
                         "'module:function' / 'file.py:function')")
    if is_reference(spec["type"]):
        check_reference(spec["type"], process=True, key=f"{key}.type")
