"""A real CLIP BPE tokenizer (transformers ``CLIPTokenizer``) built offline from open_clip's shipped vocabulary.

open_clip ships the byte-pair-encoding merges of OpenAI's CLIP (``bpe_simple_vocab_16e6.txt.gz``). The CLIP
vocabulary is derived from them deterministically (Radford et al., 2021, "Learning Transferable Visual Models
From Natural Language Supervision"; byte-level BPE of Sennrich et al., 2016 / GPT-2):

    vocab = [the 256 printable byte symbols] + [each of them + "</w>"] + [concatenation of each of the first
             49152 - 256 - 2 merges] + ["<|startoftext|>", "<|endoftext|>"]            (49408 entries)

so nothing has to be downloaded to get the exact tokenizer that SD3 / FLUX use for their CLIP encoders.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def _byte_symbols() -> list[str]:
    """The 256 byte -> printable-unicode symbols of byte-level BPE, in byte order of the GPT-2 table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def open_clip_bpe_path() -> Path:
    """Path of open_clip's shipped ``bpe_simple_vocab_16e6.txt.gz``."""
    import open_clip

    path = Path(os.path.dirname(open_clip.__file__)) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary was not found at {path}; is open_clip-torch installed?")
    return path


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as "a b" strings) of the CLIP tokenizer, from open_clip's BPE file."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"built a CLIP vocabulary of {len(tokens)} entries, expected {CLIP_VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` with the exact CLIP vocabulary (save it with ``save_pretrained``)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)
