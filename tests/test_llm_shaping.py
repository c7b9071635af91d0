"""The LLM shapers are found by name: an unknown name or parameter fails when the config is read (listing the valid
ones), each registered shaper gives what the core function it wraps gives (against a loop reference of the process
score and the row-by-row gates), and a shaper registered from a user's file is used by name."""
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load
from flowrl.core import accuracy_band_filter, posterior_gate, prof_filter, trust_weight
from flowrl.train.algorithms import ALGORITHMS
from flowrl.train.config import TrainConfig
from flowrl.train.llm_shaping import SHAPERS, Shaped, ShapingInput, process_score, register_shaper, shape

ROOT = Path(__file__).resolve().parents[1]
GRPO = ROOT / "configs" / "arith" / "grpo.yaml"


def test_unknown_shaper_is_rejected_at_config_load_listing_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load(TrainConfig, GRPO, ["llm.shaping=prfo"])
    msg = str(e.value)
    assert "llm.shaping" in msg and "'prfo'" in msg
    for name in ("accuracy_band", "posterior_gate", "prof", "trust_weight"):
        assert name in msg
    with pytest.raises(ConfigError, match=r"shaping_params.*unknown parameter.*'kep'.*'low', 'high'"):
        load(TrainConfig, GRPO, ["llm.shaping=accuracy_band", "llm.shaping_params={kep: 3}"])
    with pytest.raises(ConfigError, match="shaping is null"):
        load(TrainConfig, GRPO, ["llm.shaping_params={keep: 3}"])
    assert load(TrainConfig, GRPO, ["llm.shaping=accuracy_band", "llm.shaping_params={low: 0.1}"]).llm.shaping == "accuracy_band"


def inputs(seed: int, *, B=12, G=4, S=3, it=7) -> ShapingInput:
    g = torch.Generator().manual_seed(seed)
    sr = torch.rand(B, S, generator=g)
    sr[torch.rand(B, S, generator=g) < 0.3] = float("nan")
    sr[0] = float("nan")  # a completion with no scored step (only an answer line)
    sr[1] = torch.tensor([0.5] + [float("nan")] * (S - 1))
    proc, _ = process_score(sr)
    correct, valid = torch.rand(B, generator=g) > 0.5, torch.rand(B, generator=g) > 0.1
    correct[1], valid[1] = True, False  # a correct row whose reward could not be computed
    return ShapingInput(outcome=torch.randn(B, generator=g), correct=correct, valid=valid, group=torch.arange(B) // G,
                        step_reward=sr, process=proc, iteration=it, group_size=G)


def test_process_score_against_a_loop():
    x = inputs(0)
    p, has = process_score(x.step_reward)
    for i in range(len(p)):
        vals = [float(v) for v in x.step_reward[i] if v == v]
        assert bool(has[i]) == bool(vals)
        assert float(p[i]) == pytest.approx(sum(vals) / len(vals) if vals else 0.0, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_shaper_equals_the_core_function_it_wraps(seed):
    x = inputs(seed)
    # prof: a row with no scored step gets first-step score 0; default keep = G // 2
    sr = x.step_reward.clone()
    for i in range(sr.shape[0]):
        if all(v != v for v in sr[i].tolist()):
            sr[i, 0] = 0.0
    out = shape("prof", {}, x)
    assert torch.equal(out.keep, prof_filter(x.correct, sr, x.group, keep=2, valid=x.valid))
    assert torch.equal(out.outcome, x.outcome)
    out = shape("prof", {"keep": 3, "mode": "both"}, x)
    assert torch.equal(out.keep, prof_filter(x.correct, sr, x.group, keep=3, valid=x.valid))
    # posterior_gate: invalid rows keep their outcome
    out = shape("posterior_gate", {"coef": 0.5}, x)
    for i in range(len(x.outcome)):
        want = x.outcome[i] + (0.5 * x.process[i] if bool(x.correct[i]) else 0.0) if bool(x.valid[i]) else x.outcome[i]
        assert float(out.outcome[i]) == pytest.approx(float(want), abs=1e-6)
    assert bool(out.keep.all())
    # trust_weight: r + w * p with the weight annealed by the iteration
    out = shape("trust_weight", {"alpha": 0.4}, x)
    w = trust_weight(x.correct, x.process, x.group, step=7.0, alpha=0.4)
    torch.testing.assert_close(out.outcome, x.outcome + w * x.process)
    assert out.metrics["shaping/trust_weight_mean"] == pytest.approx(float(w.mean()))
    # accuracy_band
    out = shape("accuracy_band", {"low": 0.25, "high": 0.75}, x)
    assert torch.equal(out.keep, accuracy_band_filter(x.correct, x.group, low=0.25, high=0.75, valid=x.valid))
    assert torch.equal(posterior_gate(x.outcome, x.process, torch.zeros_like(x.correct)), x.outcome)


def test_a_shaper_registered_by_a_user_is_found_by_name():
    @register_shaper("test_only_correct")
    def only_correct(x: ShapingInput, *, bonus: float = 0.0) -> Shaped:
        """Keep the correct rows; add ``bonus`` to every outcome."""
        return Shaped(x.outcome + bonus, x.correct & x.valid, {})

    try:
        cfg = load(TrainConfig, GRPO, ["llm.shaping=test_only_correct", "llm.shaping_params={bonus: 1.5}"])
        x = inputs(3)
        out = shape(cfg.llm.shaping, cfg.llm.shaping_params, x)
        assert torch.equal(out.keep, x.correct & x.valid) and torch.equal(out.outcome, x.outcome + 1.5)
        # the family's cross-field check reads the shaper's registration (no process reward needed here)
        ALGORITHMS["llm_grpo"].validate_config(cfg)
        with pytest.raises(ValueError, match="llm.shaping='prof' needs llm.process_reward"):
            ALGORITHMS["llm_grpo"].validate_config(load(TrainConfig, GRPO, ["llm.shaping=prof"]))
    finally:
        SHAPERS.unregister("test_only_correct")
