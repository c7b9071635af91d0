"""Text rewards (rewards/text.py, rewards/reasoning_gym_tasks.py): exact values for the model-free ones
(format, math-verify, reasoning-gym scorers); the likelihood reward and the PRM wrapper on tiny transformers
models with random weights, saved and reloaded with from_pretrained, against slow one-sample references."""
from __future__ import annotations

import math
import os
import string

import pytest
import torch

from flowrl.rewards import MissingWeightsError, RewardError, build_process_reward, build_reward

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAN = float("nan")


# --------------------------------------------------------------------------------- format
def test_format_tags_exact():
    r = build_reward("format_tags")
    samples = [
        "<think>a</think><answer>1</answer>",
        "  <think>\nmulti\nline\n</think>\n<answer> 2 </answer>\n",
        "<think>a</think>",  # no answer
        "<answer>1</answer><think>a</think>",  # wrong order
        "<think>a<think>b</think><answer>1</answer>",  # nested/duplicated tag
        "<think>a</think><answer>1</answer> trailing text",
        "prefix <think>a</think><answer>1</answer>",
        "<think></think><answer></answer>",  # empty blocks are still the format
    ]
    assert r(samples, [""] * len(samples))["format_tags"].tolist() == [1, 1, 0, 0, 0, 0, 0, 1]
    r2 = build_reward("format_tags", tags=["answer"], prefix="", name="ans_only")
    assert r2(["<answer>3</answer>", "x<answer>3</answer>"], ["", ""])["ans_only"].tolist() == [1, 0]
    r3 = build_reward("format_tags", prefix="<think>")  # the prompt already opened <think>
    assert r3(["reasoning</think><answer>5</answer>"], [""])["format_tags"].tolist() == [1]
    with pytest.raises(ValueError, match="valid tag name"):
        build_reward("format_tags", tags=["a b"])


def test_format_regex_exact():
    r = build_reward("format_regex", pattern=r"#### -?\d+\s*", mode="search")
    assert r(["so #### 42", "#### x", "no"], ["", "", ""])["format_regex"].tolist() == [1, 0, 0]
    rf = build_reward("format_regex", pattern=r"\d+")
    assert rf(["123", "123a"], ["", ""])["format_regex"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        build_reward("format_regex", pattern="(")
    with pytest.raises(TypeError):
        r("a single string", [""])


# --------------------------------------------------------------------------------- math
def test_math_verify_exact():
    r = build_reward("math_verify")
    samples = [
        "<think>...</think><answer>\\frac{1}{2}</answer>",
        "<think>...</think><answer>0.5</answer>",
        "The answer is $\\boxed{2/4}$.",  # no tag: whole text, boxed
        "<answer>3</answer>",
        "I do not know",
        "<answer>x^2+2x+1</answer>",
        "<answer>1</answer> and later <answer>42</answer>",  # the last block counts
    ]
    gold = ["1/2", "\\frac{1}{2}", "0.5", "4", "7", "(x+1)^2", "42"]
    parts = r(samples, [""] * len(samples), {"answer": gold})
    assert parts["math_verify"].tolist() == [1, 1, 1, 0, 0, 1, 1]
    assert parts["math_verify/parsed"].tolist() == [1, 1, 1, 1, 0, 1, 1]
    strict = build_reward("math_verify", require_tag=True, name="mv_strict")
    assert strict(["$\\boxed{3}$", "<answer>3</answer>"], ["", ""], {"answer": ["3", "3"]})["mv_strict"].tolist() == [0, 1]


def test_math_verify_unparseable_gold_is_not_a_silent_zero():
    r = build_reward("math_verify")
    with pytest.raises(RewardError, match="non-finite"):
        r(["<answer>3</answer>"], [""], {"answer": [""]})
    rm = build_reward("math_verify", on_error="mask")
    parts = rm(["<answer>3</answer>", "<answer>3</answer>"], ["", ""], {"answer": ["  ", "3"]})
    assert parts["math_verify/valid"].tolist() == [False, True]
    assert math.isnan(parts["math_verify"][0]) and parts["math_verify"][1] == 1
    with pytest.raises(ValueError, match="meta\\['answer'\\]"):
        r(["<answer>3</answer>"], [""], None)


def test_math_verify_in_a_worker_thread():
    from concurrent.futures import ThreadPoolExecutor

    r = build_reward("math_verify")
    with ThreadPoolExecutor(1) as ex:
        out = ex.submit(r, ["<answer>6</answer>"], [""], {"answer": ["6"]}).result()
    assert out["math_verify"].tolist() == [1]


# --------------------------------------------------------------------------------- tiny models
def make_tokenizer(path: str):
    """A character-level fast tokenizer with BOS, pad and the Math-Shepherd step tag as one token."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = list(dict.fromkeys(string.printable))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_tokens(["ки"])
    fast.save_pretrained(path)
    return fast


def make_llama(path: str, vocab_size: int, token_classification: bool = False, num_labels: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, num_labels=num_labels)
    model = (LlamaForTokenClassification if token_classification else LlamaForCausalLM)(cfg)
    with torch.no_grad():  # random weights large enough that scores differ across positions
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_lm")
    tok = make_tokenizer(str(d))
    make_llama(str(d), len(tok))
    return str(d)


def slow_answer_logprob(model, tok, prompt, completion, answer, sep="\n"):
    """One sample at a time, one answer token at a time: log p(a_k | context, a_<k) from a fresh forward."""
    ctx = tok(prompt + completion + sep)["input_ids"]
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    total = 0.0
    for k in range(len(ans)):
        ids = torch.tensor([ctx + ans[:k]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        total += float(torch.log_softmax(logits.double(), -1)[ans[k]])
    return total, len(ans)


def test_answer_logprob_matches_slow_reference(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = build_reward("answer_logprob", model=tiny_lm, batch_size=3)
    prompts = ["Q: 2+2?", "What is 7*6?", "x", "Q: 2+2?", "a longer prompt with more characters in it"]
    comps = ["think: 4", "", "reasoning goes on and on for a while", "wrong: 5", "ok"]
    answers = ["4", "42", "yes", "4", "a much longer reference answer"]
    parts = r(comps, prompts, {"answer": answers})
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    ref = [slow_answer_logprob(model, tok, p, c, a) for p, c, a in zip(prompts, comps, answers)]
    torch.testing.assert_close(parts["answer_logprob"], torch.tensor([x for x, _ in ref]), atol=1e-4, rtol=1e-5)
    assert parts["answer_logprob/num_tokens"].tolist() == [n for _, n in ref]
    assert (parts["answer_logprob"] < 0).all()
    rm = build_reward("answer_logprob", model=model, tokenizer=tok, reduction="mean", name="lp_mean")
    torch.testing.assert_close(rm(comps, prompts, {"answer": answers})["lp_mean"],
                               torch.tensor([x / n for x, n in ref]), atol=1e-4, rtol=1e-5)


def test_answer_logprob_bad_inputs(tiny_lm):
    r = build_reward("answer_logprob", model=tiny_lm)
    with pytest.raises(ValueError, match="meta\\['answer'\\]"):
        r(["z"], ["p"], {})
    with pytest.raises(ValueError, match="exceeds max_length"):
        r(["z" * 300], ["p"], {"answer": ["1"]})
    with pytest.raises(ValueError, match="reduction"):
        build_reward("answer_logprob", model=tiny_lm, reduction="max")


def test_missing_weights_offline_is_a_clear_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="no-such-org/no-such-model"):
        build_reward("answer_logprob", model="no-such-org/no-such-model")
    with pytest.raises(MissingWeightsError, match="local"):
        build_process_reward("prm", model=str(tmp_path / "missing_dir"))


def slow_prm(model, tok, prompt, steps, kind, tag_id, good, bad, label=1):
    """Math-Shepherd's way: tokenise the whole text, find the step tag by its id, and score each step from a
    separate forward over the prefix ending at its tag."""
    text = prompt + " " + "\n".join(s + " ки" for s in steps)
    ids = tok(text)["input_ids"]
    tag_pos = [i for i, t in enumerate(ids) if t == tag_id]
    assert len(tag_pos) == len(steps)
    out = []
    for p in tag_pos:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[: p + 1]])).logits[0, -1].double()
        if kind == "causal_lm":
            out.append(float(torch.softmax(logits[[good, bad]], -1)[0]))
        elif logits.shape[0] == 1:
            out.append(float(torch.sigmoid(logits[0])))
        else:
            out.append(float(torch.softmax(logits, -1)[label]))
    return out


PRM_PROMPTS = ["Q: 12+30?", "Q: what is 3*3?", "empty", "Q: long one"]
PRM_STEPS = [
    ["Step 1: 12+30 = 42.", "Step 2: the answer is 42."],
    ["3*3 = 9"],
    [],  # no steps: a row of NaN
    ["a", "bb", "ccc", "dddd", "Step with + and - signs"],
]


def _check_prm(prm, model, tok, kind, label=1):
    out = prm(PRM_PROMPTS, PRM_STEPS)
    assert out.shape == (4, 5)
    good = tok("+", add_special_tokens=False)["input_ids"][0]
    bad = tok("-", add_special_tokens=False)["input_ids"][0]
    tag = tok("ки", add_special_tokens=False)["input_ids"][0]
    for i, (p, st) in enumerate(zip(PRM_PROMPTS, PRM_STEPS)):
        ref = slow_prm(model, tok, p, st, kind, tag, good, bad, label) if st else []
        torch.testing.assert_close(out[i, : len(st)], torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=1e-5)
        assert torch.isnan(out[i, len(st):]).all()
    fin = out[torch.isfinite(out)]
    assert ((fin > 0) & (fin < 1)).all() and fin.std() > 1e-3  # real, varying probabilities
    return out


def test_prm_causal_lm_matches_slow_reference(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prm = build_process_reward("prm", model=tiny_lm, batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    out = _check_prm(prm, model, tok, "causal_lm")
    # a step that contains the tag text is not taken for a boundary: scores are still per real step
    prm_fixed = build_process_reward("prm", model=tiny_lm, num_steps=3)
    out2 = prm_fixed(["Q"], [["has ки inside", "b"]])
    assert out2.shape == (1, 3) and torch.isfinite(out2[0, :2]).all() and torch.isnan(out2[0, 2])
    with pytest.raises(ValueError, match="num_steps"):
        prm_fixed(["Q"], [["a", "b", "c", "d"]])
    with pytest.raises(ValueError, match="one token"):
        build_process_reward("prm", model=tiny_lm, step_tag="<tag>")
    assert out.dtype == torch.float32


@pytest.mark.parametrize("num_labels", [2, 1])
def test_prm_token_classification_matches_slow_reference(tmp_path, num_labels):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = make_tokenizer(str(tmp_path))
    make_llama(str(tmp_path), len(tok), token_classification=True, num_labels=num_labels)
    prm = build_process_reward("prm", model=str(tmp_path), kind="token_classification", batch_size=3)
    model = AutoModelForTokenClassification.from_pretrained(str(tmp_path)).eval()
    _check_prm(prm, model, AutoTokenizer.from_pretrained(str(tmp_path)), "token_classification")
