"""The LLM trainer on the embedded arithmetic model: every config runs, GRPO raises held-out accuracy, process
rewards (dual-level with the step verifier) fix the steps faster than outcome-only GRPO, resume equals an
uninterrupted run, two processes equal one, and bad input fails clearly."""
import os
import socket
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load
from flowrl.train.config import TrainConfig
from flowrl.train.loop import iteration_generator, train
from flowrl.train.metrics_log import read_metrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
ARITH = sorted((ROOT / "configs" / "arith").glob("*.yaml"))
TINY = ["iterations=1", "prompts_per_iter=4", "group_size=4", "eval.every=100", "llm.eval_size=8",
        "llm.dataset_size=64", "progress=false", "trackers=[]", "save_every=100", "max_minutes=0",
        "eval.pass_problems=0"]  # no sampled pass@k evaluation: tests/test_passk.py covers it


def cfg_of(path, *overrides):
    return load(TrainConfig, path, TINY + list(overrides))


def train_rows(out):
    return [r for r in read_metrics(out) if r["split"] == "train"]


@pytest.mark.parametrize("path", ARITH, ids=[p.stem for p in ARITH])
def test_each_arith_config_runs_and_writes_its_outputs(path, tmp_path):
    cfg = cfg_of(path)
    out = tmp_path / "run"
    result = train(cfg, out)
    # the step metrics come from the arithmetic verifier; the JSONL configs score the answer alone
    steps = {"miracle_rate", "all_steps_correct"} if cfg.llm.dataset == "arithmetic" else set()
    assert {"accuracy", "reward"} | steps <= set(result)
    rows = train_rows(out)
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["reward"])) and rows[0]["grad_norm"] > 0
    for f in ("metrics.jsonl", "report.md", "curves.png", "config.yaml", "samples/step_00001.txt"):
        assert (out / f).exists(), f
    assert (out / ("lora" if cfg.lora.enabled else "model")).is_dir()
    if cfg.minibatches == 1 and cfg.updates_per_rollout == 1:
        assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy: recompute == sampler
    if cfg.loss.kl_beta > 0 or cfg.algorithm == "llm_prime":
        assert rows[0]["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the first rollout's policy is the reference
    if cfg.algorithm == "llm_prime":
        assert {"prm/loss", "prm/acc"} <= set(rows[0])


def _task(name, *overrides):
    from accelerate import Accelerator

    from flowrl.train.llm_task import LLMTask

    cfg = cfg_of(ROOT / "configs" / "arith" / f"{name}.yaml", *overrides)
    return cfg, LLMTask(cfg, Accelerator(cpu=True))


def test_truncation_mask_overlong_penalty_and_is_correction():
    """Truncated completions leave the loss, the soft overlong penalty is added to the reward, and a top-k sampler
    gets importance weights w = pi_tau / pi_S = Z_S <= 1 against the trainer's recompute."""
    from flowrl.core import soft_overlong_penalty

    cfg, task = _task("grpo", "llm.max_new_tokens=31", "llm.mask_truncated=true", "llm.overlong_cache=6", "llm.top_k=3",
                      "prompts_per_iter=4")
    roll = task.rollout(0, iteration_generator(0, 0, 0))
    s, batch = roll.side, roll.batch.validate()
    trunc = s.truncated
    assert 0 < int(trunc.sum()) < len(trunc), "the length limit should cut some completions and not others"
    assert not bool(batch.mask[trunc].any()) and bool(batch.mask[~trunc].any())
    lengths = s.comp_mask.sum(1)
    pen = soft_overlong_penalty(lengths, 31, 6)
    torch.testing.assert_close(batch.outcome, s.outcome + pen)
    assert s.is_w is not None and float(s.is_w.max()) <= 1.0 + 1e-6
    w_ref = torch.exp(batch.old_logp - s.sampler_logp).clamp(max=2.0) * s.comp_mask
    torch.testing.assert_close(s.is_w, w_ref, atol=1e-5, rtol=1e-5)


def test_step_rewards_come_from_the_verifier_line_by_line():
    """The batch's steps are the completion's lines and step_reward is the verifier's score of each line."""
    from flowrl.rewards.arithmetic import split_steps, verify_arithmetic

    cfg, task = _task("dual_level")
    roll = task.rollout(0, iteration_generator(0, 0, 0))
    batch, s = roll.batch, roll.side
    for i, text in enumerate(s.texts):  # a slow reference: split and score each completion alone
        lines = split_steps(text)
        ref = verify_arithmetic([s.prompts[i]], [lines]).step_scores[0]
        got = batch.step_reward[i, : len(lines)]
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.nan_to_num(got), torch.nan_to_num(ref))
        assert bool(torch.isnan(batch.step_reward[i, len(lines):]).all())
        toks = s.comp_ids[i][s.comp_mask[i]].tolist()
        chars = [task.pipe.tokenizer.decode([t]) for t in toks]
        nl = 0
        for t, ch in enumerate(chars):  # step of a token = newlines before it
            assert int(batch.step[i, t]) == min(nl, len(lines) - 1) or ch == "<eos>"
            nl += ch.count("\n")


def _run(path, out, *overrides):
    cfg = load(TrainConfig, path, ["progress=false", "trackers=[]", "save_every=1000", "max_minutes=0"] + list(overrides))
    return train(cfg, out)


@pytest.mark.slow
def test_grpo_raises_greedy_heldout_accuracy(tmp_path):
    """configs/arith/grpo.yaml, 30 iterations: greedy exact match on the 200 held-out problems rises by >= 25 points
    (measured: 0.335 -> 0.675, +34 points; the rise comes late, between iterations 24 and 30), and the miracle-step
    rate first rises above its start (outcome-only credit rewards right answers after wrong steps)."""
    out = tmp_path / "grpo"
    _run(ROOT / "configs/arith/grpo.yaml", out, "iterations=30", "eval.every=6")
    ev = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert ev[0]["step"] == 0 and ev[-1]["step"] == 30
    gain = ev[-1]["accuracy"] - ev[0]["accuracy"]
    assert gain >= 0.25, f"accuracy {ev[0]['accuracy']:.3f} -> {ev[-1]['accuracy']:.3f}"
    assert max(r["miracle_rate"] for r in ev[1:]) > ev[0]["miracle_rate"] + 0.05


@pytest.mark.slow
def test_dual_level_step_rewards_fix_steps_faster_than_outcome_only(tmp_path):
    """The issue's target: from the same seed, over the first 30 iterations, the share of sampled completions with
    every step right is at least 20 points higher with the verifier's step rewards (configs/arith/dual_level.yaml)
    than with the outcome only (grpo.yaml). Measured: +21.9 / +22.6 / +19.0 points on seeds 0 / 1 / 2 (0.516 vs
    0.297 on seed 0, the one run here); asserted with a margin: >= 15 points. Greedy held-out accuracy must not
    fall behind GRPO's (measured 0.860 vs 0.675 on 200 problems; 50 here, so a 5-point margin)."""
    common = ["iterations=30", "eval.every=30", "llm.eval_size=50"]
    _run(ROOT / "configs/arith/grpo.yaml", tmp_path / "o", *common)
    _run(ROOT / "configs/arith/dual_level.yaml", tmp_path / "p", *common)
    mean = lambda out: sum(r["all_steps_correct"] for r in train_rows(out)) / len(train_rows(out))
    o, p = mean(tmp_path / "o"), mean(tmp_path / "p")
    assert len(train_rows(tmp_path / "o")) == len(train_rows(tmp_path / "p")) == 30
    assert p - o >= 0.15, f"all-steps-correct share: outcome-only {o:.3f}, dual-level {p:.3f}"
    acc = lambda out: [r for r in read_metrics(out) if r["split"] == "eval"][-1]["accuracy"]
    assert acc(tmp_path / "p") >= acc(tmp_path / "o") - 0.05, (acc(tmp_path / "o"), acc(tmp_path / "p"))


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    """PRIME (policy, its optimiser and the implicit PRM with its optimiser): 3 iterations straight == 1 + resume."""
    path = ROOT / "configs/arith/prime.yaml"
    full, part = tmp_path / "full", tmp_path / "part"
    kw = ("save_every=1", "eval.every=1", "prompts_per_iter=2")
    train(cfg_of(path, "iterations=3", *kw), full)
    train(cfg_of(path, "iterations=1", *kw), part)  # "killed" after step 1
    train(cfg_of(path, "iterations=3", *kw), part, resume=True)
    keys = ("step", "split", "reward", "policy/ratio_mean", "grad_norm", "prm/loss", "accuracy")
    strip = lambda rows: [{k: r[k] for k in keys if k in r} for r in rows]
    assert strip(read_metrics(full)) == strip(read_metrics(part))
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "model/model.safetensors")), load_file(str(part / "model/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_input_fails_clearly(tmp_path):
    grpo = ROOT / "configs/arith/grpo.yaml"
    with pytest.raises(ConfigError, match=r"unknown config key.*'llm.max_new_tokenz'"):
        cfg_of(grpo, "llm.max_new_tokenz=3")
    with pytest.raises(ConfigError, match="llm.temperature: expected a float"):
        cfg_of(grpo, "llm.temperature=hot")
    with pytest.raises(ConfigError, match="llm.dataset_size=0: the training dataset is empty"):
        cfg_of(grpo, "llm.dataset_size=0")  # a range check of the section: when the config is read
    with pytest.raises(ConfigError, match=r"llm.overlong_cache=41: must lie in \[0, max_new_tokens=40\]"):
        cfg_of(grpo, "llm.overlong_cache=41")
    with pytest.raises(ConfigError, match="llm.temperature=0.0: rollouts sample"):
        cfg_of(grpo, "llm.temperature=0.0")
    # the algorithms' cross-field checks fail before any data or model loads
    with pytest.raises(ValueError, match="needs llm.process_reward"):
        train(cfg_of(grpo, "llm.shaping=prof"), tmp_path / "b")
    with pytest.raises(ValueError, match="set advantage.estimator=prime"):
        train(cfg_of(ROOT / "configs/arith/prime.yaml", "advantage.estimator=grpo", "advantage.params={}"), tmp_path / "c")
    with pytest.raises(ValueError, match="advantage.estimator=prime needs algorithm=llm_prime"):
        train(cfg_of(grpo, "advantage.estimator=prime", "advantage.params={}"), tmp_path / "d")
    with pytest.raises(ValueError, match=r"unknown llm model adapter 'digits'; valid: \['arithmetic', 'causal_lm', 'countdown'\]"):
        train(cfg_of(grpo, "llm.model=digits"), tmp_path / "e")
    with pytest.raises(ConfigError, match="llm_grpo"):
        cfg_of(grpo, "algorithm=llm_nope")
    assert not any((tmp_path / d / "checkpoints").exists() for d in "bcde")


def test_nan_reward_is_a_clear_error_or_a_counted_mask(tmp_path):
    from flowrl.rewards.base import Reward, register_reward

    @register_reward("nan_for_llm_test")
    class NaNReward(Reward):
        def score(self, samples, prompts, meta):
            r = torch.ones(len(samples))
            r[1] = float("nan")
            return {self.name: r}

    grpo = ROOT / "configs/arith/grpo.yaml"
    with pytest.raises(Exception, match=r"(?i)nan|non-finite"):
        train(cfg_of(grpo, "llm.rewards={nan_for_llm_test: {weight: 1.0}}"), tmp_path / "n")
    out = tmp_path / "m"
    train(cfg_of(grpo, "llm.rewards={nan_for_llm_test: {weight: 1.0, on_error: mask}}"), out)
    row = train_rows(out)[0]
    assert row["reward/invalid"] == 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST = ["prompts_per_iter=3", "group_size=4", "llm.gen_batch=6", "iterations=1", "eval.every=100"]


def _rank_main(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from flowrl.core import compute_advantages
    from flowrl.train.llm_task import LLMTask

    acc = Accelerator(cpu=True)
    cfg = cfg_of(ROOT / "configs/arith/grpo.yaml", *DIST)
    task = LLMTask(cfg, acc)
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, rank))
    adv = compute_advantages(cfg.advantage.estimator, roll.batch.validate(), **cfg.advantage.params)
    torch.save({"adv": adv, "reward": roll.batch.outcome, "ids": roll.side.comp_ids}, Path(out) / f"adv_{rank}.pt")
    train(cfg, Path(out) / "run", accelerator=acc)


def test_two_processes_equal_one(tmp_path):
    """Groups straddle the two ranks (3 prompts x 4 samples, 6 rows each): same samples, advantages, first update."""
    import torch.multiprocessing as mp
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from flowrl.core import compute_advantages
    from flowrl.train.llm_task import LLMTask

    cfg = cfg_of(ROOT / "configs/arith/grpo.yaml", *DIST)
    task = LLMTask(cfg, Accelerator(cpu=True))
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
    adv1 = compute_advantages(cfg.advantage.estimator, roll.batch.validate(), **cfg.advantage.params)
    assert float(adv1.abs().max()) > 0, "pick a seed whose first rollout has signal"
    train(cfg, tmp_path / "one")
    two = tmp_path / "two"
    two.mkdir()
    mp.start_processes(_rank_main, args=(2, _free_port(), str(two)), nprocs=2, start_method="spawn")
    parts = [torch.load(two / f"adv_{r}.pt") for r in (0, 1)]
    T = roll.side.comp_ids.shape[1]
    pad = lambda t: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=task.pad_id)
    assert torch.equal(torch.cat([pad(p["ids"]) for p in parts]), roll.side.comp_ids)
    torch.testing.assert_close(torch.cat([p["reward"] for p in parts]), roll.batch.outcome)
    a2 = torch.cat([torch.nn.functional.pad(p["adv"], (0, T - p["adv"].shape[1])) for p in parts])
    torch.testing.assert_close(a2, adv1, atol=1e-5, rtol=0)
    w1 = load_file(str(tmp_path / "one/model/model.safetensors"))
    w2 = load_file(str(two / "run/model/model.safetensors"))
    init = {k: v for k, v in task.module.state_dict().items()}
    assert max(float((w1[k] - init[k]).abs().max()) for k in w1) > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-6, rtol=1e-4)


def test_countdown_config_runs_with_a_tiny_random_model(tmp_path):
    """configs/countdown/grpo.yaml end to end (reasoning-gym's countdown prompts and scorer, chat template, LoRA,
    from_pretrained) with a tiny random Llama and a character tokenizer saved like a hub checkpoint. A random
    model learns nothing here: this checks the plumbing, not learning."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  padding_side="left")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
    d = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "run"
    c = load(TrainConfig, ROOT / "configs/countdown/grpo.yaml",
             TINY + [f"llm.model={d}", "llm.dtype=float32", "llm.max_new_tokens=12", "minibatches=1", "llm.dataset_size=16"])
    result = train(c, out)
    assert 0.0 <= result["accuracy"] <= 1.0
    row = train_rows(out)[0]
    assert 0.0 < row["reward"] <= 1.0  # the scorer's floor is 0.01: every completion was scored
    assert (out / "lora").is_dir()


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    """Recomputing activations in the backward pass changes memory, not the update."""
    path = ROOT / "configs/arith/grpo.yaml"
    rows = []
    for gc in ("false", "true"):
        out = tmp_path / gc
        train(cfg_of(path, "iterations=1", f"gradient_checkpointing={gc}"), out)
        rows.append(train_rows(out)[0])
    assert rows[0]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-4)
    assert rows[0]["reward"] == rows[1]["reward"]
