"""TokenRollout: ``cat`` re-pads prompts on the left and completions on the right to the widest piece, ``select``
keeps rows in the order given; both checked against a slow row-by-row reference and a hand-worked case."""
import pytest
import torch

from flowrl.llm import TokenRollout

PAD = 0


def piece(gen: torch.Generator, B: int, P: int, T: int, row0: int, *, entropy=True, sampler=True) -> TokenRollout:
    """B rows with prompts of random length (left-padded to P) and completions of random length (right-padded to T)."""
    plen = torch.randint(1, P + 1, (B,), generator=gen)
    clen = torch.randint(0, T + 1, (B,), generator=gen)
    pm = torch.arange(P)[None, :] >= (P - plen)[:, None]
    cm = torch.arange(T)[None, :] < clen[:, None]
    pid = torch.where(pm, torch.randint(3, 20, (B, P), generator=gen), PAD)
    cid = torch.where(cm, torch.randint(3, 20, (B, T), generator=gen), PAD)
    tok = lambda: torch.where(cm, torch.randn(B, T, generator=gen), 0.0)
    return TokenRollout(
        prompt_ids=pid, prompt_mask=pm, comp_ids=cid, comp_mask=cm, logp=tok(), entropy=tok() if entropy else None,
        sampler_logp=tok() if sampler else None, truncated=clen == T, outcome=torch.randn(B, generator=gen),
        valid=torch.rand(B, generator=gen) > 0.2, correct=torch.rand(B, generator=gen) > 0.5,
        row=torch.arange(row0, row0 + B), parts={"r": torch.randn(B, generator=gen), "r/x": torch.rand(B, generator=gen)},
        texts=[f"t{row0 + i}" for i in range(B)], prompts=[f"p{row0 + i}" for i in range(B)], temperature=0.7,
        reward_metrics=[(B, {"r/mean": float(row0)})],
    )


def ref_cat_row(p: TokenRollout, i: int, P: int, T: int) -> dict:
    """Row i of piece p re-padded by hand: the prompt's real tokens end at column P - 1, the completion starts at 0."""
    n_p = int(p.prompt_mask[i].sum())
    n_c = int(p.comp_mask[i].sum())
    ids = [PAD] * (P - n_p) + p.prompt_ids[i, p.prompt_ids.shape[1] - n_p:].tolist()
    pm = [False] * (P - n_p) + [True] * n_p
    cid = p.comp_ids[i, :n_c].tolist() + [PAD] * (T - n_c)
    cm = [True] * n_c + [False] * (T - n_c)
    lp = p.logp[i, :n_c].tolist() + [0.0] * (T - n_c)
    return {"prompt_ids": ids, "prompt_mask": pm, "comp_ids": cid, "comp_mask": cm, "logp": lp}


def test_cat_repads_left_and_right_like_a_row_by_row_reference():
    gen = torch.Generator().manual_seed(0)
    pieces = [piece(gen, 3, 4, 5, 0), piece(gen, 2, 7, 2, 3), piece(gen, 4, 1, 9, 5)]
    out = TokenRollout.cat(pieces, PAD)
    P, T = 7, 9
    assert out.prompt_ids.shape == (9, P) and out.comp_ids.shape == (9, T) and len(out) == 9
    r = 0
    for p in pieces:
        for i in range(len(p)):
            ref = ref_cat_row(p, i, P, T)
            assert out.prompt_ids[r].tolist() == ref["prompt_ids"]
            assert out.prompt_mask[r].tolist() == ref["prompt_mask"]
            assert out.comp_ids[r].tolist() == ref["comp_ids"]
            assert out.comp_mask[r].tolist() == ref["comp_mask"]
            assert out.logp[r].tolist() == pytest.approx(ref["logp"])
            for k in ("truncated", "outcome", "valid", "correct", "row"):
                assert getattr(out, k)[r] == getattr(p, k)[i], k
            for k in ("r", "r/x"):
                assert out.parts[k][r] == p.parts[k][i]
            assert (out.texts[r], out.prompts[r]) == (p.texts[i], p.prompts[i])
            r += 1
    assert out.reward_metrics == [(3, {"r/mean": 0.0}), (2, {"r/mean": 3.0}), (4, {"r/mean": 5.0})]
    assert out.temperature == 0.7 and out.input_ids is None
    # a per-token float that one piece lacks is None in the result
    assert TokenRollout.cat(pieces + [piece(gen, 1, 2, 2, 9, sampler=False)], PAD).sampler_logp is None
    assert TokenRollout.cat(pieces, PAD).entropy is not None


def test_cat_hand_worked_and_inputs_rebuilt():
    a = TokenRollout(prompt_ids=torch.tensor([[5, 6]]), prompt_mask=torch.tensor([[True, True]]),
                     comp_ids=torch.tensor([[7]]), comp_mask=torch.tensor([[True]]), logp=torch.tensor([[-0.5]]),
                     entropy=None, sampler_logp=None, truncated=torch.tensor([True]), outcome=torch.tensor([1.0]),
                     valid=torch.tensor([True]), correct=torch.tensor([True]), row=torch.tensor([4]),
                     parts={"r": torch.tensor([1.0])}, texts=["x"], prompts=["ab"]).with_inputs()
    b = TokenRollout(prompt_ids=torch.tensor([[9]]), prompt_mask=torch.tensor([[True]]),
                     comp_ids=torch.tensor([[3, 1, 0]]), comp_mask=torch.tensor([[True, True, False]]),
                     logp=torch.tensor([[-1.0, -2.0, 0.0]]), entropy=None, sampler_logp=None,
                     truncated=torch.tensor([False]), outcome=torch.tensor([0.0]), valid=torch.tensor([True]),
                     correct=torch.tensor([False]), row=torch.tensor([2]), parts={"r": torch.tensor([0.0])},
                     texts=["yz"], prompts=["c"]).with_inputs()
    out = TokenRollout.cat([a, b], pad_id=0)
    assert out.prompt_ids.tolist() == [[5, 6], [0, 9]]
    assert out.prompt_mask.tolist() == [[True, True], [False, True]]
    assert out.comp_ids.tolist() == [[7, 0, 0], [3, 1, 0]]
    assert out.comp_mask.tolist() == [[True, False, False], [True, True, False]]
    assert out.logp.tolist() == [[-0.5, 0.0, 0.0], [-1.0, -2.0, 0.0]]
    assert out.input_ids.tolist() == [[5, 6, 7, 0, 0], [0, 9, 3, 1, 0]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]]


def test_select_keeps_rows_in_order_and_the_scoring_calls_whole():
    gen = torch.Generator().manual_seed(1)
    full = TokenRollout.cat([piece(gen, 3, 4, 5, 0), piece(gen, 3, 6, 3, 3)], PAD).with_inputs()
    full.is_w = torch.rand(6, 5, generator=gen)
    idx = torch.tensor([4, 0, 4, 2])
    sub = full.select(idx)
    for j, i in enumerate(idx.tolist()):
        for k in ("prompt_ids", "prompt_mask", "comp_ids", "comp_mask", "logp", "entropy", "sampler_logp", "truncated",
                  "outcome", "valid", "correct", "row", "input_ids", "attention_mask", "is_w"):
            assert torch.equal(getattr(sub, k)[j], getattr(full, k)[i]), k
        assert sub.parts["r"][j] == full.parts["r"][i] and sub.texts[j] == full.texts[i] and sub.prompts[j] == full.prompts[i]
    assert sub.comp_ids.shape[1] == full.comp_ids.shape[1]  # widths are kept
    assert sub.reward_metrics == full.reward_metrics and sub.temperature == full.temperature


def test_bad_shapes_raise():
    gen = torch.Generator().manual_seed(2)
    p = piece(gen, 3, 4, 5, 0)
    with pytest.raises(ValueError, match="outcome has shape"):
        TokenRollout(**{**p.__dict__, "outcome": torch.zeros(2)})
    with pytest.raises(ValueError, match="texts has 2 entries"):
        TokenRollout(**{**p.__dict__, "texts": ["a", "b"]})
    with pytest.raises(ValueError, match="no pieces"):
        TokenRollout.cat([], PAD)
