"""The embedded arithmetic task: format, buggy-student data, splits, tokenizer, and the shipped model's band."""
from __future__ import annotations

import json
import random

import pytest
import torch

from flowrl.pipelines import arithmetic as ar

# The figures the README quotes (measured by `python scripts/build_arithmetic.py --eval-only`).
ACC_BAND = (0.30, 0.60)


def independent_check(a: int, b: int, text: str):
    """A checker written from the format's definition, independent of pipelines.arithmetic."""
    sa, sb = str(a), str(b)
    lines, carry = [], 0
    for k in range(3):
        x, y = int(sa[2 - k]), int(sb[2 - k])
        lines.append(f"{x}+{y}+{carry}={x + y + carry}")
        carry = (x + y + carry) // 10
    got = text.split("\n")
    answer_ok = len(got) == 4 and got[3] == f"A:{a + b}"
    steps_ok = got[:3] == lines
    return answer_ok, steps_ok


def test_format_hand():
    assert ar.prompt_text(347, 985) == "Q:347+985\n"
    assert ar.solution_text(347, 985) == "7+5+0=12\n4+8+1=13\n3+9+1=13\nA:1332"
    assert ar.solution_text(120, 311) == "0+1+0=1\n2+1+0=3\n1+3+0=4\nA:431"
    c = ar.check_completion(347, 985, "7+5+0=12\n4+8+0=12\n3+9+1=13\nA:1332")
    assert c.steps == (True, False, True) and c.answer_ok and not c.steps_ok and c.miracle
    c = ar.check_completion(347, 985, "7+5+0=12\n4+8+1=13\n3+9+1=13\nA:1331")
    assert c.steps_ok and not c.answer_ok and not c.miracle
    c = ar.check_completion(347, 985, "7+5+0=12\nA:1332")  # missing steps
    assert c.steps == (True, False, False) and c.miracle
    c = ar.check_completion(347, 985, "garbage")
    assert not c.answer_ok and not c.steps_ok


def test_buggy_student():
    rng = random.Random(0)
    # always forget, always propagate: 347+985 -> 7+5+0=12, 4+8+0=12 (forgot 1), 3+9+0=12 (forgot 1) -> 1222
    text, wrong = ar.buggy_solution_text(347, 985, rng, p_forget=1.0, p_propagate=1.0)
    assert text == "7+5+0=12\n4+8+0=12\n3+9+0=12\nA:1222" and wrong
    text, wrong = ar.buggy_solution_text(347, 985, rng, p_forget=1.0, p_propagate=0.0)
    assert text == "7+5+0=12\n4+8+0=12\n3+9+0=12\nA:1332" and wrong  # a miracle in the data
    # a forgotten carry changes the later carries: 195+105 -> 5+5+0=10, 9+0+0=9 (forgot), 1+1+0=2 -> 290
    text, _ = ar.buggy_solution_text(195, 105, rng, p_forget=1.0, p_propagate=1.0)
    assert text == "5+5+0=10\n9+0+0=9\n1+1+0=2\nA:290"
    assert ar.buggy_solution_text(347, 985, rng, p_forget=0.0)[0] == ar.solution_text(347, 985)
    # no carries: nothing to forget
    assert ar.buggy_solution_text(123, 456, rng) == (ar.solution_text(123, 456), False)
    # the default rates, measured on a case with two carry-ins: P(step 2 forgotten) = 0.8
    n, forgot = 4000, 0
    rng = random.Random(1)
    for _ in range(n):
        forgot += ar.buggy_solution_text(347, 985, rng)[0].split("\n")[1] == "4+8+0=12"
    assert abs(forgot / n - 0.8) < 0.03
    with pytest.raises(ValueError, match="p_forget"):
        ar.buggy_solution_text(1, 2, rng, p_forget=1.5)


def test_splits_are_fixed_and_disjoint():
    h = ar.make_problems(500, split="heldout", seed=0)
    assert h == ar.make_problems(500, split="heldout", seed=0)
    assert h != ar.make_problems(500, split="heldout", seed=1)
    t = ar.make_problems(500, split="train", seed=0)
    assert not set(h) & set(t)
    assert all(ar.is_heldout(a, b) for a, b in h) and not any(ar.is_heldout(a, b) for a, b in t)
    assert all(100 <= a <= 999 and 100 <= b <= 999 for a, b in h + t)
    assert len(set(h)) == 500
    with pytest.raises(ValueError, match="split"):
        ar.make_problems(3, split="test")
    with pytest.raises(ValueError, match="digits"):
        ar.is_heldout(12, 345)


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tok = ar.build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = ar.prompt_text(347, 985) + ar.solution_text(347, 985)
    ids = tok2(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok2.decode(ids) == text
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.padding_side, len(tok2)) == (0, 1, "left", 19)
    enc = tok2(["Q:1+2\n", "Q:100+200\n"], padding=True, add_special_tokens=False)
    assert enc["input_ids"][0][:4] == [0] * 4 and enc["attention_mask"][0][:4] == [0] * 4


def test_shipped_files():
    files = {p.name: p.stat().st_size for p in ar.WEIGHTS_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) < 8 * 2**20  # a few MB
    cfg = json.loads((ar.WEIGHTS_DIR / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"]) \
        == (128, 4, 4, 512)
    assert cfg["tie_word_embeddings"] is True


@pytest.fixture(scope="module")
def shipped():
    """The shipped model as the trainer loads it: by name (llm.model: arithmetic) from the adapter registry."""
    from flowrl.pipelines.registry import load_pipeline, pipeline_names

    assert "arithmetic" in pipeline_names("llm")
    return load_pipeline("arithmetic", None, family="llm", dtype="float32", device="cpu")


def test_shipped_model_band_and_miracles(shipped):
    """Greedy on 200 fixed held-out problems: accuracy in the documented band, miracles > 0."""
    problems = ar.make_problems(200, split="heldout", seed=0)
    g = shipped.generate([ar.prompt_text(a, b) for a, b in problems], max_new_tokens=40, temperature=0.0)
    texts = shipped.decode(g)
    acc = steps = miracles = both = 0
    for (a, b), text in zip(problems, texts):
        answer_ok, steps_ok = independent_check(a, b, text)
        c = ar.check_completion(a, b, text)
        assert (c.answer_ok, c.steps_ok) == (answer_ok, steps_ok)
        acc += answer_ok
        steps += steps_ok
        miracles += answer_ok and not steps_ok
        both += answer_ok and steps_ok
    n = len(problems)
    assert ACC_BAND[0] <= acc / n <= ACC_BAND[1], acc / n
    assert miracles / n > 0.02, miracles / n
    assert 1 - steps / n > 0.3  # the systematic bug: many traces have a wrong step
    assert not bool(g.truncated.any())  # every completion ends with EOS
    res = ar.evaluate(shipped, problems)  # the evaluator the build script reports with agrees
    assert res["accuracy"] == acc / n and res["miracle"] == miracles / n
    # and so does the trainer's exact step verifier (the process reward)
    from flowrl.rewards.arithmetic import verify_arithmetic

    v = verify_arithmetic([ar.prompt_text(a, b) for a, b in problems], texts)
    assert int(v.correct.sum()) == acc and int(v.miracle.sum()) == miracles
    assert int(v.all_steps_correct.sum()) == both  # the verifier's "all right" includes the answer


def test_shipped_model_logprobs_recompute(shipped):
    """Sampled log-probs of the shipped model match the teacher-forced recompute (float32)."""
    problems = ar.make_problems(16, split="heldout", seed=3)
    g = shipped.generate([ar.prompt_text(a, b) for a, b in problems], max_new_tokens=40, temperature=1.0,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        re = shipped.logprobs(g)
    assert float((re - g.logp).abs()[g.completion_mask].max()) < 1e-5
