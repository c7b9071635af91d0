"""Rewards from the user's own code, named in a config by reference instead of a registered name.

A **reference** is ``"<module>:<attribute>"``: a dotted module importable from the environment
(``"my_pkg.rewards:score"``) or the path of a ``.py`` file relative to the working directory
(``"./my_rewards.py:score"``). Any reward name with a ``:`` is a reference; it goes wherever a registered name
goes: a key or a ``type`` of ``llm.rewards`` / ``flow.rewards``, the ``type`` of a process reward::

    llm:
      rewards:
        examples/trl_reward.py:exact_answer: {weight: 1.0}          # score part "exact_answer"
        fmt: {type: "my_pkg.rewards:format_score", weight: 0.2}    # score part "fmt"

The attribute is a class (or a factory) called with the entry's options, returning a reward object as a
registered class would; or a plain function, wrapped according to its signature (read from its parameter
names, in this order):

- **flowrl**: ``fn(samples, prompts, meta)`` (the first three parameters carry these names), returning float
  [B] (a tensor, array or list) or a dict of parts like a registered reward.
- **verl** (``custom_reward_function``): a parameter named ``solution_str``:
  ``fn(data_source, solution_str, ground_truth, extra_info)``, called once per sample with the completion,
  ``meta["ground_truth"]`` (else ``meta["answer"]``), ``meta["data_source"]`` (else ``""``) and
  ``meta["extra_info"]`` (else the sample's other columns as a dict); returns a number or a dict with ``"score"``.
- **TRL** (``GRPOTrainer(reward_funcs=...)``): a parameter named ``completions``, or ``**kwargs``:
  ``fn(prompts=..., completions=..., **columns)`` where ``columns`` are the batch's meta (an LLM dataset's
  extra columns: ``answer``, ``tests``, ...; tensors as lists), one entry per sample, passed by keyword (only
  those the function names, unless it takes ``**kwargs``). Returns ``list[float | None]`` of length B.

A ``None`` score (any signature) marks that sample invalid: it is dropped from the loss and counted in the
metric ``reward/<name>/invalid``; a failure or a NaN is an error (or masked, with ``on_error: mask``). The
options of a wrapped function are ``name`` (the score part; default: the function's name) and ``on_error``.

Process rewards (``{type: reference, ...}``): a class or factory is built with the options (flow or text);
a plain function is a **text** process reward when its parameters start ``(prompts, steps`` (called as
``fn(prompts, steps, meta)`` when the third is ``meta``, else with the meta columns by keyword), returning
float [B, S] or ragged lists (``None`` / missing steps -> NaN); a **flow** process reward when they start
``(x_t, sigma, cond)``, returning float [B] (option ``differentiable``, default True: autograd runs through it).

:func:`check_reference` validates a reference when the config is read, from the file's source alone (the
module or file exists and defines the attribute, with a usable signature): the user's module is not imported,
so nothing heavy loads before training. The user's code runs in the trainer's process, as in TRL.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowrl.core.registry import import_file

from .base import Meta, Parts, Reward, RewardError, batch_size_of

FLOWRL_PARAMS = ("samples", "prompts", "meta")
TEXT_PROCESS_PARAMS = ("prompts", "steps")
FLOW_PROCESS_PARAMS = ("x_t", "sigma", "cond")


class BadReference(ValueError):
    """A reference that does not resolve: no such module or file, no such attribute, or an unusable signature."""


def is_reference(name: Any) -> bool:
    """True when ``name`` names the user's code (``"module:attr"`` / ``"file.py:attr"``), not a registered name."""
    return isinstance(name, str) and ":" in name


def split_reference(ref: str) -> tuple[str, str]:
    """``"pkg.mod:fn"`` -> ``("pkg.mod", "fn")``; ``"./r.py:fn"`` -> ``("./r.py", "fn")``."""
    target, _, attr = ref.rpartition(":")
    if not target or not attr.isidentifier():
        raise BadReference(f"reward reference {ref!r} is not '<module>:<function>' or '<file.py>:<function>'")
    return target, attr


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _source_of(ref: str) -> tuple[Optional[str], str]:
    """(source text or None when the module has no Python source, where it lives) of a reference's module."""
    target, _ = split_reference(ref)
    if _is_path(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise BadReference(f"reward {ref!r}: no such file {target!r} (paths are relative to the working "
                                  f"directory {Path.cwd()})")
        return path.read_text(), str(path)
    try:
        spec = importlib.util.find_spec(target)  # imports the parent packages only, not the module itself
    except (ImportError, ValueError) as e:
        raise BadReference(f"reward {ref!r}: cannot find module {target!r} ({type(e).__name__}: {e})") from None
    if spec is None:
        raise BadReference(f"reward {ref!r}: no module named {target!r} in this environment; give an importable "
                              "dotted module or a .py path")
    origin = spec.origin if spec.origin and spec.origin.endswith(".py") else None
    return (Path(origin).read_text() if origin else None), (origin or target)


def _top_level(tree: ast.Module) -> tuple[dict[str, ast.AST], bool]:
    """{name: defining node} of a module's top level (inside if/try too), and whether it may define names
    the source does not show (``import *``, a module ``__getattr__``)."""
    found: dict[str, ast.AST] = {}
    dynamic = False
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
            dynamic |= node.name == "__getattr__"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        found[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                dynamic |= a.name == "*"
                found[(a.asname or a.name).split(".")[0]] = node
        elif isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            for h in getattr(node, "handlers", []):
                todo += h.body
    return found, dynamic


def signature_kind(params: Sequence[str], var_kw: bool, process: bool = False) -> Optional[str]:
    """Which calling convention a function's parameter names select (module docstring), or None."""
    p = tuple(params)
    if process:
        if p[:3] == FLOW_PROCESS_PARAMS:
            return "flow"
        return "text" if p[:2] == TEXT_PROCESS_PARAMS else None
    if p[:3] == FLOWRL_PARAMS:
        return "flowrl"
    if "solution_str" in p:
        return "verl"
    return "trl" if "completions" in p or var_kw else None


def _usage(process: bool) -> str:
    if process:
        return "a text process reward (prompts, steps, ...) or a flow one (x_t, sigma, cond)"
    return ("flowrl's (samples, prompts, meta), TRL's (prompts, completions, **kwargs) or verl's "
            "(data_source, solution_str, ground_truth, extra_info)")


def check_reference(ref: str, *, process: bool = False, key: str = "rewards") -> None:
    """Raise ValueError (one line, naming ``key``) unless ``ref``'s module or file exists and defines the attribute;
    a function defined there must have a usable signature. Reads the source; imports nothing of the user's."""
    try:
        target, attr = split_reference(ref)
        source, where = _source_of(ref)
        if source is None:  # a compiled module: nothing to read before importing it
            return
        try:
            tree = ast.parse(source, filename=where)
        except SyntaxError as e:
            raise BadReference(f"reward {ref!r}: {where} line {e.lineno}: syntax error: {e.msg}") from None
        found, dynamic = _top_level(tree)
        if attr not in found:
            if dynamic:
                return
            funcs = sorted(n for n, v in found.items() if isinstance(v, (ast.FunctionDef, ast.ClassDef)) and n[0] != "_")
            raise BadReference(f"reward {ref!r}: {where} defines no {attr!r}; it defines: {funcs}")
        node = found[attr]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            if signature_kind(params, a.kwarg is not None, process) is None:
                raise BadReference(f"reward {ref!r}: {attr}({', '.join(params)}) does not have {_usage(process)} "
                                      "signature")
    except BadReference as e:
        raise ValueError(f"{key}: {e}") from None


# ----------------------------------------------------------------------------------------------- loading
def _import_file(path: Path):
    """The file's module, imported once (the same module ``plugins:`` gives that file)."""
    return import_file(path)


def load_reference(ref: str, *, process: bool = False) -> Any:
    """Import the module or file of ``ref`` and return its attribute (errors name the reference)."""
    check_reference(ref, process=process, key="process reward" if process else "reward")
    target, attr = split_reference(ref)
    try:
        module = _import_file(Path(target).expanduser().resolve()) if _is_path(target) else importlib.import_module(target)
    except Exception as e:
        raise RewardError(f"reward {ref!r}: importing {target!r} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise RewardError(f"reward {ref!r}: {target!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _params(fn: Callable) -> tuple[list[str], bool, set[str]]:
    """(parameter names, takes **kwargs, names without a default)."""
    sig = inspect.signature(fn)
    ps = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return [p.name for p in ps], var_kw, {p.name for p in ps if p.default is p.empty}


def _column(v: Any) -> Any:
    return v.tolist() if isinstance(v, Tensor) or hasattr(v, "tolist") else v


def _scores(out: Any, B: int, who: str) -> Tensor:
    """float [B] from a tensor, an array or a list with None entries (None -> NaN)."""
    if isinstance(out, (list, tuple)):
        if len(out) != B:
            raise RewardError(f"{who} returned {len(out)} scores for {B} samples")
        bad = [x for x in out if x is not None and not isinstance(x, (int, float)) and not hasattr(x, "__float__")]
        if bad:
            raise RewardError(f"{who} returned {type(bad[0]).__name__} scores; give numbers (or None: no score)")
        return torch.tensor([float("nan") if x is None else float(x) for x in out], dtype=torch.float32)
    return torch.as_tensor(out, dtype=torch.float32)


class UserReward(Reward):
    """A user's plain function as an outcome reward (module docstring: signatures, None, options).

    Parts: ``<name>`` (NaN where the function gave None) and ``<name>/valid`` (bool: the function gave a score).
    """

    def __init__(self, fn: Callable, *, name: str, on_error: str = "raise", ref: str = ""):
        super().__init__(name=name, on_error=on_error)
        self.fn, self.ref = fn, ref or getattr(fn, "__qualname__", repr(fn))
        params, self.var_kw, self.required = _params(fn)
        self.params = params
        self.kind = signature_kind(params, self.var_kw)
        if self.kind is None:
            raise RewardError(f"reward {self.ref!r}: {fn.__name__}({', '.join(params)}) does not have {_usage(False)} "
                              "signature")

    def _keywords(self, prompts: Sequence, samples: Any, meta: Meta, B: int) -> dict[str, Any]:
        cols = {k: _column(v) for k, v in (meta or {}).items()}
        kw = {"prompts": list(prompts), "completions": samples, **{k: v for k, v in cols.items() if k not in
                                                                     ("prompts", "completions")}}
        if not self.var_kw:
            kw = {k: v for k, v in kw.items() if k in self.params}
        missing = sorted(self.required - set(kw))
        if missing:
            raise RewardError(f"reward {self.ref!r} takes {missing} but the batch has no such column; columns: "
                              f"{sorted(cols)} (an LLM dataset's extra columns arrive by keyword)")
        return kw

    def _verl(self, samples: Any, meta: Meta, B: int) -> list:
        cols = {k: _column(v) for k, v in (meta or {}).items()}
        truth = cols.get("ground_truth", cols.get("answer"))
        if truth is None:
            raise RewardError(f"reward {self.ref!r} (verl signature) needs a 'ground_truth' or 'answer' column; "
                              f"columns: {sorted(cols)}")
        out = []
        for i in range(B):  # verl's compute_score is per sample
            row = {k: v[i] for k, v in cols.items() if isinstance(v, list) and len(v) == B}
            s = self.fn(data_source=row.get("data_source", ""), solution_str=samples[i], ground_truth=truth[i],
                        extra_info=row.get("extra_info", row))
            out.append(s.get("score") if isinstance(s, Mapping) else s)
        return out

    def score(self, samples, prompts, meta) -> Parts:
        B = batch_size_of(samples)
        if self.kind == "flowrl":
            out = self.fn(samples, prompts, meta)
            if isinstance(out, Mapping):
                parts = {(self.name if k == self.fn.__name__ else k): v for k, v in out.items()}
                if self.name in parts:
                    parts[self.name] = _scores(parts[self.name], B, f"reward {self.ref!r}")
                return parts
        elif self.kind == "verl":
            out = self._verl(samples, meta, B)
        else:
            out = self.fn(**self._keywords(prompts, samples, meta, B))
        s = _scores(out, B, f"reward {self.ref!r}")
        none = torch.tensor([x is None for x in out], dtype=torch.bool) if isinstance(out, (list, tuple)) else None
        valid = ~none if none is not None else torch.ones(B, dtype=torch.bool)
        return {self.name: s, f"{self.name}/valid": valid}

    def _checked(self, samples, prompts, meta, B, finite: bool = True) -> Parts:
        parts = super()._checked(samples, prompts, meta, B, finite=False)
        valid = parts.get(f"{self.name}/valid")
        bad = ~torch.isfinite(parts[self.name])
        if valid is not None:
            bad &= valid.to(bad.device)  # a None is a masked sample, not a failure
        if finite and bool(bad.any()):
            raise RewardError(f"reward {self.name!r} gave a non-finite score for samples {bad.nonzero().flatten().tolist()}")
        return parts


class UserTextProcessReward:
    """A user's function as a text process reward: ``(prompts, steps, meta | **columns) -> float [B, S]``."""

    def __init__(self, fn: Callable, *, name: str):
        self.fn, self.name = fn, name
        self.params, self.var_kw, self.required = _params(fn)

    def __call__(self, prompts: Sequence[str], steps: Sequence[Sequence[str]], meta: Meta = None) -> Tensor:
        if self.params[2:3] == ["meta"]:
            out = self.fn(prompts, steps, meta)
        else:
            cols = {k: _column(v) for k, v in (meta or {}).items()}
            kw = cols if self.var_kw else {k: v for k, v in cols.items() if k in self.params}
            out = self.fn(prompts, steps, **kw)
        if isinstance(out, Tensor):
            return out.float()
        S = max((len(r) for r in out), default=0)
        return torch.tensor([[float("nan") if j >= len(r) or r[j] is None else float(r[j]) for j in range(S)]
                             for r in out], dtype=torch.float32).reshape(len(out), S)


class UserFlowProcessReward:
    """A user's function as a flow process reward: ``(x_t [B, ...], sigma [B], cond) -> float [B]``."""

    def __init__(self, fn: Callable, *, name: str, differentiable: bool = True):
        self.fn, self.name, self.differentiable = fn, name, differentiable

    def __call__(self, x_t: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        return torch.as_tensor(self.fn(x_t, sigma, cond))


def reference_factory(ref: str, *, process: bool = False) -> Callable[..., Any]:
    """The factory a reference names, as a registry entry would be: ``(**options) -> reward``. A class or a
    factory the user wrote is returned as it is; a plain function is wrapped by its signature."""
    obj = load_reference(ref, process=process)
    _, attr = split_reference(ref)
    if inspect.isclass(obj) or not callable(obj):
        return obj
    params, var_kw, _ = _params(obj)
    kind = signature_kind(params, var_kw, process)
    if kind is None:
        raise RewardError(f"reward {ref!r}: {attr}({', '.join(params)}) does not have {_usage(process)} signature")
    if kind == "flow":
        def flow_factory(*, name: str = attr, differentiable: bool = True):
            return UserFlowProcessReward(obj, name=name, differentiable=differentiable)
        return flow_factory
    if kind == "text":
        def text_factory(*, name: str = attr):
            return UserTextProcessReward(obj, name=name)
        return text_factory

    def factory(*, name: str = attr, on_error: str = "raise"):
        return UserReward(obj, name=name, on_error=on_error, ref=ref)
    return factory


def default_name(ref: str) -> str:
    """The score part's default name of a reference: its attribute (``"r.py:exact"`` -> ``"exact"``)."""
    return split_reference(ref)[1]
