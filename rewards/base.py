"""The reward interface, the registry, combination by weights, the failure policy and offline loading.

Outcome reward (every registered reward is one)::

    reward(samples, prompts, meta) -> dict[str, Tensor[B]]

- ``samples``: images float [B, C, H, W] in [0, 1] (or a list of PIL images), video float
  [B, F, C, H, W] in [0, 1], or text as ``list[str]``.
- ``prompts``: ``list[str]`` of length B (the prompt each sample answers).
- ``meta``: ``dict[str, Any]`` of batch-first per-sample values (``meta["digit"]`` long [B],
  ``meta["answer"]`` list[str], ...) or None.
- Returns named float [B] parts. The part whose key is the reward's ``name`` is its **score** (what a
  weight multiplies); other parts are diagnostics named ``"<name>/<what>"`` (e.g. ``"digits/accuracy"``)
  and are kept for logging as the core's ``outcome_parts``.

Process rewards::

    FlowProcessReward: (x_t float [B, ...], sigma float [B], cond: Cond) -> float [B]
                       (differentiable w.r.t. x_t where the underlying model is; ``differentiable`` says so)
    TextProcessReward: (prompts list[str], steps list[list[str]], meta) -> float [B, S]
                       (the score of each reasoning step; NaN where a sample has fewer than S steps)

Failure policy (``on_error``): ``"raise"`` (default) lets a failure or a non-finite score raise
:class:`RewardError` naming the reward; ``"mask"`` re-scores the batch sample by sample, puts NaN in
every part of each sample that still fails and adds a bool part ``"<name>/valid"``. Nothing becomes a
silent zero. :class:`CombinedReward` combines several rewards with weights (``flowrl.core.weighted_sum``)
and reports the invalid count; :mod:`flowrl.rewards.build` builds rewards from a config (registered names,
or references to the user's own functions: :mod:`flowrl.rewards.user`).

Offline weights: :func:`hub_guard` turns the hub's "not cached and offline" errors (and a missing local
path) into :class:`MissingWeightsError`, whose message names the model id and how to pass a local path.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from flowrl.core import weighted_sum
from flowrl.core.registry import Registry, import_submodules

Samples = Union[Tensor, Sequence[Any], Sequence[str]]
Meta = Optional[Mapping[str, Any]]
Parts = dict[str, Tensor]
ON_ERROR = ("raise", "mask")
# parts "<name>/<reason>" (1 where a sample scored 0 for that reason) whose counts go to the metrics
_COUNTED = ("/timeout", "/rejected")


class RewardError(RuntimeError):
    """A reward failed (raised, returned a wrong shape, or a non-finite score) under ``on_error="raise"``."""


class MissingWeightsError(RuntimeError):
    """Weights are neither cached nor at the given path, and the hub cannot be reached (or is offline)."""


# --------------------------------------------------------------------------------------------- interface
@runtime_checkable
class OutcomeReward(Protocol):
    """Anything called as ``(samples, prompts, meta) -> dict[str, float [B]]``."""

    name: str

    def __call__(self, samples: Samples, prompts: Sequence[str], meta: Meta = None) -> Parts: ...


@runtime_checkable
class FlowProcessReward(Protocol):
    """A process reward on the flow state: ``(x_t [B, ...], sigma [B], cond) -> float [B]``."""

    name: str
    differentiable: bool

    def __call__(self, x_t: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor: ...


@runtime_checkable
class TextProcessReward(Protocol):
    """A process reward per reasoning step: ``(prompts, steps, meta) -> float [B, S]`` (NaN past a sample's last step)."""

    name: str

    def __call__(self, prompts: Sequence[str], steps: Sequence[Sequence[str]], meta: Meta = None) -> Tensor: ...


def batch_size_of(samples: Samples) -> int:
    """B of a batch of samples: a tensor's first dim, or the length of a list."""
    if isinstance(samples, Tensor):
        if samples.dim() == 0:
            raise ValueError("reward samples: a 0-dim tensor is not a batch; give [B, ...]")
        return int(samples.shape[0])
    if isinstance(samples, (list, tuple)):
        return len(samples)
    raise TypeError(
        f"reward samples must be a tensor [B, ...] or a list (PIL images or strings); got {type(samples).__name__}"
    )


def slice_samples(samples: Samples, idx: Sequence[int]) -> Samples:
    """Rows ``idx`` of a batch of samples (tensor or list)."""
    if isinstance(samples, Tensor):
        return samples[torch.as_tensor(list(idx), dtype=torch.long, device=samples.device)]
    return [samples[i] for i in idx]


def slice_meta(meta: Meta, idx: Sequence[int], B: int) -> Meta:
    """Rows ``idx`` of every batch-first value of ``meta`` (values whose length is not B are kept whole)."""
    if meta is None:
        return None
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B:
            out[k] = v[torch.as_tensor(list(idx), dtype=torch.long, device=v.device)]
        elif isinstance(v, np.ndarray) and v.ndim > 0 and v.shape[0] == B:
            out[k] = v[list(idx)]
        elif isinstance(v, (list, tuple)) and len(v) == B:
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------- base class
class Reward:
    """Base class of an outcome reward: subclasses implement ``score(samples, prompts, meta) -> Parts``.

    ``__call__`` checks the inputs (B samples, B prompts), checks every returned part is float [B] and
    that the score part (key ``self.name``) is finite, and applies the failure policy ``on_error``.
    """

    name: str = "reward"

    def __init__(self, *, name: Optional[str] = None, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise ValueError(f"reward on_error={on_error!r} is not valid; valid values: {list(ON_ERROR)}")
        if name is not None:
            self.name = name
        self.on_error = on_error

    # subclasses implement this
    def score(self, samples: Samples, prompts: Sequence[str], meta: Meta) -> Parts:
        raise NotImplementedError

    def _checked(self, samples: Samples, prompts: Sequence[str], meta: Meta, B: int, finite: bool = True) -> Parts:
        parts = self.score(samples, prompts, meta)
        if not isinstance(parts, Mapping) or self.name not in parts:
            raise RewardError(
                f"reward {self.name!r} returned {type(parts).__name__} with keys "
                f"{sorted(parts) if isinstance(parts, Mapping) else None}; it must return a dict with the key {self.name!r}"
            )
        dev = samples.device if isinstance(samples, Tensor) else torch.device("cpu")  # parts live with the samples
        out: Parts = {}
        for k, v in parts.items():
            v = torch.as_tensor(v).to(dev)
            if tuple(v.shape) != (B,):
                raise RewardError(f"reward {self.name!r} part {k!r} has shape {tuple(v.shape)}; expected float [B] = ({B},)")
            out[k] = v.to(torch.float32) if v.dtype != torch.bool else v
        bad = ~torch.isfinite(out[self.name])
        if finite and bool(bad.any()):
            raise RewardError(
                f"reward {self.name!r} gave a non-finite score for samples {bad.nonzero().flatten().tolist()}"
            )
        return out

    def __call__(self, samples: Samples, prompts: Sequence[str], meta: Meta = None) -> Parts:
        B = batch_size_of(samples)
        if prompts is None:
            prompts = [""] * B
        if isinstance(prompts, str) or len(prompts) != B:
            raise ValueError(
                f"reward {self.name!r}: got {B} samples but "
                f"{'a single string' if isinstance(prompts, str) else len(prompts)} prompts; give one prompt per sample"
            )
        if B == 0:
            raise ValueError(f"reward {self.name!r}: empty batch")
        if self.on_error == "raise":
            try:
                return self._checked(samples, prompts, meta, B)
            except (RewardError, MissingWeightsError):
                raise
            except Exception as e:  # bad input, a model or a library failed: say which reward
                raise RewardError(f"reward {self.name!r} failed: {type(e).__name__}: {e}") from e
        # on_error == "mask": try the whole batch; on failure, isolate the failing samples one by one
        try:
            parts = self._checked(samples, prompts, meta, B, finite=False)
        except Exception:
            parts = None
        if parts is not None:  # the batch ran: samples with a non-finite score are the invalid ones
            valid = torch.isfinite(parts[self.name])
            for k, v in parts.items():
                if v.dtype != torch.bool:
                    parts[k] = torch.where(valid.to(v.device), v, torch.full_like(v, float("nan")))
            parts[f"{self.name}/valid"] = valid
            return parts
        rows: list[Optional[Parts]] = []
        for i in range(B):  # a reward outside the core; only on a failing batch
            try:
                rows.append(self._checked(slice_samples(samples, [i]), [prompts[i]], slice_meta(meta, [i], B), 1))
            except Exception:
                rows.append(None)
        ok = [r for r in rows if r is not None]
        keys = list(ok[0]) if ok else [self.name]
        out: Parts = {}
        for k in keys:
            col = [r[k][0].float() if r is not None and k in r else torch.tensor(float("nan")) for r in rows]
            out[k] = torch.stack(col)
        out[f"{self.name}/valid"] = torch.tensor([r is not None for r in rows], dtype=torch.bool)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, on_error={self.on_error!r})"


class FunctionReward(Reward):
    """A plain function ``fn(samples, prompts, meta) -> Tensor[B] | dict`` made a :class:`Reward`."""

    def __init__(self, fn: Callable[..., Any], *, name: str, on_error: str = "raise", registered: Optional[str] = None):
        super().__init__(name=name, on_error=on_error)
        self.fn = fn
        self.registered = registered or name  # the part names the function itself uses

    def score(self, samples, prompts, meta):
        out = self.fn(samples, prompts, meta)
        if not isinstance(out, Mapping):
            return {self.name: torch.as_tensor(out)}
        reg = self.registered  # rename "<registered>" / "<registered>/x" to this instance's name
        return {self.name + k[len(reg):] if k == reg or k.startswith(reg + "/") else k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------- registry
# Modules of flowrl.rewards that register nothing (importing them to fill the registries is wasted work).
_NOT_PLUGINS = ("base", "build", "user", "safe_eval", "scoring", "deadline", "server")


def _load_builtin() -> dict[str, str]:
    """Import every module of ``flowrl.rewards`` (they register themselves on import); {module: error}."""
    return import_submodules("flowrl.rewards", exclude=_NOT_PLUGINS)


# name -> reward class or factory ``(**options) -> Reward``; lazily complete (the loader runs on first lookup)
REWARDS = Registry("reward", loader=_load_builtin)
# name -> process-reward class or factory ``(**options) -> FlowProcessReward | TextProcessReward``
PROCESS_REWARDS = Registry("process reward", loader=_load_builtin)


def _named(name: str, obj):
    if inspect.isclass(obj) and "name" not in vars(obj):
        obj.name = name  # default key of the score part
    return obj


def register_reward(name: str):
    """Decorator: register an outcome-reward class (or a factory ``(**kwargs) -> Reward``) under ``name``.

    A decorated plain function with the signature ``(samples, prompts, meta)`` is registered as a
    model-free reward (wrapped in :class:`FunctionReward`) whose only options are ``name`` and ``on_error``.
    """

    def deco(obj):
        target = obj
        if not inspect.isclass(obj):
            params = list(inspect.signature(obj).parameters)
            if params[:3] == ["samples", "prompts", "meta"]:
                fn, registered = obj, name

                def target(*, name: str = name, on_error: str = "raise"):  # noqa: F811
                    return FunctionReward(fn, name=name, on_error=on_error, registered=registered)

                # the registry tells two plug-ins apart by qualified name: give the wrapper the function's
                target.__doc__, target.__module__, target.__qualname__ = fn.__doc__, fn.__module__, fn.__qualname__
        REWARDS.register(name)(_named(name, target))
        return obj

    return deco


def register_process_reward(name: str):
    """Decorator: register a process-reward class or factory under ``name`` (flow or text)."""

    def deco(obj):
        return PROCESS_REWARDS.register(name)(_named(name, obj))

    return deco


@dataclass
class CombinedReward:
    """Several rewards with weights. ``__call__`` returns every part of every reward (the core's
    ``outcome_parts``); :meth:`combine` gives the weighted outcome and validity:

        outcome_i = sum_k w_k * score_k,i          (flowrl.core.weighted_sum)
        valid_i   = AND_k isfinite(score_k,i)

    ``rewards``: ``{config key: Reward}``; ``weights``: ``{score part name: float}`` (a reward's ``name``).
    """

    rewards: dict[str, Any]
    weights: dict[str, float]
    name: str = "combined"

    def __call__(self, samples: Samples, prompts: Sequence[str], meta: Meta = None) -> Parts:
        parts: Parts = {}
        for key, r in self.rewards.items():  # a handful of rewards
            for k, v in r(samples, prompts, meta).items():
                if k in parts:
                    raise ValueError(f"two rewards both give the part {k!r}; give them distinct names")
                parts[k] = v
        return parts

    def combine(self, parts: Parts) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(outcome float [B] (NaN where invalid), valid bool [B], metrics) from the parts of ``__call__``."""
        scores = {k: parts[k] for k in self.weights}
        outcome = weighted_sum(scores, self.weights)
        valid = torch.isfinite(outcome)
        metrics = {"reward/invalid": float((~valid).sum())}
        for k, v in parts.items():
            if v.dtype == torch.bool and k.endswith("/valid"):  # one reward's masked samples
                metrics[f"reward/{k[: -len('/valid')]}/invalid"] = float((~v).sum())
            elif v.dtype != torch.bool:
                fin = torch.isfinite(v)
                metrics[f"reward/{k}"] = float(v[fin].mean()) if bool(fin.any()) else float("nan")
                if k.endswith(_COUNTED):  # samples scored 0 for a reason (deadline, refused answer): how many
                    metrics[f"reward/{k}/count"] = float(v[fin].sum())
        return outcome, valid, metrics

    def score(self, samples: Samples, prompts: Sequence[str], meta: Meta = None) -> tuple[Tensor, Parts, Tensor, dict]:
        """All in one: (outcome [B], parts, valid [B], metrics)."""
        parts = self(samples, prompts, meta)
        outcome, valid, metrics = self.combine(parts)
        return outcome, parts, valid, metrics


# --------------------------------------------------------------------------------------------- offline loading
def hub_offline() -> bool:
    """True when the Hugging Face hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _missing_message(model_id: str, how: str, cause: Optional[BaseException] = None) -> str:
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause is not None else ""
    return (
        f"weights for {model_id!r} are not available offline{why}. Download them once where there is "
        f"network (or copy them here) and pass a local path: {how}"
    )


def _is_missing_error(e: BaseException) -> bool:
    """True when ``e`` or an exception in its cause/context chain says: weights not found / offline."""
    seen = 0
    while e is not None and seen < 10:  # bounded walk along the chain
        if _is_missing_one(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _is_missing_one(e: BaseException) -> bool:
    names = {type(c).__name__ for c in type(e).__mro__}
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError", "EntryNotFoundError",
                "GatedRepoError", "HFValidationError", "FileNotFoundError", "URLError", "ConnectionError"}:
        return True
    msg = str(e)
    return isinstance(e, (OSError, ValueError)) and any(
        s in msg for s in ("offline", "Offline", "couldn't connect", "not a local folder", "does not appear to have",
                           "We couldn't connect", "No such file", "cannot find", "Cannot find", "Failed to download")
    )


@contextlib.contextmanager
def hub_guard(model_id: str, how: str) -> Iterator[None]:
    """Re-raise the hub's offline/not-found errors inside the block as :class:`MissingWeightsError`
    (naming ``model_id`` and ``how`` to give a local path)."""
    try:
        yield
    except MissingWeightsError:
        raise
    except Exception as e:
        if _is_missing_error(e):
            raise MissingWeightsError(_missing_message(model_id, how, e)) from e
        raise


def require_path(path: Optional[str], what: str, how: str) -> str:
    """``path`` if it exists, else :class:`MissingWeightsError` naming ``what`` and ``how``."""
    if path is None:
        raise MissingWeightsError(f"{what}: no weight path given. {how}")
    p = os.path.expanduser(str(path))
    if not os.path.exists(p):
        raise MissingWeightsError(f"{what}: weight file {p!r} does not exist. {how}")
    return p


def load_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True`` (never unpickles code).

    A checkpoint that wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path!r} holds {type(sd).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------- image helpers
def to_image_tensor(samples: Samples) -> Tensor:
    """Images as float [B, C, H, W] in [0, 1]: a float tensor is checked, a uint8 tensor scaled, PIL converted."""
    if isinstance(samples, Tensor):
        x = samples
        if x.dim() != 4:
            raise ValueError(f"image reward: need images [B, C, H, W]; got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        if not x.is_floating_point():
            raise TypeError(f"image reward: image tensor dtype {x.dtype} is not float or uint8")
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3 or lo != lo or hi != hi:
            raise ValueError(f"image reward: float images must lie in [0, 1]; got values in [{lo:.4g}, {hi:.4g}] "
                             "(pipeline.decode gives [0, 1]; latents or [-1, 1] pixels are not images)")
        return x.float()
    if isinstance(samples, (list, tuple)) and samples and all(hasattr(s, "convert") for s in samples):
        arrs = [np.asarray(s.convert("RGB"), dtype=np.uint8) for s in samples]
        if len({a.shape for a in arrs}) != 1:
            raise ValueError(f"image reward: PIL images of different sizes {sorted({a.shape for a in arrs})}")
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0
    raise TypeError(f"image reward: samples must be float [B, C, H, W] in [0, 1] or a list of PIL images; got {type(samples).__name__}")


def to_pil(samples: Samples) -> list:
    """Images as a list of RGB PIL images (float [0, 1] tensors are rounded to uint8)."""
    from PIL import Image

    if isinstance(samples, (list, tuple)) and all(hasattr(s, "convert") for s in samples):
        return [s.convert("RGB") for s in samples]
    x = to_image_tensor(samples)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in u8]
