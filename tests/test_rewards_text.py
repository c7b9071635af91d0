"""Text rewards (rewards/text.py, rewards/reasoning_gym_tasks.py): exact values for the model-free ones
(format, math-verify, reasoning-gym scorers); the likelihood reward and the PRM wrapper on tiny transformers
models with random weights, saved and reloaded with from_pretrained, against slow one-sample references."""
from __future__ import annotations

import json
import math
import os
import string

import pytest
import torch

from flowrl.rewards import MissingWeightsError, RewardError, build_process_reward, build_reward

# bad input raises ValueError, or RewardError naming the reward when it comes through Reward.__call__
BAD_INPUT = (ValueError, RewardError)

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
    with pytest.raises(BAD_INPUT, match="meta\\['answer'\\]"):
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
    with pytest.raises(BAD_INPUT, match="meta\\['answer'\\]"):
        r(["z"], ["p"], {})
    with pytest.raises(BAD_INPUT, match="exceeds max_length"):
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


# --------------------------------------------------------------------------------- reasoning-gym tasks
def countdown_slow(answer, numbers, target):
    """Countdown's rule, written out: 0.01 for no answer, 0 for text that is not an arithmetic expression (or
    divides by zero), 0.05 for the wrong multiset of numbers or the wrong value, 1.0 for the exact target
    using each number once."""
    import ast
    import operator
    import re as _re

    if answer is None or not answer.strip():
        return 0.01
    if not _re.fullmatch(r"[\d+\-*/().\s]*", answer):  # not arithmetic: refused, never evaluated
        return 0.0
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant):
            return float(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        raise ValueError

    try:
        value = ev(ast.parse(answer.strip(), mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError):
        return 0.0
    used = sorted(int(x) for x in _re.findall(r"\d+", answer))
    if used != sorted(numbers):
        return 0.05
    return 1.0 if abs(value - target) <= 1e-6 else 0.05


def _countdown_entry(numbers, target):
    return {"question": "q", "answer": "", "metadata": {"source_dataset": "countdown", "numbers": numbers, "target": target}}


def test_countdown_hand_worked():
    r = build_reward("reasoning_gym")
    e = _countdown_entry([3, 7, 25, 50], 175)
    samples = [
        "<think>75*7=525, /3 = 175</think><answer>(25+50)*7/3</answer>",  # right: 1.0
        "<answer>25*7</answer>",  # right value, wrong numbers: 0.05
        "<answer>3+7+25+50</answer>",  # right numbers, wrong value: 0.05
        "<answer></answer>",  # empty: 0.01
        "I think (25+50)*7/3",  # no tag: whole text, not an expression: refused, 0
        "<answer>(25+50)*7/(3-3)</answer>",  # division by zero: refused, 0
        "(25+50)*7/3",  # no tag, the whole completion is the expression: 1.0
        "<answer>50*7/2 + 0*3*25</answer>",  # 175, but with numbers not given (2, 0): 0.05
    ]
    parts = r(samples, [""] * len(samples), {"entry": [e] * len(samples)})
    assert parts["reasoning_gym"].tolist() == pytest.approx([1.0, 0.05, 0.05, 0.01, 0.0, 0.0, 1.0, 0.05])
    assert parts["reasoning_gym/correct"].tolist() == [1, 0, 0, 0, 0, 0, 1, 0]
    assert parts["reasoning_gym/rejected"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert parts["reasoning_gym/timeout"].tolist() == [0] * len(samples)
    strict = build_reward("reasoning_gym", require_tag=True, name="rg_strict")
    assert strict(["(25+50)*7/3"], [""], {"entry": [e]})["rg_strict"].tolist() == pytest.approx([0.01])
    with pytest.raises(BAD_INPUT, match="meta\\['entry'\\]"):
        r(["1"], [""], {"answer": ["1"]})


def test_countdown_generated_against_slow_rule():
    import random

    from flowrl.rewards.reasoning_gym_tasks import make_task_dataset, task_meta

    rows = make_task_dataset("countdown", size=30, seed=11, min_numbers=3, max_numbers=4)
    assert rows == make_task_dataset("countdown", size=30, seed=11, min_numbers=3, max_numbers=4)  # deterministic
    rng = random.Random(0)
    samples = []
    for row in rows:
        expr = row["answer"]
        k = rng.random()
        if k < 0.4:  # swap one operator
            i = [j for j, ch in enumerate(expr) if ch in "+-*"]
            if i:
                j = rng.choice(i)
                expr = expr[:j] + rng.choice("+-*".replace(expr[j], "")) + expr[j + 1:]
        elif k < 0.55:  # drop the last number
            expr = expr.rsplit(" ", 2)[0] if " " in expr else ""
        samples.append(f"<think>...</think><answer>{expr}</answer>")
    parts = build_reward("reasoning_gym")(samples, [r["prompt"] for r in rows], task_meta(rows))
    ref = [countdown_slow(s.split("<answer>")[1].split("</answer>")[0].strip(), r["entry"]["metadata"]["numbers"],
                          r["entry"]["metadata"]["target"]) for s, r in zip(samples, rows)]
    assert parts["reasoning_gym"].tolist() == pytest.approx(ref)
    assert 0 < sum(x == 1.0 for x in ref) < len(ref)


@pytest.mark.parametrize("task", ["countdown", "chain_sum", "basic_arithmetic", "leg_counting"])
def test_reasoning_gym_reference_answers_score_one(task):
    from flowrl.rewards.reasoning_gym_tasks import make_task_dataset, task_meta

    rows = make_task_dataset(task, size=12, seed=5)
    r = build_reward("reasoning_gym")
    good = [f"<answer>{row['answer']}</answer>" for row in rows]
    assert r(good, [row["prompt"] for row in rows], task_meta(rows))["reasoning_gym"].tolist() == [1.0] * 12
    if task != "countdown":  # integer answers: the scorer's exact rule, written out
        row = rows[0]
        ans = row["answer"]

        def rule(a):
            if not a:
                return 0.0
            if task == "chain_sum":  # decimal-tolerant: "+0156.00" == "156"
                try:
                    if float(a) == float(ans):
                        return 1.0
                except ValueError:
                    pass
            if a == ans:
                return 1.0
            return len(ans) / len(a) if ans in a else 0.0

        wrong = str(int(ans) + 1)
        cands = [f"{ans}.00", wrong, f"x{ans}", ""]
        got = r([f"<answer>{c}</answer>" for c in cands], [""] * 4, task_meta([row] * 4))["reasoning_gym"].tolist()
        assert got == pytest.approx([rule(c) for c in cands])


def test_reasoning_gym_bad_task():
    from flowrl.rewards.reasoning_gym_tasks import make_task_dataset

    with pytest.raises(ValueError, match="no_such_task"):
        make_task_dataset("no_such_task", size=2)
    with pytest.raises(ValueError, match="'puzzle24x' is not exposed.*'countdown'"):
        make_task_dataset("puzzle24x", size=2)
    for unsafe in ("polynomial_multiplication", "simple_integration", "codeio"):  # sympy / eval / code
        with pytest.raises(ValueError, match=f"'{unsafe}' is not exposed"):
            make_task_dataset(unsafe, size=2)


def test_exposed_tasks_are_the_audited_ones():
    from reasoning_gym.dataset import ProceduralDataset
    from reasoning_gym.factory import DATASETS

    from flowrl.rewards.reasoning_gym_tasks import DEFAULT_RULE_TASKS, SCORERS, exposed_tasks

    assert set(exposed_tasks()) == set(DEFAULT_RULE_TASKS) | {"countdown", "puzzle24", "number_sorting", "chain_sum"}
    for t in DEFAULT_RULE_TASKS:  # our copy of the base rule is the rule reasoning-gym applies to these
        assert DATASETS[t][0].score_answer is ProceduralDataset.score_answer, t
        assert SCORERS.meta(t) == {"rule": "default"}


def _variants(task, ans):
    """Answers worth comparing for one reference answer (all plain arithmetic or data, so that reasoning-gym's
    own scorer can be run on them here as the reference)."""
    if task == "puzzle24":
        return [ans, ans.replace("+", "-", 1), ans.replace("*", "+", 1), "(" + ans + ")", "1+2+3+4", "", "24"]
    if task == "number_sorting":
        lst = json.loads(ans.replace("'", '"'))
        return [ans, json.dumps(lst), json.dumps([float(x) + 0.5 for x in lst]), json.dumps(lst[::-1]),
                json.dumps(lst[:-1]), "[]", "not a list", "{}"]
    return [ans, f" {ans}", f"{ans}.00", f"+0{ans}", f"x{ans}", ans[:-1], "", "1,000"]


@pytest.mark.parametrize("task", ["puzzle24", "number_sorting", "chain_sum", "gcd", "base_conversion", "leg_counting"])
def test_safe_scorers_agree_with_reasoning_gym_on_plain_answers(task):
    from reasoning_gym import get_score_answer_fn

    from flowrl.rewards.reasoning_gym_tasks import SCORERS, make_task_dataset

    upstream = get_score_answer_fn(task)
    rows = make_task_dataset(task, size=6, seed=3)
    n = 0
    for row in rows:
        for a in _variants(task, row["answer"]):
            ours, reason = SCORERS[task](a, row["entry"])
            if reason is None:  # refused answers score 0 here by design (reasoning-gym: 0.01 / an eval)
                assert ours == pytest.approx(upstream(a, row["entry"])), (task, a)
                n += 1
    assert n >= 6 * 4
