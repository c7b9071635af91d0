"""Flow prompt data (flowrl.train.flow_data): text, JSONL and `datasets` sources (a save_to_disk folder and a local
parquet file, offline), the evaluation set, limits, clear errors, and metadata columns reaching the rewards of a
real (tiny SD3) training run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flowrl.config import ConfigError, load
from flowrl.train.config import TrainConfig
from flowrl.train.flow_data import PROMPT_SOURCES, PromptDataError, load_prompt_sets, resolve_source

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"caption": "a red cube", "target": 0.25, "style": "photo"},
        {"caption": "a blue ball", "target": 0.75, "style": "anime"},
        {"caption": "a green cone", "target": 1.5, "style": "photo"}]


def _cfg(*sets: str) -> TrainConfig:
    return load(TrainConfig, None, ["flow.model=sd3", *sets])


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_and_jsonl_sources_with_metadata_columns(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("  a cat on a mat \n\n a dog\n")
    train, ev = load_prompt_sets(_cfg(f"flow.prompt_file={txt}"))
    assert train.prompts == ["a cat on a mat", "a dog"] and ev is None
    assert train.meta([0, 1, 1]) is None  # a text file carries no columns

    f = _jsonl(tmp_path / "p.jsonl", ROWS)
    ev_f = _jsonl(tmp_path / "e.jsonl", [{"caption": "a violet star", "target": 9.0, "style": "paint"}])
    train, ev = load_prompt_sets(_cfg(f"flow.prompt_file={f}", "flow.prompt_column=caption",
                                      f"flow.eval_prompt_file={ev_f}"))
    assert train.prompts == ["a red cube", "a blue ball", "a green cone"]
    assert train.meta([2, 0, 2]) == {"target": [1.5, 0.25, 1.5], "style": ["photo", "photo", "photo"]}
    assert ev.prompts == ["a violet star"] and ev.meta_of(["a violet star"] * 2) == {"target": [9.0, 9.0],
                                                                                     "style": ["paint", "paint"]}


def test_hf_sources_offline_save_to_disk_and_parquet_with_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                               "test": datasets.Dataset.from_list([{"caption": "a pink moon", "target": 2.0,
                                                                    "style": "photo"}])})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = _cfg(f"flow.prompt_file={tmp_path / 'ds'}", "flow.prompt_column=caption", "flow.eval_split=test")
    assert resolve_source(cfg.flow, cfg.flow.prompt_file) == "hf"  # a folder: the fallback source
    train, ev = load_prompt_sets(cfg)
    assert train.prompts == ["a red cube", "a blue ball", "a green cone"] and ev.prompts == ["a pink moon"]
    assert train.meta([1])["target"] == [0.75]

    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "p.parquet"))
    train, _ = load_prompt_sets(_cfg(f"flow.prompt_file={tmp_path / 'p.parquet'}", "flow.prompt_column=caption",
                                     "flow.dataset_size=2"))
    assert train.prompts == ["a red cube", "a blue ball"] and train.meta([0, 1])["style"] == ["photo", "anime"]


def test_limits_and_the_shipped_sets():
    assert set(PROMPT_SOURCES.names()) >= {"text", "jsonl", "hf"}
    cfg = load(TrainConfig, ROOT / "configs/flux/dance_grpo_hps.yaml",
               [f"flow.prompt_file={ROOT / 'data/hps_prompts.jsonl'}",
                f"flow.eval_prompt_file={ROOT / 'data/hps_prompts_eval.jsonl'}", "flow.eval_size=7"])
    train, ev = load_prompt_sets(cfg)
    assert len(train) == 200 and len(ev) == 7
    assert set(train.meta(range(len(train)))["category"]) == {"anime", "concept-art", "paintings", "photo"}
    for train_file, eval_file, n_train, n_eval in (("pickscore_train.txt", "pickscore_eval.txt", 216, 50),
                                                   ("video_prompts.txt", "video_prompts_eval.txt", 100, 20)):
        t, e = load_prompt_sets(_cfg(f"flow.prompt_file={ROOT / 'data' / train_file}",
                                     f"flow.eval_prompt_file={ROOT / 'data' / eval_file}"))
        assert (len(set(t.prompts)), len(set(e.prompts))) == (n_train, n_eval)  # no duplicates
        assert not set(t.prompts) & set(e.prompts)  # evaluation held out


@pytest.mark.parametrize("sets,match", [
    (["flow.prompt_source=csvv"], r"prompt_source='csvv' is not a registered prompt source; valid: \['auto', "),
    (["flow.eval_size=0"], "eval_size=0: must be >= 1"),
    (["flow.prompt_file=p.txt", "flow.eval_split=test"], "the 'text' source .* has no splits"),
    (["flow.eval_split=test"], "eval_split='test' is a split of the dataset flow.prompt_file, which is not set"),
    (["flow.eval_prompt_file=e.txt", "flow.eval_prompts=[a cat]"], "give one source of evaluation prompts"),
])
def test_inconsistent_keys_are_refused_when_the_config_is_read(sets, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*sets)


def test_bad_files_name_the_key_the_row_and_the_columns(tmp_path):
    with pytest.raises(PromptDataError, match=r"flow.prompt_file '.*nope.txt' does not exist \(relative paths"):
        load_prompt_sets(_cfg(f"flow.prompt_file={tmp_path / 'nope.txt'}"))
    f = _jsonl(tmp_path / "p.jsonl", ROWS)
    with pytest.raises(PromptDataError, match=r"row 0: no prompt column 'prompt' .*columns: \['caption', 'style', 'target'\]"):
        load_prompt_sets(_cfg(f"flow.prompt_file={f}"))
    g = _jsonl(tmp_path / "q.jsonl", [{"prompt": "ok"}, {"prompt": 3}])
    with pytest.raises(ValueError, match="row 1: the prompt column 'prompt' holds 3"):
        load_prompt_sets(_cfg(f"flow.prompt_file={g}"))
    empty = tmp_path / "e.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_prompt_sets(_cfg(f"flow.prompt_file={empty}"))


REWARD = '''
import torch

def target_reward(samples, prompts, meta):
    """The metadata column `target` of each sample's prompt: the run's reward is then the mean of the targets."""
    return torch.tensor(meta["target"], dtype=torch.float32)
'''


def test_metadata_columns_reach_the_rewards_in_training_and_evaluation(tmp_path, monkeypatch):
    from flowrl.pipelines.tiny import build_tiny_sd3
    from flowrl.train.loop import train
    from flowrl.train.metrics_log import read_metrics

    d = build_tiny_sd3(tmp_path / "sd3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text(REWARD)
    _jsonl(tmp_path / "train.jsonl", ROWS)
    _jsonl(tmp_path / "eval.jsonl", [{"caption": "a pink moon", "target": 4.0}, {"caption": "a grey owl", "target": 6.0}])
    cfg = _cfg(f"flow.model_path={d}", "flow.prompt_file=train.jsonl", "flow.eval_prompt_file=eval.jsonl",
               "flow.prompt_column=caption", "flow.rewards={my_reward.py:target_reward: {weight: 1.0}}",
               "iterations=1", "prompts_per_iter=3", "group_size=2", "flow.num_steps=2", "eval.every=1",
               "eval.num_per_prompt=1", "eval.grid_per_prompt=1", "progress=false", "trackers=[]")
    train(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    tr = [r for r in rows if r["split"] == "train"]
    ev = [r for r in rows if r["split"] == "eval"]
    assert len(tr) == 1 and math.isclose(tr[0]["reward"], (0.25 + 0.75 + 1.5) / 3, rel_tol=1e-6)  # every prompt once
    assert ev and all(math.isclose(r["reward"], 5.0, rel_tol=1e-6) for r in ev)  # the evaluation file's targets
