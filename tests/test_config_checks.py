"""A config is checked when it is read: ranges, registered names, the algorithm's cross-field rules. A bad one is
refused with one line that names the key, before any model library is imported, and every shipped config loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flowrl.config import ConfigError, load
from flowrl.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs/digits/flow_grpo.yaml"
ARITH = ROOT / "configs/arith/grpo.yaml"
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_loads(path):
    cfg = load(TrainConfig, path)
    assert cfg.algorithm


# (override, words the message must hold): each is a setting that used to run and train nothing, divide by
# zero, or silently turn a safeguard off.
NONSENSE = [
    ("iterations=-5", "iterations=-5"),
    ("iterations=0", "iterations=0"),
    ("updates_per_rollout=0", "updates_per_rollout=0"),
    ("minibatches=0", "minibatches=0"),
    ("prompts_per_iter=0", "prompts_per_iter=0"),
    ("save_every=0", "save_every=0"),
    ("eval.every=0", "eval.every=0"),
    ("optim.lr=inf", "optim.lr=inf"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.lr=-1e-4", "optim.lr=-0.0001"),
    ("optim.grad_clip=nan", "optim.grad_clip=nan"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1"),
    ("ema.every=0", "ema.every=0"),
    ("ema.decay=1.0", "ema.decay=1.0"),
    ("lora.rank=0", "lora.rank=0"),
    ("loss.kl_beta=nan", "loss.kl_beta=nan"),
    ("group_size=1", "group_size=1"),
    ("algorithm=nope", "nope"),
    ("advantage.estimator=nope", "nope"),
    ("loss.name=nope", "nope"),
    ("loss.agg=nope", "nope"),
    ("advantage.params={scale: group, bogus: 1}", "bogus"),
    ("flow.tp_eta=1.0", "tp_eta"),
    ("flow.process_weight=0.5", "process_weight"),
]


@pytest.mark.parametrize("override,words", NONSENSE, ids=[o for o, _ in NONSENSE])
def test_nonsense_settings_are_refused_when_read(override, words):
    with pytest.raises(ConfigError) as e:
        load(TrainConfig, DIGITS, [override])
    msg = str(e.value)
    assert words in msg, msg
    assert "\n" not in msg


def test_group_size_one_is_fine_for_an_estimator_that_needs_no_group():
    cfg = load(TrainConfig, ARITH, ["group_size=1", "advantage.estimator=reinforce_pp", "advantage.params={}"])
    assert cfg.group_size == 1


def test_the_refused_names_list_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load(TrainConfig, DIGITS, ["algorithm=flow_grpoo"])
    assert "flow_grpo" in str(e.value) and "llm_grpo" in str(e.value)


@pytest.mark.parametrize("override,light", [("algorithm=nope", False), ("group_size=1", False),
                                            ("flow.tp_balance=true", True), ("optim.lr=inf", True)])
def test_cli_refuses_before_any_model_library_is_imported(override, light, tmp_path):
    """`flowrl train` exits 2 with one line and no traceback, and neither diffusers nor transformers was imported
    (so no model was loaded). An unknown key or a value out of range is refused before even torch is imported
    (0.2 s here); a registered name needs the registries, so torch (5 s to import on this machine)."""
    code = ("import sys; from flowrl.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules]; "
            "print('HEAVY', heavy, 'TORCH', 'torch' in sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "train", str(DIGITS), "--set", override, "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("flowrl train: "), r.stderr
    assert "HEAVY []" in r.stdout
    if light:
        assert "TORCH False" in r.stdout, r.stdout
    assert not (tmp_path / "r").exists()


def test_a_mapping_setting_is_the_files_own_not_merged_with_the_defaults(tmp_path):
    """A real-model config names its rewards: the default digits reward must not join them (it did: every SD3 /
    FLUX / Wan run was also trained on the digits classifier), and a loss receives only the parameters its
    config gives."""
    cfg = load(TrainConfig, ROOT / "configs/sd3/flow_grpo_pickscore.yaml")
    assert set(cfg.flow.rewards) == {"pickscore"}
    cfg = load(TrainConfig, ROOT / "configs/flux/dance_grpo_hps.yaml")
    assert "digits" not in cfg.flow.rewards
    p = tmp_path / "c.yaml"
    p.write_text("algorithm: llm_grpo\nloss: {name: ppo_clip, params: {eps_low: 0.3}}\nllm: {model: arithmetic}\n")
    cfg = load(TrainConfig, p)
    assert cfg.loss.params == {"eps_low": 0.3}
    assert cfg.loss.name == "ppo_clip" and cfg.loss.agg == "token_mean"  # sections still merge key by key
    assert cfg.optim.lr == TrainConfig().optim.lr
