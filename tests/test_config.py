"""Typed configs: YAML, --set overrides, clear errors for unknown keys and wrong types."""
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from flowrl.config import ConfigError, apply_overrides, describe, field, from_dict, load, parse_override


@dataclass
class Optim:
    lr: float = field(1e-4, help="learning rate")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], help="Adam betas")


@dataclass
class Cfg:
    name: str = field("run", help="run name")
    steps: int = field(10, help="training steps")
    kind: Literal["ode", "flow_sde"] = field("flow_sde", help="kernel")
    clip: Optional[float] = field(None, help="advantage clip")
    optim: Optim = field(default_factory=Optim, help="optimiser")
    weights: dict[str, float] = field(default_factory=dict, help="reward weights")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\noptim:\n  lr: 0.001\nweights: {clip: 2}\n")
    cfg = load(Cfg, p, ["optim.lr=3e-4", "clip=5", "kind=ode", "optim.betas=[0.5, 0.9]"])
    assert cfg.steps == 20 and cfg.optim.lr == 3e-4 and cfg.clip == 5.0 and cfg.kind == "ode"
    assert cfg.optim.betas == [0.5, 0.9] and cfg.weights == {"clip": 2.0}
    assert isinstance(cfg.clip, float)  # int promoted to float


def test_unknown_key_names_the_path_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*valid keys: \['betas', 'lr'\]"):
        from_dict(Cfg, {"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['stepz'\]"):
        load(Cfg, None, ["stepz=3"])


@pytest.mark.parametrize("override,msg", [
    ("steps=1.5", r"steps: expected an int, got float"),
    ("steps=true", r"steps: expected an int, got bool"),
    ("optim.lr=fast", r"optim.lr: expected a float, got str"),
    ("kind=sde", r"kind: 'sde' is not one of \['ode', 'flow_sde'\]"),
    ("optim=3", r"optim: expected a mapping"),
    ("steps", r"must look like key.path=value"),
])
def test_wrong_types_are_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load(Cfg, None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Cfg, bad)


def test_parse_override_and_describe():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    lines = describe(Cfg)
    assert "optim.lr (float, default 0.0001): learning rate" in lines
    assert any(l.startswith("kind (") and "kernel" in l for l in lines)


def test_yaml_reads_floats_without_a_dot_in_untyped_mappings():
    """``loss.params`` and ``rewards`` options have no declared type, so ``3e-4`` must be a float when read, not the
    string "3e-4" a loss would refuse later (YAML 1.1 needs a dot); integers stay integers."""
    from flowrl.config import yaml_load

    got = yaml_load("params: {eps_low: 3e-4, eps_high: 4E-4, big: -2e+5, steps: 10, text: '3e-4', flag: no}")["params"]
    assert got == {"eps_low": 3e-4, "eps_high": 4e-4, "big": -2e5, "steps": 10, "text": "3e-4", "flag": "no"}
    assert isinstance(got["eps_low"], float) and isinstance(got["steps"], int)
