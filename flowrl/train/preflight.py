"""Preflight of a training config (``flowrl train CONFIG --dry-run``): the checks a run would fail on, and the
memory per rank it would need, in seconds and without loading a weight.

Checks: the config (read and validated by :func:`flowrl.config.load` before this runs), the prompt / problem data,
the registered names (model adapter, rewards and their options), local files named by reward options, and the
model: a local folder, the Hugging Face cache (``try_to_load_from_cache``), or the hub (``model_info`` with a short
timeout; gated repositories checked with ``auth_check``); ``HF_HUB_OFFLINE=1`` means cache only.

The memory table is :func:`flowrl.train.memory.estimate_memory` (re-exported here).
"""
from __future__ import annotations

import sys
from pathlib import Path

from flowrl.train.memory import MemoryEstimate, estimate_memory, world_size_of
from flowrl.train.model_check import HUB_ID, ModelNotLocal, PreflightError, family, model_dir, model_ref

__all__ = ["MemoryEstimate", "PreflightError", "estimate_memory", "run_preflight"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _reward_checks(cfg) -> list[str]:
    """Rewards: registered (or references, checked at load), options accepted, local weight files present, hub
    models (in the options or the reward's defaults) available. Returns the reward keys; PreflightError else."""
    import inspect

    from flowrl.core.registry import UnknownNameError, check_params
    from flowrl.rewards import PROCESS_REWARDS, REWARDS
    from flowrl.rewards.build import _entries
    from flowrl.rewards.user import is_reference

    fam = family(cfg)
    section = cfg.flow if fam == "flow" else cfg.llm
    spec = section.rewards if fam == "flow" else (section.rewards or None)
    entries = [] if not spec else [(f"{fam}.rewards.{k}", t, o, REWARDS) for k, t, _, o in _entries(spec, f"{fam}.rewards")]
    if section.process_reward:
        pr = dict(section.process_reward)
        entries.append((f"{fam}.process_reward", pr.pop("type"), pr, PROCESS_REWARDS))
    for key, typ, opts, reg in entries:
        if is_reference(typ):
            continue
        try:
            factory = reg[typ]
        except UnknownNameError as e:
            raise PreflightError(f"{key}: {e}") from None
        try:
            check_params("reward", typ, factory, opts)
            # a reward made of rewards (an ensemble) lists them: each is checked like a top-level one
            nested = getattr(factory, "sub_rewards", None)
            entries += [(f"{key}.{k}", t, o, reg) for k, t, o in nested(opts)] if callable(nested) else []
        except (TypeError, ValueError) as e:
            raise PreflightError(f"{key}: {e}") from None
        values = dict(opts)
        try:
            for p in inspect.signature(factory).parameters.values():
                if p.default is not inspect.Parameter.empty:
                    values.setdefault(p.name, p.default)
        except (TypeError, ValueError):
            pass
        for opt, v in values.items():
            if not isinstance(v, str):
                continue
            if v.lower().endswith(WEIGHT_SUFFIXES) and not Path(v).expanduser().is_file():
                raise PreflightError(f"{key}.{opt}={v!r}: no such file (relative to {Path.cwd()}); download it and "
                                     f"give its path")
            if HUB_ID.match(v) and not Path(v).exists():
                try:
                    model_dir(v, "config.json", f"{key}.{opt}", f"pass a local folder: {key}.{opt}=/path/to/it")
                except ModelNotLocal:
                    pass
    return [k for k, *_ in entries]


def _adapter_check(cfg) -> str:
    """The model adapter is registered for the config's family (an LLM may also name a hub id / folder)."""
    from flowrl.pipelines.registry import PIPELINES, pipeline_names

    fam = family(cfg)
    name = cfg.flow.model if fam == "flow" else cfg.llm.model
    if name in pipeline_names(fam):
        return f"{fam}.model={name} (registered)"
    if fam == "llm" and name not in PIPELINES:
        return f"llm.model={name}: the causal_lm adapter (a transformers causal LM)"
    raise PreflightError(f"{fam}.model={name!r} is not a registered {fam} model adapter; valid: {pipeline_names(fam)}")


def _data_check(cfg) -> str:
    if family(cfg) == "flow":
        from flowrl.train.flow_data import load_prompt_sets

        train, ev = load_prompt_sets(cfg)
        t = f"{len(train)} training ({train.source})" if train else "the adapter's default training prompts"
        e = f"{len(ev)} evaluation ({ev.source})" if ev else "evaluation on the training prompts"
        return f"{t}; {e}"
    from flowrl.train.llm_data import load_dataset

    train, ev = load_dataset(cfg)
    return f"{len(train)} training rows, {len(ev)} evaluation rows (llm.dataset={cfg.llm.dataset})"


def _gb(b: int) -> str:
    return f"{b / 2**30:9.2f} GiB" if b >= 2**30 else f"{b / 2**20:9.2f} MiB"


def _diversity_check(cfg) -> str:
    """``eval.diversity_features`` (flow): a registered sample feature with options it accepts, and measured only
    with at least two evaluation samples per prompt."""
    if family(cfg) != "flow" or cfg.eval.diversity_features is None:
        return "not measured (eval.diversity_features is null)" if family(cfg) == "flow" else "the task's own"
    from flowrl.rewards.features import FEATURES
    from flowrl.train.flow_eval import feature_spec

    name, opts = feature_spec(cfg.eval.diversity_features)
    try:
        FEATURES.check_params(name, opts)
    except (KeyError, TypeError, ValueError) as e:
        raise PreflightError(f"eval.diversity_features={cfg.eval.diversity_features!r}: {e}") from None
    if cfg.eval.num_per_prompt < 2:
        return f"{name} (not measured: eval.num_per_prompt={cfg.eval.num_per_prompt} gives no pair of samples)"
    return f"{name} features, per prompt ({cfg.eval.num_per_prompt} samples), unless the model adapter evaluates itself"


def run_preflight(cfg, config_path: str = "", *, out=None) -> tuple[int, list[str]]:
    """Print the checks and the memory table of ``cfg`` (to ``out``, default stdout); returns (exit status 0 or
    2, failure sentences)."""
    out = out if out is not None else sys.stdout
    failures: list[str] = []

    def row(status: str, what: str, text: str) -> None:
        print(f"  {status:<5} {what:<9} {text}", file=out)

    fam = family(cfg)
    print(f"flowrl train --dry-run {config_path}".rstrip(), file=out)
    model = cfg.flow.model if fam == "flow" else cfg.llm.model
    row("ok", "config", f"algorithm {cfg.algorithm}, estimator {cfg.advantage.estimator}, loss {cfg.loss.name}, "
                        f"{fam} model {model}")
    checks = (("adapter", _adapter_check), ("data", _data_check),
              ("rewards", lambda c: ", ".join(_reward_checks(c)) or "the dataset's own"), ("diversity", _diversity_check))
    for what, fn in checks:
        try:
            row("ok", what, fn(cfg))
        except Exception as e:  # every check reports; none stops the others
            failures.append(f"{what}: {e}")
            row("FAIL", what, str(e))
    est = None
    try:
        est = estimate_memory(cfg)
        ref, key, _ = model_ref(cfg)
        row("ok", "model", f"{key}={ref}" if ref else f"{key}: the adapter's own weights")
    except PreflightError as e:
        failures.append(str(e))
        row("FAIL", "model", str(e))
    if est is not None and not est.components:  # nothing to size (an adapter's own weights, a model not local)
        for n in est.notes:
            print(f"  memory: {n}", file=out)
    elif est is not None:
        print(f"memory per rank (world size {world_size_of(None)}; DDP: every rank holds all of it)"
              f"{'' if est.complete else ' - INCOMPLETE'}:", file=out)
        for c in est.components:
            print(f"    {c.name:<16} {c.params / 1e6:10.1f} M params {c.dtype:<9} {_gb(c.bytes)}", file=out)
        terms = (("parameters", est.params), (f"trainable ({est.trainable_params / 1e6:.2f} M)", est.trainable),
                 ("gradients", est.gradients), ("optimiser state", est.optimizer), ("reference copy", est.reference),
                 ("EMA copy", est.ema), ("activations (rough)", est.activations), ("total", est.total))
        for name, b in terms:
            print(f"  {name:<26} {_gb(b)}", file=out)
        for n in est.notes:
            print(f"  note: {n}", file=out)
    return (2 if failures else 0), failures
