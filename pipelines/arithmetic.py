"""The embedded arithmetic task: step-by-step multi-digit addition whose every step can be checked.

Format (kept exactly; ``rewards/arithmetic.py`` verifies it):

    prompt      ``Q:347+985\\n``
    completion  ``7+5+0=12\\n4+8+1=13\\n3+9+1=13\\nA:1332`` then EOS

Digits are added right to left; step ``k`` (0-based from the right) is ``a_k+b_k+c_k=s_k`` with
``c_0 = 0``, ``c_{k+1} = s_k // 10`` and ``s_k`` written in decimal (0..19). The answer line is
``A:`` followed by ``a + b`` in decimal. Both operands have exactly ``digits`` digits (100..999 for
the default 3), so a completion has ``digits`` step lines and one answer line.

**Training data with a systematic bug** (headroom for RL and process rewards): the "buggy student"
adds with its own carry; at each step where its carry-in is 1 it forgets it (writes ``+0``) with
probability ``p_forget`` (0.8), and its later steps follow its own (wrong) carries. When some step was wrong, the answer line shows the
student's wrong sum with probability ``p_propagate`` (0.5), else the true sum: a "miracle step" in
the data (a right answer after a wrong step). The shipped model (``arithmetic_weights/``: a Llama with hidden 128, 4 layers, 4 heads,
MLP 512, tied embeddings, 1,052,160 parameters, 4.2 MB of float32 safetensors; built by
``python scripts/build_arithmetic.py``, 250 AdamW steps of batch 128 at lr 3e-3, seed 0) learned this
distribution, bugs included; its held-out figures are in ``docs/results.md`` ("The embedded models").

Splits: the ``10**digits``-sized space of operand pairs is shuffled once with a fixed seed; a
tenth of it is ``"heldout"`` and never appears in training, the rest is ``"train"``.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .registry import register_pipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "arithmetic_weights"

# The character vocabulary: specials first (ids 0, 1, 2), then the 16 characters of the format.
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
CHARS = "0123456789+=:QA\n"
SPECIALS = (PAD, EOS, UNK)
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 20240607


# ----------------------------------------------------------------------------- format
def prompt_text(a: int, b: int) -> str:
    """The prompt ``Q:{a}+{b}\\n``."""
    return f"Q:{a}+{b}\n"


def _digits_of(x: int, n: int) -> list[int]:
    """The n lowest decimal digits of x, least significant first."""
    return [(x // 10**k) % 10 for k in range(n)]


def step_lines(a: int, b: int, digits: int = 3) -> list[str]:
    """The correct step lines ``a_k+b_k+c_k=s_k`` (no newline), least significant digit first."""
    da, db = _digits_of(a, digits), _digits_of(b, digits)
    out, carry = [], 0
    for k in range(digits):
        s = da[k] + db[k] + carry
        out.append(f"{da[k]}+{db[k]}+{carry}={s}")
        carry = s // 10
    return out


def solution_text(a: int, b: int, digits: int = 3) -> str:
    """The correct completion (without EOS)."""
    return "\n".join(step_lines(a, b, digits)) + f"\nA:{a + b}"


def buggy_solution_text(
    a: int, b: int, rng: random.Random, *, digits: int = 3, p_forget: float = 0.8, p_propagate: float = 0.5
) -> tuple[str, bool]:
    """A completion by the buggy student; returns ``(text, any_step_wrong)``.

    At each step whose (student's own) carry-in is 1, the carry is forgotten with probability
    ``p_forget``; the student's carries follow its written sums. If any step differs from the
    correct line, the answer is the student's sum with probability ``p_propagate``, else the true one.
    """
    if not (0.0 <= p_forget <= 1.0 and 0.0 <= p_propagate <= 1.0):
        raise ValueError(f"p_forget={p_forget}, p_propagate={p_propagate}: both must lie in [0, 1]")
    da, db = _digits_of(a, digits), _digits_of(b, digits)
    lines, carry, wrong_value = [], 0, 0
    for k in range(digits):
        c = carry
        if c == 1 and rng.random() < p_forget:
            c = 0
        s = da[k] + db[k] + c
        lines.append(f"{da[k]}+{db[k]}+{c}={s}")
        wrong_value += (s % 10) * 10**k
        carry = s // 10
    wrong_value += carry * 10**digits
    any_wrong = lines != step_lines(a, b, digits)
    answer = wrong_value if (any_wrong and rng.random() < p_propagate) else a + b
    return "\n".join(lines) + f"\nA:{answer}", any_wrong


@dataclass(frozen=True)
class Check:
    """Exact check of one completion against the true solution.

    steps: per expected step line, True where the line equals the correct one (missing lines False).
    answer_ok: the first ``A:`` line equals ``A:{a+b}``.
    steps_ok: every expected step is right and no extra line precedes the answer.
    miracle: answer_ok and not steps_ok (a right answer after a wrong step).
    """

    steps: tuple[bool, ...]
    answer_ok: bool
    steps_ok: bool

    @property
    def miracle(self) -> bool:
        return self.answer_ok and not self.steps_ok


def check_completion(a: int, b: int, text: str, digits: int = 3) -> Check:
    """Compare a completion (EOS stripped) line by line with :func:`solution_text`.

    A simple local checker used by the build script and tests; the process reward of the trainer is
    ``rewards/arithmetic.py``.
    """
    lines = text.split("\n")
    ans_idx = next((i for i, ln in enumerate(lines) if ln.startswith("A:")), None)
    body = lines if ans_idx is None else lines[:ans_idx]
    truth = step_lines(a, b, digits)
    steps = tuple(k < len(body) and body[k] == truth[k] for k in range(digits))
    answer_ok = ans_idx is not None and lines[ans_idx] == f"A:{a + b}"
    return Check(steps=steps, answer_ok=answer_ok, steps_ok=all(steps) and len(body) == digits)


# ----------------------------------------------------------------------------- splits
@functools.lru_cache(maxsize=4)
def _heldout_table(digits: int) -> np.ndarray:
    """bool [n_pairs]: True for pairs in the held-out split; pair index = (a - lo) * n + (b - lo)."""
    lo, hi = 10 ** (digits - 1), 10**digits
    n = hi - lo
    perm = np.random.default_rng(SPLIT_SEED + digits).permutation(n * n)
    table = np.zeros(n * n, dtype=bool)
    table[perm[: int(round(HELDOUT_FRACTION * n * n))]] = True
    return table


def is_heldout(a: int, b: int, digits: int = 3) -> bool:
    """Whether the pair (a, b) belongs to the held-out split."""
    lo, hi = 10 ** (digits - 1), 10**digits
    if not (lo <= a < hi and lo <= b < hi):
        raise ValueError(f"operands ({a}, {b}) must both have exactly {digits} digits ([{lo}, {hi}))")
    return bool(_heldout_table(digits)[(a - lo) * (hi - lo) + (b - lo)])


def make_problems(n: int, *, split: str = "heldout", seed: int = 0, digits: int = 3) -> list[tuple[int, int]]:
    """``n`` distinct operand pairs ``(a, b)`` of the given split, drawn with ``seed`` (deterministic)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"make_problems: split={split!r}; valid: 'train', 'heldout'")
    if digits < 1:
        raise ValueError(f"make_problems: digits={digits}; must be >= 1")
    table = _heldout_table(digits)
    pool = np.flatnonzero(table if split == "heldout" else ~table)
    if n > len(pool):
        raise ValueError(f"make_problems: n={n} exceeds the {len(pool)} pairs of split {split!r}")
    idx = np.random.default_rng(seed).choice(pool, size=n, replace=False)
    lo, width = 10 ** (digits - 1), 10**digits - 10 ** (digits - 1)
    return [(int(lo + i // width), int(lo + i % width)) for i in idx]


# ----------------------------------------------------------------------------- tokenizer + model
def char_tokenizer(chars: str, model_max_length: int = 64):
    """A character tokenizer over ``chars`` as a transformers ``PreTrainedTokenizerFast`` (left padding).

    Built with the ``tokenizers`` library: a BPE model with no merges over the characters splits text
    into single characters; ``<pad>`` (0), ``<eos>`` (1), ``<unk>`` (2) are special tokens, then the
    characters in the order given (ids 3, 4, ...); the decoder concatenates characters.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    if len(set(chars)) != len(chars) or not chars:
        raise ValueError(f"char_tokenizer: chars={chars!r} must be non-empty with no repeated character")
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + list(chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIALS))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    return tok


def build_tokenizer():
    """The arithmetic model's character tokenizer (:func:`char_tokenizer` over the 16 characters ``CHARS``)."""
    return char_tokenizer(CHARS)


def model_config(vocab_size: int = len(SPECIALS) + len(CHARS)):
    """The Llama config of the embedded model: hidden 128, 4 layers, 4 heads, MLP 512, tied embeddings."""
    return char_llama_config(vocab_size, max_positions=64)


def char_llama_config(vocab_size: int, *, max_positions: int):
    """The tiny character Llama shared by the embedded LMs: hidden 128, 4 layers, 4 heads, MLP 512, tied
    embeddings, ``<pad>`` 0 and ``<eos>`` 1 as in :func:`char_tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions, rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )


@register_pipeline("arithmetic", family="llm")
def load_arithmetic(path: Optional[str | Path] = None, **kwargs):
    """Load the shipped arithmetic model as a :class:`flowrl.pipelines.causal_lm.CausalLMPipeline`.

    Registered as the ``arithmetic`` LLM adapter (``llm.model: arithmetic``; ``llm.model_path`` is ``path``).
    ``path`` defaults to the weights inside the installed package; ``kwargs`` go to
    :func:`flowrl.pipelines.causal_lm.load_causal_lm` (dtype, device, lora, ...).
    """
    return load_embedded_lm("arithmetic", WEIGHTS_DIR if path is None else path, "scripts/build_arithmetic.py", **kwargs)


def load_embedded_lm(name: str, path: str | Path, build_script: str, **kwargs):
    """Load an embedded LM's folder through ``load_causal_lm``; a clear error naming the build script when the
    weights are missing."""
    from .causal_lm import load_causal_lm

    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} weights not found in {path} (need model.safetensors, config.json and tokenizer files); "
            f"build them with `python {build_script}`"
        )
    return load_causal_lm(str(path), **kwargs)


def evaluate(pipe, problems: Sequence[tuple[int, int]], *, digits: int = 3, batch_size: int = 100,
             max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Greedy (``temperature=0``) or sampled accuracy of a pipeline on ``problems``.

    Returns ``accuracy`` (exact answer), ``steps_ok`` (every step right), ``miracle`` (right answer
    after a wrong step), each a fraction of the problems, and ``n``.
    """
    import torch

    acc = ok = mir = 0
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        out = pipe.generate([prompt_text(a, b) for a, b in chunk], max_new_tokens=max_new_tokens,
                            temperature=temperature, generator=gen)
        for (a, b), text in zip(chunk, pipe.decode(out)):
            c = check_completion(a, b, text, digits)
            acc += c.answer_ok
            ok += c.steps_ok
            mir += c.miracle
    n = len(problems)
    return {"accuracy": acc / n, "steps_ok": ok / n, "miracle": mir / n, "n": float(n)}
