"""TrajectoryBatch: the one data contract between rollouts, rewards, advantages and losses.

``B`` trajectories of ``T`` actions (padded) grouped into ``S`` steps (padded). An LLM completion is a
trajectory of tokens whose reasoning steps are runs of tokens; a flow model's SDE rollout is a
trajectory of denoising steps (there ``T == S`` and ``step[b, t] == t``).

Model-specific tensors (latents, timesteps, token ids) travel beside the batch; the core never reads
them. The fields, their shapes and meanings are listed in ``TrajectoryBatch``'s docstring.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor
from .kernels import native, use_native
from .masks import last_valid_index

# (name, dtype kind, shape spec) for every tensor field; "B", "T", "S" are symbolic sizes.
_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "group": ("long", ("B",)),
    "mask": ("bool", ("B", "T")),
    "step": ("long", ("B", "T")),
    "old_logp": ("float", ("B", "T")),
    "outcome": ("float", ("B",)),
    "ref_logp": ("float", ("B", "T")),
    "step_reward": ("float", ("B", "S")),
    "value": ("float", ("B", "T")),
    "entropy": ("float", ("B", "T")),
    "node": ("long", ("B", "S")),
    "sample_valid": ("bool", ("B",)),
}
_REQUIRED = ("group", "mask", "step", "old_logp", "outcome")
_OPTIONAL = tuple(k for k in _FIELDS if k not in _REQUIRED)


@dataclass
class TrajectoryBatch:
    """A batch of trajectories with rewards.

    Fields (B trajectories, T actions, S steps):
        group: long [B]. Prompt id; samples of one prompt share it, unique across ranks.
        mask: bool [B, T]. True on a real action (not padding, not a tool observation).
        step: long [B, T]. Step index of each action, in [0, S).
        old_logp: float [B, T]. Behaviour log-prob of each action, as the sampler drew it.
        outcome: float [B]. Combined outcome reward.
        outcome_parts: dict[str, float [B]]. Each named component of the outcome (for logging, GDPO).
        ref_logp: float [B, T] or None. Reference-policy log-prob.
        step_reward: float [B, S] or None. Process reward of each step; NaN where a step has none.
        value: float [B, T] or None. Critic values.
        entropy: float [B, T] or None. Policy entropy at each action.
        node: long [B, S] or None. Id of the state after each step; equal where trajectories share a prefix.
        sample_valid: bool [B] or None. False for samples masked out by ``validate(nonfinite="mask")``;
            None means every sample is valid. Invalid samples take no part in any statistic.
    """

    group: Tensor
    mask: Tensor
    step: Tensor
    old_logp: Tensor
    outcome: Tensor
    outcome_parts: dict[str, Tensor] = field(default_factory=dict)
    ref_logp: Optional[Tensor] = None
    step_reward: Optional[Tensor] = None
    value: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    node: Optional[Tensor] = None
    sample_valid: Optional[Tensor] = None
    num_masked: int = 0  # samples masked by validate(nonfinite="mask"); a count for the metrics

    # ------------------------------------------------------------------ sizes
    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_actions(self) -> int:
        return int(self.mask.shape[1])

    @property
    def num_steps(self) -> int:
        """S: the width of ``step_reward`` / ``node`` when given, else 1 + the largest step index."""
        for name in ("step_reward", "node"):
            t = getattr(self, name)
            if t is not None:
                return int(t.shape[1])
        return int(self.step.max()) + 1 if self.step.numel() else 0

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def valid(self) -> Tensor:
        """bool [B]: samples that take part in statistics."""
        if self.sample_valid is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        return self.sample_valid

    # ------------------------------------------------------------- validation
    def is_validated(self) -> bool:
        """True when ``validate`` passed on exactly these tensors (the same objects, not modified in place since)."""
        seen = getattr(self, "_validated", None)
        now = self._fingerprint()
        return seen is not None and len(seen) == len(now) and all(
            a[0] is b[0] and a[1] == b[1] for a, b in zip(seen, now))

    def _fingerprint(self) -> list:
        # the tensors themselves (held, so no id can be reused) and their in-place version counters
        ts = [getattr(self, k) for k in _FIELDS] + list(self.outcome_parts.values())
        return [(t, t._version if isinstance(t, Tensor) else None) for t in ts]

    def validate(self, *, nonfinite: str = "raise") -> "TrajectoryBatch":
        """Check shapes, dtypes and values; return the batch (a new one when samples were masked).

        nonfinite: "raise" (default) raises on a NaN/inf outcome, outcome part or step reward;
        "mask" marks those samples invalid (``sample_valid`` False, ``mask`` row False) and
        records how many in ``self.num_masked`` of the result. NaN in ``step_reward`` means "no
        reward at this step" and is always allowed; only +-inf there is non-finite.
        """
        if nonfinite not in ("raise", "mask"):
            raise ValueError(f"validate(nonfinite={nonfinite!r}): valid values are 'raise', 'mask'")
        for name in _REQUIRED:
            if not isinstance(getattr(self, name), Tensor):
                raise ValueError(f"TrajectoryBatch.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.mask.dim() != 2:
            raise ValueError(f"TrajectoryBatch.mask has shape {tuple(self.mask.shape)}; expected [B, T]")
        B, T = self.mask.shape
        if B == 0:
            raise ValueError("TrajectoryBatch is empty: mask has shape [0, T]; a batch needs at least one trajectory")
        S = None
        sizes = {"B": B, "T": T}
        for name, (kind, spec) in _FIELDS.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"TrajectoryBatch.{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if "S" in spec and S is None:
                S = t.shape[1] if t.dim() == 2 else None
                sizes["S"] = S
            expected = tuple(sizes.get(d) for d in spec)
            if tuple(t.shape) != expected:
                names = "[" + ", ".join(spec) + "]"
                raise ValueError(
                    f"TrajectoryBatch.{name} has shape {tuple(t.shape)}; expected {names} = {expected}"
                )
            if not _dtype_ok(t, kind):
                raise ValueError(f"TrajectoryBatch.{name} has dtype {t.dtype}; expected a {kind} tensor")
            if t.device != self.mask.device:
                raise ValueError(f"TrajectoryBatch.{name} is on {t.device}; mask is on {self.mask.device}")
        for k, v in self.outcome_parts.items():
            if not isinstance(v, Tensor) or tuple(v.shape) != (B,) or not v.is_floating_point():
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"TrajectoryBatch.outcome_parts[{k!r}] has shape {shape}; expected float [B] = ({B},)")
        if not bool(self.mask.any()):
            raise ValueError("TrajectoryBatch.mask has no valid action (all False)")
        # step indices must address step_reward / node.
        # fast path: one pass over step with no [B, T] temporaries; the masked check only when it fails
        lo, hi = self.step.aminmax()
        step_range = (lo, hi)  # kept: gather_steps needs it on every estimator call
        if S is not None:
            if not (bool(lo >= 0) and bool(hi < S)) and bool((self.mask & ((self.step < 0) | (self.step >= S))).any()):
                raise ValueError(f"TrajectoryBatch.step has values outside [0, S={S}) on valid actions")
        elif not bool(lo >= 0) and bool((self.step[self.mask] < 0).any()):
            raise ValueError("TrajectoryBatch.step has negative values on valid actions")

        bad = ~torch.isfinite(self.outcome)
        for v in self.outcome_parts.values():
            bad |= ~torch.isfinite(v)
        if self.step_reward is not None:
            bad |= torch.isinf(self.step_reward).any(dim=1)
        if self.sample_valid is not None:
            bad &= self.sample_valid  # already-masked samples are not re-counted
        if bool(bad.any()):
            if nonfinite == "raise":
                idx = torch.nonzero(bad).flatten()[:8].tolist()
                raise ValueError(
                    f"non-finite reward in {int(bad.sum())} sample(s) (first indices {idx}); "
                    "fix the reward, or validate(nonfinite='mask') to mask and count them"
                )
            valid = self.valid & ~bad
            out = dataclasses.replace(
                self, sample_valid=valid, mask=self.mask & valid[:, None], num_masked=int((~valid).sum())
            )
            out._validated = out._fingerprint()
            out._step_range = step_range
            return out
        self._validated = self._fingerprint()
        self._step_range = step_range
        return self

    def with_mask(self, mask: Tensor) -> "TrajectoryBatch":
        """This batch with fewer valid actions (``mask`` must not add any): still validated when this one was,
        with the same step range, so estimators do not re-check it."""
        out = dataclasses.replace(self, mask=mask)
        if self.is_validated():
            out._validated = out._fingerprint()
            out._step_range = getattr(self, "_step_range", None)
        return out

    def step_range(self) -> tuple[Tensor, Tensor]:
        """(min, max) of ``step`` over all actions, padding included: long scalar tensors. Remembered by
        ``validate`` (which computes it anyway), so the estimators that map steps to actions do not pay a pass
        over ``step`` each; recomputed when the batch is not validated or was modified since."""
        if self.is_validated() and getattr(self, "_step_range", None) is not None:
            return self._step_range
        return self.step.aminmax()

    # ------------------------------------------------------------- transforms
    def _map(self, fn) -> "TrajectoryBatch":
        kw = {k: (None if getattr(self, k) is None else fn(getattr(self, k))) for k in _FIELDS}
        kw["outcome_parts"] = {k: fn(v) for k, v in self.outcome_parts.items()}
        return TrajectoryBatch(**kw, num_masked=self.num_masked)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrajectoryBatch":
        """Move every tensor to ``device``; dtypes are kept (bool masks stay bool)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def select(self, index: Tensor) -> "TrajectoryBatch":
        """Rows ``index`` (long indices or a bool [B] mask) of every field."""
        if index.dtype == torch.bool and tuple(index.shape) != (self.batch_size,):
            raise ValueError(f"select: bool index has shape {tuple(index.shape)}; expected [B] = ({self.batch_size},)")
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        """Concatenate along B. T and S must agree; optional fields must be all given or all None."""
        if not batches:
            raise ValueError("TrajectoryBatch.cat needs at least one batch")
        first = batches[0]
        kw: dict = {"num_masked": sum(b.num_masked for b in batches)}
        for k in _FIELDS:
            vals = [getattr(b, k) for b in batches]
            if k == "sample_valid" and any(v is not None for v in vals):
                vals = [b.valid for b in batches]
            if all(v is None for v in vals):
                kw[k] = None
            elif any(v is None for v in vals):
                raise ValueError(f"TrajectoryBatch.cat: field {k!r} is None in some batches and set in others")
            else:
                shapes = {tuple(v.shape[1:]) for v in vals}
                if len(shapes) > 1:
                    raise ValueError(f"TrajectoryBatch.cat: field {k!r} has trailing shapes {sorted(shapes)}; they must agree")
                kw[k] = torch.cat(vals)
        keys = set(first.outcome_parts)
        for b in batches[1:]:
            if set(b.outcome_parts) != keys:
                raise ValueError(f"TrajectoryBatch.cat: outcome_parts keys differ: {sorted(keys)} vs {sorted(b.outcome_parts)}")
        kw["outcome_parts"] = {k: torch.cat([b.outcome_parts[k] for b in batches]) for k in first.outcome_parts}
        return TrajectoryBatch(**kw)

    def minibatches(self, n: int, generator: Optional[torch.Generator] = None) -> Iterator[tuple[Tensor, "TrajectoryBatch"]]:
        """Yield ``n`` shuffled minibatches as ``(indices, batch)``; sizes differ by at most one.

        The indices let the caller slice the model-specific tensors that travel beside the batch.
        """
        if not isinstance(n, int) or n < 1 or n > self.batch_size:
            raise ValueError(f"minibatches(n={n!r}): n must be an int in [1, B={self.batch_size}]")
        perm = torch.randperm(self.batch_size, generator=generator, device="cpu").to(self.device)
        for idx in torch.tensor_split(perm, n):
            yield idx, self.select(idx)


def _dtype_ok(t: Tensor, kind: str) -> bool:
    if kind == "bool":
        return t.dtype == torch.bool
    if kind == "long":
        return t.dtype in (torch.int64, torch.int32)
    return t.is_floating_point()


def broadcast_to_actions(adv: Tensor, mask: Tensor) -> Tensor:
    """Broadcast a per-trajectory value float [B] to every valid action: float [B, T], 0 where ``mask`` is False.
    On CPU one native pass (``native.broadcast_rows``: about the memory floor, half a ``where``'s time)."""
    if mask.dim() == 2 and adv.dim() == 1 and use_native(adv, mask):
        return native.broadcast_rows(adv, mask)
    return torch.where(mask, adv[:, None].to(torch.float32), torch.zeros((), dtype=torch.float32, device=mask.device))


def gather_steps(per_step: Tensor, step: Tensor, mask: Tensor, *,
                 step_range: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """Map per-step values float [B, S] to actions via ``step`` long [B, T]: float [B, T], 0 off ``mask``.

    NaN per-step values (a step without a reward) also give 0 on its actions. ``step_range`` = (min, max) of
    ``step`` (``TrajectoryBatch.step_range()``, remembered by ``validate``) saves a pass over ``step``; padding
    may hold any index, so ``step`` is clamped (a [B, T] copy) only when that range leaves [0, S).
    Cost: one gather and one in-place ``where`` over [B, T]; on CPU one fused native pass (``native.gather_steps``).
    """
    S = per_step.shape[1]
    per = torch.nan_to_num(per_step.to(torch.float32), nan=0.0)  # [B, S]: small
    if S > 0 and step.dtype == torch.int64 and use_native(per, step, mask):
        return native.gather_steps(per, step, mask)  # one fused pass (it clamps step itself)
    lo, hi = step.aminmax() if step_range is None else step_range
    idx = step if bool((lo >= 0) & (hi < S)) else step.clamp(0, max(S - 1, 0))
    out = torch.gather(per, 1, idx.long())
    return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device), out=out)


def last_action_index(mask: Tensor) -> Tensor:
    """Index of the last True action of each row: long [B] (0 for a row with none)."""
    return last_valid_index(mask).clamp_min(0)


def outcome_at_end(outcome: Tensor, mask: Tensor) -> Tensor:
    """float [B, T]: ``outcome`` [B] on each row's last valid action, 0 elsewhere (and on empty rows)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return add_outcome_at_end_(out, outcome, mask)


def add_outcome_at_end_(rewards: Tensor, outcome: Tensor, mask: Tensor, *, last: Tensor | None = None) -> Tensor:
    """rewards[b, last valid action of b] += outcome[b], in place (rows without actions unchanged); ``last`` is
    ``last_valid_index(mask)`` when the caller has it."""
    last = last_valid_index(mask) if last is None else last
    r = torch.where(last >= 0, outcome.to(torch.float32), torch.zeros((), device=mask.device))
    return rewards.scatter_add_(1, last.clamp_min(0)[:, None], r[:, None])
