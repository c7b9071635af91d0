"""flowrl.llm.steps: newline / regex / chunk segmentation against hand-worked cases and slow references."""
from __future__ import annotations

import re

import pytest
import torch

from flowrl.core.batch import TrajectoryBatch
from flowrl.llm.steps import (chunk_steps, newline_steps, regex_steps, segment_steps, step_texts,
                              token_pieces)


@pytest.fixture(scope="module")
def word_tok():
    """A word-level tokenizer whose tokens hold several characters, newlines and blank text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "Step", " 1:", " 2:", " x", " y=3", ".\n", "\n\n", " ", "St", "ep 3:", "\n"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def char_tok():
    from flowrl.pipelines.arithmetic import build_tokenizer

    return build_tokenizer()


def pad_rows(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


# ----------------------------------------------------------------------------- hand-worked cases
def test_newline_arithmetic_hand(char_tok):
    texts = ["7+5+0=12\n4+8+1=13\nA:1332", "12\n\n34\n", "\n12", ""]
    rows = [char_tok(t, add_special_tokens=False)["input_ids"] + [char_tok.eos_token_id] for t in texts]
    ids, mask = pad_rows(rows)
    mask[3] = False  # an empty completion
    step, num = newline_steps(ids, mask, char_tok)
    assert step[0].tolist() == [0] * 9 + [1] * 9 + [2] * 7  # lines of 9, 9 and 6 + EOS tokens
    assert num.tolist() == [3, 2, 1, 0]
    assert step[1, :8].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # '1' '2' '\n' '\n' | '3' '4' '\n' EOS
    assert step[2, :4].tolist() == [0, 0, 0, 0]  # a leading newline opens no step
    assert bool((step[~mask] == 0).all())
    texts_out = step_texts(ids, mask, step, num, char_tok)
    assert texts_out[0] == ["7+5+0=12\n", "4+8+1=13\n", "A:1332"]
    assert texts_out[1] == ["12\n\n", "34\n"] and texts_out[3] == []


def test_newline_multichar_tokens_hand(word_tok):
    # "Step 1: x.\nStep 2: y=3\n\nSt|ep 3: x<eos>"
    rows = [[2, 3, 5, 7, 2, 4, 6, 8, 10, 11, 5, 1], [5, 7, 9, 5], [5, 12, 12, 9, 6, 1, 1]]
    ids, mask = pad_rows(rows)
    step, num = newline_steps(ids, mask, word_tok)
    assert step[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert step[1, :4].tolist() == [0, 0, 0, 1]  # the blank " " after ".\n" stays in step 0
    assert step[2, :7].tolist() == [0, 0, 0, 0, 1, 1, 1]  # "\n" "\n" " " then " y=3"; EOS after it
    assert num.tolist() == [3, 2, 2]


def test_regex_hand(word_tok):
    rows = [[2, 3, 5, 7, 2, 4, 6, 8, 10, 11, 5, 1], [5, 7, 2, 3, 5], [5, 6, 1]]
    ids, mask = pad_rows(rows)
    step, num = regex_steps(ids, mask, word_tok, r"Step \d+:")
    # the match of "Step 3:" begins inside the token "St": that token opens step 2
    assert step[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert step[1, :5].tolist() == [0, 0, 1, 1, 1]  # " x.\n" is a preamble step
    assert step[2, :3].tolist() == [0, 0, 0]  # no match: one step
    assert num.tolist() == [3, 2, 1]
    assert step_texts(ids, mask, step, num, word_tok)[0] == ["Step 1: x.\n", "Step 2: y=3\n\n", "Step 3: x"]
    same, _ = segment_steps(ids, mask, word_tok, how="regex", pattern=re.compile(r"Step \d+:"))
    assert torch.equal(same, step)


def test_chunk_hand():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 0, 0], [0] * 7], dtype=torch.bool)
    step, num = chunk_steps(mask, 2)
    assert step.tolist() == [[0, 0, 1, 1, 2, 0, 0], [0, 0, 0, 1, 0, 0, 0], [0] * 7]
    assert num.tolist() == [3, 2, 0]
    step1, num1 = chunk_steps(mask, 10)
    assert bool((step1 == 0).all()) and num1.tolist() == [1, 1, 0]


# ----------------------------------------------------------------------------- slow references
def ref_newline(ids, mask, tok):
    pieces = token_pieces(tok)
    special = set(tok.all_special_ids)
    out, nums = [], []
    for row, m in zip(ids.tolist(), mask.tolist()):
        s, pending, seen_visible, steps = 0, False, False, []
        for i, v in zip(row, m):
            if not v:
                steps.append(0)
                continue
            visible = i not in special and pieces[i].strip() != ""
            if visible and pending and seen_visible:
                s += 1
                pending = False
            if visible:
                seen_visible = True
                pending = False
            if "\n" in pieces[i]:
                pending = True
            steps.append(s)
        out.append(steps)
        nums.append(s + 1 if any(m) else 0)
    return out, nums


def ref_regex(ids, mask, tok, pattern):
    pieces = token_pieces(tok)
    special = set(tok.all_special_ids)
    out, nums = [], []
    for row, m in zip(ids.tolist(), mask.tolist()):
        owner, text = [], ""
        for t, (i, v) in enumerate(zip(row, m)):
            if v and i not in special:
                text += pieces[i]
                owner += [t] * len(pieces[i])
        starts = {owner[mm.start()] for mm in re.finditer(pattern, text) if mm.start() < len(owner)}
        valid = [t for t, v in enumerate(m) if v]
        starts.discard(valid[0] if valid else -1)
        s, steps = 0, []
        for t, v in enumerate(m):
            if v and t in starts:
                s += 1
            steps.append(s if v else 0)
        out.append(steps)
        nums.append(s + 1 if valid else 0)
    return out, nums


def random_rows(gen, vocab, B=12, T=20):
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0], lengths[1] = T, 0
    mask = torch.arange(T)[None] < lengths[:, None]
    mask[2, 3] = False  # a hole (a tool observation inside the completion)
    return ids, mask


def test_newline_matches_reference(word_tok, char_tok, gen):
    for tok in (word_tok, char_tok):
        for _ in range(5):
            ids, mask = random_rows(gen, len(tok))
            step, num = newline_steps(ids, mask, tok)
            ref, ref_num = ref_newline(ids, mask, tok)
            assert step.tolist() == ref and num.tolist() == ref_num


def test_regex_matches_reference(word_tok, char_tok, gen):
    cases = [(word_tok, r"Step \d+:"), (word_tok, r"\n"), (char_tok, r"\d\+"), (char_tok, r"A:")]
    for tok, pat in cases:
        for _ in range(5):
            ids, mask = random_rows(gen, len(tok))
            step, num = regex_steps(ids, mask, tok, pat)
            ref, ref_num = ref_regex(ids, mask, tok, pat)
            assert step.tolist() == ref and num.tolist() == ref_num


def test_chunk_matches_reference(gen):
    for k in (1, 3, 5):
        _, mask = random_rows(gen, 4)
        step, num = chunk_steps(mask, k)
        for b, m in enumerate(mask.tolist()):
            n = 0
            for t, v in enumerate(m):
                assert int(step[b, t]) == (n // k if v else 0)
                n += v
            assert int(num[b]) == (-(-n // k) if n else 0)


def test_fills_trajectory_batch(char_tok):
    texts = ["7+5+0=12\n4+8+1=13\nA:1332", "1+2+0=3\nA:3"]
    rows = [char_tok(t, add_special_tokens=False)["input_ids"] + [1] for t in texts]
    ids, mask = pad_rows(rows)
    step, num = segment_steps(ids, mask, char_tok, how="newline")
    B, T = ids.shape
    S = int(num.max())
    step_reward = torch.full((B, S), float("nan"))
    step_reward[0, :3] = torch.tensor([1.0, 1.0, 0.0])
    step_reward[1, :2] = torch.tensor([1.0, 1.0])
    batch = TrajectoryBatch(group=torch.tensor([0, 0]), mask=mask, step=step, old_logp=torch.zeros(B, T),
                            outcome=torch.tensor([1.0, 0.0]), step_reward=step_reward).validate()
    assert batch.num_steps == 3


def test_bad_inputs(char_tok):
    ids, mask = pad_rows([[3, 4, 5]])
    with pytest.raises(ValueError, match="how"):
        segment_steps(ids, mask, char_tok, how="sentences")
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_steps(mask, 0)
    with pytest.raises(ValueError, match="bool"):
        newline_steps(ids, mask.long(), char_tok)
    with pytest.raises(ValueError, match="pattern"):
        segment_steps(ids, mask, char_tok, how="regex")
    with pytest.raises(ValueError, match="ids >="):
        newline_steps(ids + 100, mask, char_tok)
