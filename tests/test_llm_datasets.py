"""LLM datasets from files: JSON-lines and Hugging Face `datasets` (offline, local), the column mapping that feeds
math_verify / code_tests / a user's reward, the held-out split, chat conversations, the registry of dataset
kinds, and the shipped example sets scored through the dataset path."""
import json
import os
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load
from flowrl.rewards import build_rewards
from flowrl.train.config import TrainConfig
from flowrl.train.llm_data import DATASETS, default_rewards, load_dataset, row_meta

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
MV = str(ROOT / "configs" / "arith" / "jsonl_math_verify.yaml")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg_for(data_path, *overrides, base=MV):
    return load(TrainConfig, base, [f"llm.data_path={data_path}", "llm.eval_data=null", *overrides])


ROWS = [{"question": f"Q:{100 + i}+{200 + i}\n", "solution": str(300 + 2 * i), "source": f"s{i}"} for i in range(20)]


def test_dataset_kinds_are_a_registry():
    assert {"arithmetic", "reasoning_gym", "jsonl", "hf"} <= set(DATASETS.names())
    assert DATASETS.meta("arithmetic")["default_reward"] == "arithmetic"
    with pytest.raises(ConfigError, match=r"llm.dataset='csv' is not a registered dataset; valid: \['arithmetic', 'hf'"):
        load(TrainConfig, MV, ["llm.dataset=csv"])


def test_jsonl_columns_split_and_meta(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = cfg_for(p, "llm.prompt_column=question", "llm.answer_column=solution", "llm.eval_fraction=0.25")
    train, ev = load_dataset(cfg)
    assert len(train) == 15 and len(ev) == 5  # a quarter held out, disjoint
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    for r in train + ev:  # the prompt column became "prompt", the answer column "answer", the rest as it was
        assert set(r) == {"prompt", "answer", "source"}
        assert r["answer"] == str(int(r["prompt"][2:5]) + int(r["prompt"][6:9])) and r["source"] == f"s{int(r['prompt'][2:5]) - 100}"
    meta = row_meta(ev)
    assert set(meta) == {"answer", "source"} and len(meta["answer"]) == 5
    assert [r["prompt"] for r in load_dataset(cfg)[1]] == [r["prompt"] for r in ev]  # a fixed draw
    # the held-out rows do not move with the data seed
    assert [r["prompt"] for r in load_dataset(cfg_for(p, "llm.prompt_column=question", "llm.answer_column=solution",
                                                      "llm.eval_fraction=0.25", "llm.data_seed=7"))[1]] == \
        [r["prompt"] for r in ev]


def test_jsonl_template_and_bad_rows(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train, _ = load_dataset(cfg_for(p, "llm.template='{question}'", "llm.prompt_column=question"))
    assert train[0]["prompt"].startswith("Q:")
    with pytest.raises(ValueError, match=r"no prompt column 'prompt' \(llm.prompt_column\); columns: \['question'"):
        load_dataset(cfg_for(p))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: a list, not an object"):
        load_dataset(cfg_for(str(bad)))
    with pytest.raises(ConfigError, match="llm.data_path='nope.jsonl': no such file"):
        load(TrainConfig, MV, ["llm.data_path=nope.jsonl"])


def test_chat_conversations_need_the_chat_template(tmp_path):
    conv = [{"prompt": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2"}], "answer": "3"}] * 4
    p = write_jsonl(tmp_path / "c.jsonl", conv)
    with pytest.raises(ValueError, match="prompt is a list; give a string, or a chat conversation"):
        load_dataset(cfg_for(p))
    train, _ = load_dataset(cfg_for(p, "llm.chat_template=true"))
    assert train[0]["prompt"][1] == {"role": "user", "content": "1+2"}


def test_a_file_dataset_needs_a_reward(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ConfigError, match="llm.dataset='jsonl' has no verifier of its own: give llm.rewards"):
        load(TrainConfig, MV, [f"llm.data_path={p}", "llm.rewards={}"])


def test_hf_dataset_offline_from_local_paths(tmp_path):
    import datasets  # a dev dependency: the test runs wherever `make test` does
    cache = str(tmp_path / "cache")
    # a save_to_disk folder with two splits, and a local .jsonl read through datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:12]),
                               "test": datasets.Dataset.from_list(ROWS[12:])})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = cfg_for(str(tmp_path / "ds"), "llm.dataset=hf", "llm.eval_data=test", "llm.prompt_column=question",
                  "llm.answer_column=solution")
    train, ev = load_dataset(cfg)
    assert len(train) == 12 and len(ev) == 8 and ev[0] == {"prompt": ROWS[12]["question"], "answer": "324", "source": "s12"}
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train2, ev2 = load_dataset(cfg_for(p, "llm.dataset=hf", "llm.prompt_column=question", "llm.answer_column=solution",
                                       f"llm.data_options={{cache_dir: '{cache}'}}"))
    jl = load_dataset(cfg_for(p, "llm.prompt_column=question", "llm.answer_column=solution"))
    assert train2 == jl[0] and ev2 == jl[1]  # the same rows and split as the jsonl kind
    with pytest.raises(ValueError, match="datasets could not load it.*Offline, give a local path"):
        load_dataset(cfg_for("no-such-user/no-such-dataset-xyz", "llm.dataset=hf",
                             f"llm.data_options={{cache_dir: '{cache}'}}"))


def test_shipped_arith_set_feeds_math_verify_and_the_trl_example():
    cfg = load(TrainConfig, MV)
    train, ev = load_dataset(cfg)
    assert len(train) == 2000 and len(ev) == 200
    from flowrl.pipelines.arithmetic import make_problems, prompt_text, solution_text

    # the evaluation rows are the held-out problems configs/arith/grpo.yaml evaluates on
    assert [r["prompt"] for r in ev] == [prompt_text(a, b) for a, b in make_problems(200, split="heldout", seed=1234)]
    rows = ev[:4]
    a, b = (int(x) for x in rows[0]["prompt"][2:-1].split("+"))
    good = solution_text(a, b)
    texts = [good, good.replace(f"A:{a + b}", f"A:{a + b + 1}"), good.rsplit("\n", 1)[0], good]
    prompts = [rows[0]["prompt"]] * 3 + [rows[1]["prompt"]]
    meta = row_meta([rows[0]] * 3 + [rows[1]])
    for spec in (default_rewards(cfg), load(TrainConfig, ROOT / "configs" / "arith" / "trl_reward.yaml").llm.rewards):
        comb = build_rewards(spec)
        key = next(iter(comb.weights))
        assert comb(texts, prompts, meta)[key].tolist() == [1.0, 0.0, 0.0, 0.0], key


def test_shipped_code_tasks_score_a_good_and_a_bad_solution_through_the_dataset_path():
    from flowrl.rewards.sandbox_bwrap import sandbox_status

    status = sandbox_status("bwrap")
    assert status == "ok", f"bubblewrap is not usable here ({status}); make setup and .ci/run install it"
    cfg = load(TrainConfig, ROOT / "configs" / "code" / "tasks_code_tests.yaml", ["llm.eval_fraction=0.5"])
    train, ev = load_dataset(cfg)
    rows = {r["prompt"].split("`")[1].split("(")[0] if "`" in r["prompt"] else "stdin": r for r in train + ev}
    assert len(rows) == 7
    add, prod = rows["add"], rows["stdin"]
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a + b + (a > 10**6)\n```"  # fails the big-number test
    good_io = "a, b = map(int, input().split())\nprint(a * b)"
    comb = build_rewards(default_rewards(cfg))
    parts = comb([good, bad, good_io], [add["prompt"], add["prompt"], prod["prompt"]], row_meta([add, add, prod]))
    assert parts["code_tests/all_pass"].tolist() == [1.0, 0.0, 1.0]
    assert parts["code_tests"][0] == 1.0 and parts["code_tests"][1] < 0.5
    assert parts["code_tests/pass_rate"].tolist() == pytest.approx([1.0, 2 / 3, 1.0])
