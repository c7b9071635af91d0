"""docs/extending.md stays true: every file it shows is written to an empty directory, every YAML it shows loads
there (its `plugins:` import the files, the names they register are checked like built-in ones), and the
estimator, loss and reward it shows compute what their docstrings say."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from flowrl.config import load
from flowrl.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
# a file's name in backticks alone on a line ending with ':' (text may follow the name), then its fenced block
_BLOCK = re.compile(r"^`([\w.]+\.(?:py|yaml))`[^\n]*:\n\n```(?:python|yaml)\n(.*?)\n```", re.M | re.S)


def doc_files() -> dict[str, str]:
    files = dict(_BLOCK.findall(DOC.read_text()))
    assert files, "no file blocks found in docs/extending.md"
    return files


@pytest.fixture
def doc_dir(tmp_path, monkeypatch):
    """The page's files in an empty directory (the working directory, as the page says), and every name their
    plug-ins register removed again afterwards."""
    from flowrl.core import ADVANTAGES, LOSSES
    from flowrl.pipelines.registry import PIPELINES
    from flowrl.rewards import PROCESS_REWARDS, REWARDS
    from flowrl.train.algorithms import ALGORITHMS
    from flowrl.train.llm_shaping import SHAPERS

    registries = (ADVANTAGES, LOSSES, PIPELINES, REWARDS, PROCESS_REWARDS, ALGORITHMS, SHAPERS)
    before = [set(r) for r in registries]
    for name, text in doc_files().items():
        (tmp_path / name).write_text(text + "\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for reg, old in zip(registries, before):
        for name in set(reg) - old:
            reg.unregister(name)


def test_the_page_shows_each_extension_point_as_a_file_and_a_yaml():
    files = doc_files()
    assert {"flow_reinforce.py", "flow_reinforce.yaml", "llm_grpo_sft.py", "llm_grpo_sft.yaml", "my_estimators.py",
            "my_median.yaml", "my_losses.py", "my_pg.yaml", "my_rewards.py", "my_bright.yaml", "mlp_digits.py",
            "mlp_digits.yaml"} <= set(files)
    for name, text in files.items():
        if name.endswith(".yaml"):
            assert re.search(r"^plugins: \[\.?/?[\w]+\.py\]", text, re.M), f"{name} does not import its file"


def test_every_yaml_of_the_page_loads_and_names_what_its_file_registers(doc_dir):
    names = {"flow_reinforce.yaml": ("algorithm", "flow_reinforce"), "llm_grpo_sft.yaml": ("algorithm", "llm_grpo_sft"),
             "my_median.yaml": ("advantage.estimator", "median_baseline"), "my_pg.yaml": ("loss.name", "clipped_pg"),
             "mlp_digits.yaml": ("flow.model", "mlp_digits")}
    for yaml_name in sorted(n for n in doc_files() if n.endswith(".yaml")):
        cfg = load(TrainConfig, doc_dir / yaml_name)
        if yaml_name in names:
            key, value = names[yaml_name]
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (yaml_name, key, node)
    assert "brightness" in load(TrainConfig, doc_dir / "my_bright.yaml").flow.rewards


def test_the_page_refuses_what_its_plugins_do_not_take(doc_dir):
    from flowrl.config import ConfigError

    with pytest.raises(ConfigError, match="unknown parameter.*bogus"):
        load(TrainConfig, doc_dir / "my_median.yaml", ["advantage.params={bogus: 1}"])
    with pytest.raises(ConfigError, match="group_size=1"):
        load(TrainConfig, doc_dir / "my_median.yaml", ["group_size=1"])


def test_the_estimator_loss_and_reward_of_the_page_compute_their_formulas(doc_dir):
    from flowrl.core import TrajectoryBatch, compute_advantages, compute_policy_loss
    from flowrl.rewards import build_reward

    load(TrainConfig, doc_dir / "my_median.yaml")
    load(TrainConfig, doc_dir / "my_pg.yaml")
    load(TrainConfig, doc_dir / "my_bright.yaml")
    g = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=g)
    mask = torch.rand(12, 5, generator=g) > 0.3
    mask[:, 0] = True
    batch = TrajectoryBatch(group=torch.arange(3).repeat_interleave(4), mask=mask, step=torch.zeros(12, 5, dtype=torch.long),
                            old_logp=torch.zeros(12, 5), outcome=r)
    adv = compute_advantages("median_baseline", batch, scale=2.0)
    for i in range(12):  # the docstring's formula, one sample at a time
        grp = r[(i // 4) * 4:(i // 4) * 4 + 4]
        want = 2.0 * (r[i] - grp.median())
        assert torch.allclose(adv[i][mask[i]], want.expand(int(mask[i].sum()))), i
        assert (adv[i][~mask[i]] == 0).all()

    logp = torch.randn(12, 5, generator=g)
    loss, _ = compute_policy_loss("clipped_pg", logp, logp, adv, mask, agg="token_mean", adv_clip=0.1)
    want = (-(adv.clamp(-0.1, 0.1) * logp)[mask]).mean()
    assert torch.allclose(loss, want)

    imgs = torch.rand(3, 1, 8, 8, generator=g)
    score = build_reward("brightness")(imgs, ["a", "b", "c"])["brightness"]
    assert torch.allclose(score, imgs.mean(dim=(1, 2, 3)))
