"""Rewards from the user's own code, named by reference in a config: TRL's signature unchanged (the dataset's
columns by keyword, None = a masked sample), flowrl's and verl's signatures, process rewards, and the config
checks that name a missing file, module, function or an unusable signature before anything is imported."""
import os
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load
from flowrl.rewards import build_process_reward, build_reward, build_rewards
from flowrl.train.config import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve())
ARITH = str(ROOT / "configs" / "arith" / "grpo.yaml")


# ---- reward functions as a user writes them, in the signatures of TRL, verl and flowrl (unchanged)
def trl_exact(prompts, completions, answer, **kwargs):
    """TRL: 1.0 when the completion's last line is 'A:<answer>'; None for an empty completion (no score)."""
    out = []
    for c, a in zip(completions, answer):
        out.append(None if not c else float(c.strip().splitlines()[-1] == f"A:{a}"))
    return out


def trl_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def verl_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": float(solution_str.endswith(str(ground_truth))), "source": data_source}


def flowrl_len(samples, prompts, meta):
    return torch.tensor([float(len(s)) for s in samples])


def text_steps(prompts, steps, meta):
    return [[1.0 if s.startswith("A:") else 0.0 for s in st] for st in steps]


def flow_energy(x_t, sigma, cond):
    return -(x_t ** 2).flatten(1).mean(dim=1)


def not_a_reward(x):
    return x


COMPLETIONS = ["7+5+0=12\nA:1332", "7+5+0=12\nA:1331", ""]
PROMPTS = ["Q:347+985\n"] * 3
META = {"answer": ["1332", "1332", "1332"], "tests": [["t"]] * 3}


def test_trl_function_in_this_file_scores_with_columns_by_keyword_and_none_masks():
    comb = build_rewards({f"{HERE}:trl_exact": {"weight": 2.0}})
    assert comb.weights == {"trl_exact": 2.0}  # the score part is named after the function
    outcome, parts, valid, metrics = comb.score(COMPLETIONS, PROMPTS, META)
    assert parts["trl_exact"][:2].tolist() == [1.0, 0.0] and torch.isnan(parts["trl_exact"][2])
    assert valid.tolist() == [True, True, False] and outcome[:2].tolist() == [2.0, 0.0]
    assert metrics["reward/invalid"] == 1.0 and metrics["reward/trl_exact/invalid"] == 1.0


def test_trl_function_without_its_column_names_the_missing_one():
    r = build_reward(f"{HERE}:trl_exact")
    with pytest.raises(Exception, match=r"takes \['answer'\].*columns: \['tests'\]"):
        r(COMPLETIONS, PROMPTS, {"tests": META["tests"]})


def test_verl_flowrl_and_kwargs_only_signatures():
    v = build_reward(f"{HERE}:verl_score", name="v")
    assert v(COMPLETIONS, PROMPTS, META)["v"].tolist() == [1.0, 0.0, 0.0]  # ground_truth <- answer
    f = build_reward(f"{HERE}:flowrl_len")
    assert f(COMPLETIONS, PROMPTS, None)["flowrl_len"].tolist() == [15.0, 15.0, 0.0]
    t = build_reward(f"{HERE}:trl_length", on_error="mask")
    assert t(COMPLETIONS, PROMPTS, META)["trl_length"].tolist() == [15.0, 15.0, 0.0]


def test_a_dotted_module_reference_and_a_registered_name_side_by_side():
    comb = build_rewards({"tests.test_user_rewards:trl_length": 1.0, "format_regex": {"weight": 0.5, "pattern": "A:.*",
                                                                                       "mode": "search"}})
    _, parts, _, _ = comb.score(COMPLETIONS, PROMPTS, META)
    assert parts["trl_length"].tolist() == [15.0, 15.0, 0.0] and parts["format_regex"].tolist() == [1.0, 1.0, 0.0]


def test_process_rewards_by_reference_text_and_flow():
    pr = build_process_reward(f"{HERE}:text_steps")
    s = pr(PROMPTS[:2], [["7+5+0=12", "A:1"], ["A:2"]], None)
    assert s.shape == (2, 2) and s[0].tolist() == [0.0, 1.0] and s[1, 0] == 1.0 and torch.isnan(s[1, 1])
    fr = build_process_reward(f"{HERE}:flow_energy")
    x = torch.ones(2, 1, 2, 2, requires_grad=True)
    out = fr(x, torch.ones(2), {})
    assert fr.differentiable and out.tolist() == [-1.0, -1.0]
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("ref, msg", [
    ("./no_such_file.py:f", "no such file './no_such_file.py'"),
    ("no_such_pkg_xyz.mod:f", "no module named 'no_such_pkg_xyz.mod'|cannot find module"),
    (f"{HERE}:missing_fn", "defines no 'missing_fn'; it defines: .*'trl_exact'"),
    (f"{HERE}:not_a_reward", r"not_a_reward\(x\) does not have .*TRL's"),
])
def test_config_load_names_a_bad_reference_in_one_line(ref, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load(TrainConfig, ARITH, [f"llm.rewards={{'{ref}': 1.0}}"])
    assert "\n" not in str(e.value) and "llm.rewards" in str(e.value)
    with pytest.raises(ConfigError, match=msg):
        load(TrainConfig, ARITH, [f"llm.process_reward={{type: '{ref}'}}"] if "not_a" not in ref else
             [f"llm.rewards={{x: {{type: '{ref}'}}}}"])


def test_config_check_reads_the_source_and_imports_nothing(tmp_path):
    mod = tmp_path / "heavy_rewards.py"
    mod.write_text("raise RuntimeError('imported at config load')\n\ndef score(prompts, completions, **kw):\n"
                   "    return [1.0] * len(completions)\n")
    cfg = load(TrainConfig, ARITH, [f"llm.rewards={{'{mod}:score': 1.0}}"])  # read, not run
    assert list(cfg.llm.rewards) == [f"{mod}:score"]
    with pytest.raises(Exception, match="importing .* failed: RuntimeError: imported at config load"):
        build_rewards(cfg.llm.rewards)


def image_brightness(samples, prompts, meta):
    """flowrl's signature on images float [B, C, H, W]: the mean pixel."""
    return samples.flatten(1).mean(dim=1)


def test_flow_rewards_by_reference_are_checked_at_load_and_build():
    flow = str(ROOT / "configs" / "digits" / "flow_grpo.yaml")
    with pytest.raises(ConfigError, match=r"flow.rewards\['\./nope.py:f'\]: reward '\./nope.py:f': no such file"):
        load(TrainConfig, flow, ["flow.rewards={'./nope.py:f': 1.0}"])
    cfg = load(TrainConfig, flow, [f"flow.rewards={{digits: 1.0, '{HERE}:image_brightness': 0.5}}"])
    comb = build_rewards(cfg.flow.rewards)
    assert comb.weights == {"digits": 1.0, "image_brightness": 0.5}
    x = torch.full((2, 1, 8, 8), 0.25)
    assert build_reward(f"{HERE}:image_brightness")(x, ["0", "1"])["image_brightness"].tolist() == [0.25, 0.25]
