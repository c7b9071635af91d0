"""LLM algorithms are registered strategies: one registered from this test file (no change to the package) trains the
embedded arithmetic model through the plain ``train(cfg, out)``, and its loss is the family's default plus its own
term, as its metrics say; the family's cross-field checks run before anything loads."""
import os
from pathlib import Path

import pytest
import torch

from flowrl.config import load
from flowrl.core import masked_mean
from flowrl.train.algorithms import ALGORITHMS, register_algorithm
from flowrl.train.algorithms.llm_base import LLMAlgorithm
from flowrl.train.config import TrainConfig
from flowrl.train.loop import train
from flowrl.train.metrics_log import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TINY = ["iterations=2", "prompts_per_iter=4", "group_size=4", "eval.every=100", "llm.eval_size=8",
        "llm.dataset_size=64", "progress=false", "trackers=[]", "save_every=100", "max_minutes=0",
        "eval.pass_problems=0"]  # no sampled pass@k evaluation: tests/test_passk.py covers it


class GRPOWithSFT(LLMAlgorithm):
    """GRPO plus a supervised term on the correct completions: L = L_GRPO + coef * (-mean_{correct, t} log pi)."""

    coef = 0.1

    def loss(self, task, rollout, index, batch, adv, logp):
        loss, m = super().loss(task, rollout, index, batch, adv, logp)
        correct = rollout.side.correct[index.to(rollout.side.correct.device)].to(logp.device)
        nll = -masked_mean(logp, batch.mask & correct[:, None])
        m["sft/nll"] = nll.detach()
        m["sft/policy_part"] = loss.detach()
        return loss + self.coef * nll, m


@pytest.fixture
def registered():
    register_algorithm("test_llm_grpo_sft")(GRPOWithSFT)
    yield "test_llm_grpo_sft"
    ALGORITHMS.unregister("test_llm_grpo_sft")


def test_an_algorithm_registered_in_a_test_file_trains_the_arithmetic_model(registered, tmp_path):
    cfg = load(TrainConfig, ROOT / "configs/arith/grpo.yaml", TINY + [f"algorithm={registered}"])
    out = tmp_path / "run"
    result = train(cfg, out)
    assert 0.0 <= result["accuracy"] <= 1.0
    rows = [r for r in read_metrics(out) if r["split"] == "train"]
    assert len(rows) == 2
    for r in rows:
        assert r["sft/nll"] > 0 and r["grad_norm"] > 0
        assert r["policy/loss"] == pytest.approx(r["sft/policy_part"] + GRPOWithSFT.coef * r["sft/nll"], rel=1e-5)
    assert (out / "model" / "model.safetensors").is_file()
    # a finished run loads back into a fresh task of its algorithm (load_export is export's inverse)
    from safetensors.torch import load_file

    from flowrl.train.load_run import load_run

    _, task = load_run(out)
    saved = load_file(str(out / "model" / "model.safetensors"))
    state = task.module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_family_checks_run_for_a_registered_algorithm(registered):
    grpo = ROOT / "configs/arith/grpo.yaml"
    with pytest.raises(ValueError, match="advantage.estimator=prime needs algorithm=llm_prime"):
        ALGORITHMS[registered].validate_config(load(TrainConfig, grpo, ["advantage.estimator=prime", "advantage.params={}"]))
    assert ALGORITHMS[registered].needs_reference(load(TrainConfig, grpo, ["llm.kl_in_reward=0.01"]))
    assert not ALGORITHMS[registered].needs_reference(load(TrainConfig, grpo))
    assert ALGORITHMS["llm_prime"].needs_reference(load(TrainConfig, ROOT / "configs/arith/prime.yaml"))
