"""The embedded countdown model on reasoning-gym's countdown: the compact prompt format, the shipped weights and
tokenizer (from_pretrained), the build script's noisy targets, and a short GRPO run whose held-out reward rises."""
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load
from flowrl.pipelines import countdown as cd
from flowrl.rewards.reasoning_gym_tasks import compact_prompt, make_task_dataset
from flowrl.train.config import TrainConfig
from flowrl.train.loop import train
from flowrl.train.metrics_log import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = ROOT / "configs" / "countdown" / "tiny_grpo.yaml"
# the base model solves a minority of the held-out puzzles (headroom for RL): scripts/build_countdown.py
ACC_BAND = (0.15, 0.50)


def _entry(numbers, target, task="countdown"):
    return {"question": "q", "answer": "", "metadata": {"source_dataset": task, "numbers": numbers, "target": target}}


def test_compact_prompt_hand_worked_and_errors():
    assert compact_prompt(_entry([3, 7, 25, 50], 175)) == "3 7 25 50=175:"
    assert compact_prompt(_entry([10, 1, 1], 9)) == "10 1 1=9:"
    rows = make_task_dataset("countdown", size=5, seed=3, prompt_format="compact", **cd.TASK_OPTIONS)
    for r in rows:  # the prompt is rendered from the record's own metadata, the English question is unused
        m = r["entry"]["metadata"]
        assert r["prompt"] == " ".join(map(str, m["numbers"])) + "=" + str(m["target"]) + ":"
    english = make_task_dataset("countdown", size=5, seed=3, **cd.TASK_OPTIONS)
    assert [r["entry"] for r in english] == [r["entry"] for r in rows]  # same puzzles, other rendering
    assert all(r["entry"]["question"] in e["prompt"] for r, e in zip(rows, english))
    with pytest.raises(ValueError, match="prompt_format='bogus'.*template.*compact"):
        make_task_dataset("countdown", size=2, prompt_format="bogus")
    with pytest.raises(ValueError, match="compact.*chain_sum"):
        make_task_dataset("chain_sum", size=2, prompt_format="compact")
    with pytest.raises(ValueError, match="compact.*leg_counting"):
        compact_prompt(_entry([1], 1, task="leg_counting"))
    with pytest.raises(ConfigError, match="prompt_format"):
        load(TrainConfig, TINY_CFG, ["llm.prompt_format=short"])


def test_shipped_model_loads_with_from_pretrained_and_tokenizer_round_trips():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(cd.WEIGHTS_DIR))
    tok = AutoTokenizer.from_pretrained(str(cd.WEIGHTS_DIR))
    n = sum(p.numel() for p in model.parameters())
    assert 200_000 <= n <= 1_200_000 and model.config.vocab_size == len(tok) == 3 + len(cd.CHARS)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and tok.padding_side == "left"
    rows = make_task_dataset("countdown", size=50, seed=7, prompt_format="compact", **cd.TASK_OPTIONS)
    texts = [r["prompt"] + r["answer"].replace(" ", "") for r in rows] + ["(10-1)/3*2+7", cd.CHARS]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(t) and tok.unk_token_id not in ids, t  # one token per character, none unknown
        assert tok.decode(ids) == t
    assert tok.convert_ids_to_tokens(tok("a", add_special_tokens=False)["input_ids"]) == ["<unk>"]
    # the pipeline loader gives the same weights
    pipe = cd.load_countdown()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), pipe.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="build_countdown"):
        cd.load_countdown(ROOT / "no_such_dir")
    # the trainer finds it by name (llm.model: countdown) in the adapter registry
    from flowrl.pipelines.registry import load_pipeline, pipeline_names

    assert "countdown" in pipeline_names("llm")
    reg = load_pipeline("countdown", None, family="llm", dtype="float32", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(reg.model.state_dict().values(), model.state_dict().values()))


def test_build_script_noisy_targets():
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_countdown import buggy_answer

    rng = random.Random(0)
    assert buggy_answer("5*(8-2)", rng, 1.0) == "5+(8-2)"
    assert buggy_answer("1*3*6", rng, 1.0) == "1+3+6"
    assert buggy_answer("5*(8-2)", rng, 0.0) == "5*(8-2)"
    assert buggy_answer("9+1-3", rng, 1.0) == "9+1-3"  # nothing to confuse
    hits = sum(buggy_answer("2*3", rng, 0.6) == "2+3" for _ in range(4000))
    assert abs(hits / 4000 - 0.6) < 0.03
    with pytest.raises(ValueError, match="p_bug"):
        buggy_answer("2*3", rng, 1.5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_countdown_reward_with_the_shipped_model(seed, tmp_path):
    """configs/countdown/tiny_grpo.yaml, shortened: reasoning-gym's scorer on 200 held-out puzzles, greedy."""
    torch.set_num_threads(1)
    cfg = load(TrainConfig, TINY_CFG, [f"seed={seed}", "iterations=20", "eval.every=20", "progress=false",
                                        "trackers=[]", "save_every=1000", "max_minutes=0"])
    out = tmp_path / "run"
    train(cfg, out)
    ev = [r for r in read_metrics(out) if r["split"] == "eval"]
    first, last = ev[0], ev[-1]
    assert (first["step"], last["step"]) == (0, 20)
    assert ACC_BAND[0] <= first["accuracy"] <= ACC_BAND[1]
    assert last["accuracy"] >= first["accuracy"] + 0.10, json.dumps(ev)
    assert last["reward"] >= first["reward"] + 0.08, json.dumps(ev)
