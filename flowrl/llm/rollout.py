"""One LLM rollout as typed rows: the sampled tokens, their log-probs, the rewards and the texts.

A :class:`TokenRollout` holds ``B`` rows (one sampled completion each). Prompts are left-padded to ``P``
tokens and completions right-padded to ``T``, as :func:`flowrl.llm.generate.generate` returns them, so that
``input_ids = [prompt_ids | comp_ids]`` is what the teacher-forced recompute reads. Rollouts made by separate
generate calls (chunks, refill rounds) are joined with :meth:`TokenRollout.cat`, which re-pads the prompts on
the left and the completions on the right to the widest piece; :meth:`TokenRollout.select` keeps rows.

The training task puts a rollout beside the :class:`flowrl.core.TrajectoryBatch` (``Rollout.side``); the
core never reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.functional import pad


@dataclass
class TokenRollout:
    """``B`` sampled completions with their scores (see the module docstring).

    prompt_ids: long [B, P], left-padded with the pad id; prompt_mask: bool [B, P].
    comp_ids: long [B, T], right-padded with the pad id; comp_mask: bool [B, T] (tokens up to and with EOS).
    logp: float [B, T], the sampler's log pi_tau of each token, 0 off the mask.
    entropy, sampler_logp: float [B, T] or None (see :class:`flowrl.llm.generate.Generation`).
    truncated: bool [B], the completion hit the length limit.
    outcome: float [B], the combined outcome reward; valid: bool [B], the reward could be computed;
    correct: bool [B], the first reward's score reached the correctness threshold.
    row: long [B], the dataset row each prompt came from.
    parts: {name: float [B]}, each named reward component.
    texts: the B completion texts; prompts: the B prompts.
    temperature: the sampling temperature tau (one for the rollout).
    reward_metrics: ``[(rows scored, {metric: value})]``, one entry per scoring call (calls, not rows:
        :meth:`select` keeps the list whole).
    input_ids: long [B, P + T] and attention_mask: long [B, P + T], the recompute's input, or None until
        :meth:`with_inputs` fills them.
    is_w: float [B, T] or None, the sampler-vs-trainer importance weights.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    comp_ids: Tensor
    comp_mask: Tensor
    logp: Optional[Tensor]
    entropy: Optional[Tensor]
    sampler_logp: Optional[Tensor]
    truncated: Tensor
    outcome: Tensor
    valid: Tensor
    correct: Tensor
    row: Tensor
    parts: dict[str, Tensor]
    texts: list[str]
    prompts: list[Any]
    temperature: float = 1.0
    reward_metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    input_ids: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None
    is_w: Optional[Tensor] = None

    # per-token fields padded on the right with 0 (the mask says where they mean something)
    _TOKEN_FLOATS = ("logp", "entropy", "sampler_logp", "is_w")
    _ROW_TENSORS = ("truncated", "outcome", "valid", "correct", "row")

    def __post_init__(self) -> None:
        B = self.comp_ids.shape[0]
        if self.comp_ids.dim() != 2 or tuple(self.comp_mask.shape) != tuple(self.comp_ids.shape):
            raise ValueError(f"TokenRollout: comp_ids {tuple(self.comp_ids.shape)} and comp_mask "
                             f"{tuple(self.comp_mask.shape)} must both be [B, T]")
        if self.prompt_ids.dim() != 2 or self.prompt_ids.shape[0] != B or tuple(self.prompt_mask.shape) != tuple(self.prompt_ids.shape):
            raise ValueError(f"TokenRollout: prompt_ids {tuple(self.prompt_ids.shape)} and prompt_mask "
                             f"{tuple(self.prompt_mask.shape)} must both be [B={B}, P]")
        for k in self._ROW_TENSORS:
            v = getattr(self, k)
            if tuple(v.shape) != (B,):
                raise ValueError(f"TokenRollout: {k} has shape {tuple(v.shape)}; expected [B] = ({B},)")
        for k in ("texts", "prompts"):
            if len(getattr(self, k)) != B:
                raise ValueError(f"TokenRollout: {k} has {len(getattr(self, k))} entries; expected B={B}")

    def __len__(self) -> int:
        return self.comp_ids.shape[0]

    def with_inputs(self) -> "TokenRollout":
        """Fill ``input_ids`` (long [B, P + T]) and ``attention_mask`` (long [B, P + T]) from the prompt and
        completion tensors; returns self."""
        self.input_ids = torch.cat([self.prompt_ids, self.comp_ids], dim=1)
        self.attention_mask = torch.cat([self.prompt_mask, self.comp_mask], dim=1).long()
        return self

    @classmethod
    def cat(cls, pieces: Sequence["TokenRollout"], pad_id: int) -> "TokenRollout":
        """The rows of ``pieces`` one after the other.

        Prompts are re-padded on the left (ids with ``pad_id``, mask with False) and completions on the
        right (ids with ``pad_id``, mask with False, per-token floats with 0) to the widest piece. A per-token
        float that one piece lacks (None) is None in the result. ``parts`` takes the keys of the first piece;
        ``temperature`` is the first piece's; ``reward_metrics`` are concatenated. ``input_ids`` /
        ``attention_mask`` are rebuilt when the first piece has them.
        """
        if not pieces:
            raise ValueError("TokenRollout.cat: no pieces")
        P = max(p.prompt_ids.shape[1] for p in pieces)
        T = max(p.comp_ids.shape[1] for p in pieces)

        def left(t: Tensor, width: int, value: Any) -> Tensor:
            return pad(t, (width - t.shape[1], 0), value=value)

        def right(t: Tensor, width: int, value: Any) -> Tensor:
            return pad(t, (0, width - t.shape[1]), value=value)

        kw: dict[str, Any] = {
            "prompt_ids": torch.cat([left(p.prompt_ids, P, pad_id) for p in pieces]),
            "prompt_mask": torch.cat([left(p.prompt_mask, P, False) for p in pieces]),
            "comp_ids": torch.cat([right(p.comp_ids, T, pad_id) for p in pieces]),
            "comp_mask": torch.cat([right(p.comp_mask, T, False) for p in pieces]),
        }
        for k in cls._TOKEN_FLOATS:
            vals = [getattr(p, k) for p in pieces]
            kw[k] = None if any(v is None for v in vals) else torch.cat([right(v, T, 0.0) for v in vals])
        for k in cls._ROW_TENSORS:
            kw[k] = torch.cat([getattr(p, k) for p in pieces])
        kw["parts"] = {k: torch.cat([p.parts[k] for p in pieces]) for k in pieces[0].parts}
        kw["texts"] = [x for p in pieces for x in p.texts]
        kw["prompts"] = [x for p in pieces for x in p.prompts]
        kw["temperature"] = pieces[0].temperature
        kw["reward_metrics"] = [x for p in pieces for x in p.reward_metrics]
        out = cls(**kw)
        return out.with_inputs() if pieces[0].input_ids is not None else out

    def select(self, index: Tensor) -> "TokenRollout":
        """Rows ``index`` (long [n]) in that order; each tensor is indexed on its own device. Padding widths
        are kept; ``temperature`` and ``reward_metrics`` (per scoring call) are kept whole."""
        il = index.tolist()
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("reward_metrics", "temperature") or v is None:
                kw[f.name] = v
            elif isinstance(v, Tensor):
                kw[f.name] = v[index.to(v.device)]
            elif isinstance(v, dict):
                kw[f.name] = {k: t[index.to(t.device)] for k, t in v.items()}
            else:
                kw[f.name] = [v[i] for i in il]
        return type(self)(**kw)
