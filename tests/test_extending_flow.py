"""Extending the flow side from outside the package: a flow algorithm and a model adapter, each registered from
this file, run through the one training loop with no change to any package file."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from flowrl.config import load  # noqa: E402
from flowrl.flow.sampler import recompute_log_prob  # noqa: E402
from flowrl.pipelines.digits import WEIGHTS_DIR, DigitsPipeline, digit_prompts, load_digits, parse_digits  # noqa: E402
from flowrl.pipelines.registry import PIPELINES, load_pipeline, pipeline_names, register_pipeline  # noqa: E402
from flowrl.train.algorithms import ALGORITHMS, register_algorithm  # noqa: E402
from flowrl.train.algorithms.flow_base import FlowAlgorithm  # noqa: E402
from flowrl.train.config import TrainConfig  # noqa: E402

SMALL = ["prompts_per_iter=4", "group_size=4", "eval.every=2", "eval.num_per_prompt=2", "eval.grid_per_prompt=1",
         "progress=false", "trackers=[]", "loss.kl_beta=0.0"]


class Reinforce(FlowAlgorithm):
    """REINFORCE on the denoising steps: L = -sum_{b,t} m_bt A_bt log pi(x_{k_t+1} | x_{k_t}) / sum m (no ratio, no
    clip). Records every call of its hook so the test can see that the loop used it."""

    calls: list[tuple[int, int]] = []

    def backward(self, task, rollout, index, batch, adv, it):
        traj, steps = rollout.side["traj"], rollout.side["steps"]
        b, T = batch.mask.shape
        rows = index.to(traj.latents.device).repeat(T)
        logp = recompute_log_prob(task.pipe, traj, steps.repeat_interleave(b), index=rows).log_prob.view(T, b).T
        m = batch.mask.float()
        loss = -(adv * logp * m).sum() / m.sum().clamp_min(1)
        task.acc.backward(loss)
        type(self).calls.append((it, b))
        return {"reinforce/loss": float(loss.detach())}


@pytest.fixture
def reinforce():
    register_algorithm("test_reinforce")(Reinforce)
    Reinforce.calls = []
    try:
        yield Reinforce
    finally:
        ALGORITHMS.unregister("test_reinforce")
    assert "test_reinforce" not in ALGORITHMS


def test_an_algorithm_registered_in_a_test_file_trains_through_the_loop(reinforce, tmp_path):
    from safetensors.torch import load_file

    from flowrl.train.loop import train
    from flowrl.train.metrics_log import read_metrics

    cfg = load(TrainConfig, None, ["algorithm=test_reinforce", "iterations=2", *SMALL])
    out = tmp_path / "run"
    train(cfg, out)
    assert reinforce.calls == [(0, 16), (1, 16)]  # one minibatch of 4 prompts x 4 samples per iteration
    rows = [r for r in read_metrics(out) if r["split"] == "train"]
    assert len(rows) == 2
    for r in rows:
        assert r["reinforce/loss"] == pytest.approx(r["reinforce/loss"])  # finite: NaN != NaN
        assert "policy/ratio_mean" not in r  # the default PPO backward did not run
    trained = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))  # diffusers layout
    initial = load_digits().trainable.state_dict()
    assert trained.keys() == initial.keys()
    moved = max(float((trained[k] - initial[k]).abs().max()) for k in trained)
    assert moved > 1e-6  # its updates changed the weights


class EvenDigits(DigitsPipeline):
    """The embedded digits model, trained on the even digits only (its own default prompts)."""

    def default_prompts(self) -> list[str]:
        return digit_prompts([0, 2, 4, 6, 8])


def load_even_digits(path, *, device="cpu", dtype=torch.float32, height=None):
    pipe = EvenDigits.from_pretrained(str(path or WEIGHTS_DIR / "flow"), device=device, dtype=dtype, height=height)
    pipe.prompt_labeler = lambda prompts: {"digit": parse_digits(prompts)}
    return pipe


@pytest.fixture
def even_digits():
    register_pipeline("test_even_digits", family="flow")(load_even_digits)
    try:
        yield
    finally:
        PIPELINES.unregister("test_even_digits")
    assert "test_even_digits" not in pipeline_names("flow")


def test_an_adapter_registered_in_a_test_file_is_loaded_by_name(even_digits):
    from accelerate import Accelerator

    from flowrl.train.task import iteration_generator

    assert "test_even_digits" in pipeline_names("flow") and "digits" in pipeline_names("flow")
    pipe = load_pipeline("test_even_digits", None, family="flow", device="cpu", dtype=torch.float32, height=8)
    assert type(pipe) is EvenDigits and pipe.height == 8  # options reach the loader (flow.model_kwargs)
    with pytest.raises(Exception, match=r"unknown llm model adapter 'test_even_digits'; valid"):
        load_pipeline("test_even_digits", None, family="llm")
    # a task of any flow algorithm takes it by name, with its default prompts
    cfg = load(TrainConfig, None, ["flow.model=test_even_digits", "flow.model_kwargs={height: 8}", "iterations=1", *SMALL])
    task = ALGORITHMS[cfg.algorithm].build_task(cfg, Accelerator(cpu=True))
    assert type(task.pipe) is EvenDigits and task.prompts == digit_prompts([0, 2, 4, 6, 8])
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
    asked = parse_digits(roll.side["prompts"])
    assert len(asked) == 16 and bool((asked % 2 == 0).all())


def test_an_unknown_model_adapter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"flow.model='nope' is not a registered flow model adapter; valid: .*'digits'"):
        cfg = load(TrainConfig, None, ["flow.model=nope"])  # the config's own validation may already say so
        ALGORITHMS[cfg.algorithm].validate_config(cfg)
