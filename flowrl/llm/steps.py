"""Reasoning-step segmentation: the map from completion tokens to step indices (``TrajectoryBatch.step``).

Three ways to cut a completion into steps; each returns ``(step long [B, T], num_steps long [B])`` with
``step[b, t]`` the 0-based step of token ``t`` (0 off the mask, where it is never read) and
``num_steps[b] = 1 + step`` of the last valid token (0 for an empty completion), so
``S = num_steps.max()`` is the width of ``TrajectoryBatch.step_reward``.

- :func:`chunk_steps`: fixed-size chunks of ``k`` valid tokens, ``step_t = floor(n_t / k)`` with
  ``n_t`` the number of valid tokens before ``t``.
- :func:`newline_steps`: a step ends at a token whose text contains a newline; the next step starts at
  the next *visible* token (one whose text is not all whitespace and that is not a special token), so
  blank lines, trailing spaces and the final EOS stay in the step before them. With ``e_t`` = "token t
  ends a step" and ``v_t`` = "token t is visible": ``start_t = v_t and (last e before t) >= (last v
  before t) >= 0`` (an end token may itself be visible, as ``".\\n"``), ``step_t = cumsum(start)_t``;
  the "last before" indices are running maxima (``cummax``).
- :func:`regex_steps`: a step starts at the token holding the first character of each match of a
  regular expression (e.g. ``r"Step \\d+:"``); text before the first match is a step of its own.

Token texts come from decoding each vocabulary id alone (cached per tokenizer). For byte-level BPE a
multi-byte character split over two tokens decodes to replacement characters in each piece; ASCII
patterns such as newlines or "Step k:" are unaffected, and character offsets are consistent with the
joined pieces, which is the string the regex sees.
"""
from __future__ import annotations

import re
import weakref
from typing import Optional

import torch
from torch import Tensor

_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_pieces(tokenizer) -> list[str]:
    """The text of every token id decoded alone (special tokens as their literal text); cached."""
    try:
        return _PIECES[tokenizer]
    except (KeyError, TypeError):
        pass
    n = len(tokenizer)
    pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in range(n)]
    try:
        _PIECES[tokenizer] = pieces
    except TypeError:
        pass
    return pieces


def _check(completion_ids: Tensor, completion_mask: Tensor) -> None:
    if completion_ids.dim() != 2 or tuple(completion_mask.shape) != tuple(completion_ids.shape):
        raise ValueError(
            f"completion_ids {tuple(completion_ids.shape)} and completion_mask {tuple(completion_mask.shape)} "
            "must both be [B, T]"
        )
    if completion_mask.dtype != torch.bool:
        raise ValueError(f"completion_mask has dtype {completion_mask.dtype}; expected torch.bool")


def _finish(step: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the step off the mask and count steps: num_steps = 1 + max step over valid tokens."""
    step = torch.where(mask, step, torch.zeros_like(step))
    num = torch.where(mask, step + 1, torch.zeros_like(step)).amax(dim=1) if step.shape[1] else step.new_zeros(step.shape[0])
    return step, num


def chunk_steps(completion_mask: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Fixed-size chunks: ``step_t = floor(n_t / chunk_size)``, n_t = valid tokens before t.

    completion_mask: bool [B, T] (valid tokens need not be contiguous). Returns
    ``(step long [B, T], num_steps long [B])``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_steps: chunk_size={chunk_size}; must be >= 1")
    if completion_mask.dim() != 2 or completion_mask.dtype != torch.bool:
        raise ValueError(f"chunk_steps: completion_mask must be bool [B, T], got {completion_mask.dtype} "
                         f"{tuple(completion_mask.shape)}")
    m = completion_mask.long()
    before = m.cumsum(dim=1) - m
    return _finish(torch.div(before, chunk_size, rounding_mode="floor"), completion_mask)


def boundary_steps(ends: Tensor, visible: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Steps from per-token flags: a step ends at ``ends`` and the next starts at the next ``visible``.

    ends, visible, completion_mask: bool [B, T]. Off-mask tokens are neither. start_t = visible_t and
    max{s < t: ends_s} >= max{s < t: visible_s} >= 0 (maxima are -1 when empty; an end token may
    be visible itself); step_t = sum_{s <= t} start_s.
    Returns ``(step long [B, T], num_steps long [B])``.
    """
    B, T = completion_mask.shape
    ends = ends & completion_mask
    visible = visible & completion_mask
    idx = torch.arange(T, device=completion_mask.device).expand(B, T)
    neg = torch.full_like(idx, -1)
    last_end = torch.where(ends, idx, neg).cummax(dim=1).values
    last_vis = torch.where(visible, idx, neg).cummax(dim=1).values
    # shift right by one: "strictly before t"
    last_end_before = torch.cat([neg[:, :1], last_end[:, :-1]], dim=1)
    last_vis_before = torch.cat([neg[:, :1], last_vis[:, :-1]], dim=1)
    start = visible & (last_end_before >= last_vis_before) & (last_vis_before >= 0)
    return _finish(start.long().cumsum(dim=1), completion_mask)


def newline_steps(completion_ids: Tensor, completion_mask: Tensor, tokenizer,
                  separator: str = "\n") -> tuple[Tensor, Tensor]:
    """Steps separated by newlines (or any ``separator`` string inside a token's text).

    completion_ids: long [B, T]; completion_mask: bool [B, T]. See the module docstring for the rule
    (whitespace-only and special tokens never open a step). Returns ``(step, num_steps)``.
    """
    _check(completion_ids, completion_mask)
    if not separator:
        raise ValueError("newline_steps: separator must be a non-empty string")
    pieces = token_pieces(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    dev = completion_ids.device
    is_end = torch.tensor([separator in p for p in pieces], dtype=torch.bool, device=dev)
    is_vis = torch.tensor([(i not in special) and p.strip() != "" for i, p in enumerate(pieces)],
                          dtype=torch.bool, device=dev)
    ids = completion_ids.clamp(0, len(pieces) - 1)
    if bool(((completion_ids >= len(pieces)) & completion_mask).any()):
        raise ValueError(f"newline_steps: completion_ids has ids >= the tokenizer's {len(pieces)} tokens")
    return boundary_steps(is_end[ids], is_vis[ids], completion_mask)


def regex_steps(completion_ids: Tensor, completion_mask: Tensor, tokenizer,
                pattern: str | re.Pattern) -> tuple[Tensor, Tensor]:
    """Steps that begin where ``pattern`` matches (e.g. ``r"Step \\d+:"``).

    The valid tokens of each row are joined into a string (token pieces; special tokens such as EOS
    add no text); every match start marks
    the token that holds that character as a step start (except the row's first valid token, which
    always begins step 0). step_t = number of starts at or before t. The regex runs per row (strings);
    the map from characters to tokens is a ``searchsorted`` over the pieces' cumulative lengths.
    Returns ``(step long [B, T], num_steps long [B])``.
    """
    _check(completion_ids, completion_mask)
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    pieces = token_pieces(tokenizer)
    B, T = completion_ids.shape
    dev = completion_ids.device
    if bool(((completion_ids >= len(pieces)) & completion_mask).any()):
        raise ValueError(f"regex_steps: completion_ids has ids >= the tokenizer's {len(pieces)} tokens")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lens = torch.tensor([0 if i in special else len(p) for i, p in enumerate(pieces)], dtype=torch.long)
    ids_cpu = completion_ids.detach().cpu()
    mask_cpu = completion_mask.detach().cpu()
    tok_len = torch.where(mask_cpu, lens[ids_cpu.clamp(0, len(pieces) - 1)], torch.zeros_like(ids_cpu))
    ends = tok_len.cumsum(dim=1)  # char offset just past each token in the joined row string
    start = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # regex matching is per string
        row = [pieces[i] for i, m in zip(ids_cpu[b].tolist(), mask_cpu[b].tolist()) if m and i not in special]
        text = "".join(row)
        offs = [m.start() for m in rx.finditer(text)]
        if not offs:
            continue
        # the token holding char c is the first t with ends[t] > c (among tokens with text)
        pos = torch.searchsorted(ends[b], torch.tensor(offs, dtype=torch.long), right=True)
        pos = pos[pos < T]
        start[b, pos] = True
    first_valid = mask_cpu & (mask_cpu.long().cumsum(dim=1) == 1)
    start &= mask_cpu & ~first_valid
    return _finish(start.long().cumsum(dim=1).to(dev), completion_mask)


def segment_steps(completion_ids: Tensor, completion_mask: Tensor, tokenizer=None, *, how: str = "newline",
                  pattern: Optional[str] = None, chunk_size: Optional[int] = None,
                  separator: str = "\n") -> tuple[Tensor, Tensor]:
    """Dispatch: ``how`` in {"newline", "regex", "chunk"} (see the functions of this module)."""
    if how == "newline":
        if tokenizer is None:
            raise ValueError("segment_steps(how='newline') needs the tokenizer")
        return newline_steps(completion_ids, completion_mask, tokenizer, separator)
    if how == "regex":
        if tokenizer is None or pattern is None:
            raise ValueError("segment_steps(how='regex') needs the tokenizer and a pattern")
        return regex_steps(completion_ids, completion_mask, tokenizer, pattern)
    if how == "chunk":
        if chunk_size is None:
            raise ValueError("segment_steps(how='chunk') needs chunk_size")
        _check(completion_ids, completion_mask)
        return chunk_steps(completion_mask, chunk_size)
    raise ValueError(f"segment_steps: how={how!r}; valid: 'newline', 'regex', 'chunk'")


def step_texts(completion_ids: Tensor, completion_mask: Tensor, step: Tensor, num_steps: Tensor,
               tokenizer) -> list[list[str]]:
    """The text of each step of each row (for a step verifier or a PRM): ``out[b][s]``.

    Joins the token pieces of the valid tokens with ``step == s``; special tokens are dropped.
    """
    _check(completion_ids, completion_mask)
    pieces = token_pieces(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[list[str]] = []
    for ids, m, st, n in zip(completion_ids.tolist(), completion_mask.tolist(), step.tolist(), num_steps.tolist()):
        parts: list[list[str]] = [[] for _ in range(int(n))]
        for i, mm, s in zip(ids, m, st):
            if mm and i not in special:
                parts[s].append(pieces[i])
        out.append(["".join(p) for p in parts])
    return out
