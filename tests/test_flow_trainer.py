"""The flow trainer on tiny stand-in models: every algorithm runs, resume equals an uninterrupted run, two
processes equal one, the LoRA exports in diffusers' format, and bad input fails before any compute."""
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.config import ConfigError, load
from flowrl.train.checkpoint import CheckpointError
from flowrl.train.config import TrainConfig
from flowrl.train.loop import train
from flowrl.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(model_dir, *overrides, model="sd3"):
    base = [f"flow.model={model}", f"flow.model_path={model_dir}", "flow.prompts=[a red cube, a blue ball]",
            "flow.rewards={jpeg_compressibility: {weight: 1.0}}", "iterations=2", "prompts_per_iter=2",
            "group_size=4", "flow.num_steps=4", "eval.every=1", "eval.num_per_prompt=2", "eval.grid_per_prompt=2",
            "progress=false", "trackers=[]", "optim.lr=1e-3"]
    return load(TrainConfig, None, base + list(overrides))


ALGOS = {
    "flow_grpo": ["loss.kl_beta=0.01"],
    "dance_grpo": ["algorithm=dance_grpo", "flow.kind=dance_sde", "flow.noise_level=0.3",
                   "flow.same_noise_per_prompt=true", "flow.timestep_fraction=0.6", "advantage.estimator=gdpo"],
    "tp_grpo": ["algorithm=tp_grpo", "flow.kind=cps", "advantage.estimator=tp_grpo"],
    "ac_flow": ["algorithm=ac_flow", "flow.critic.warmup_iters=1", "flow.critic.width=8"],
}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_each_algorithm_runs_and_writes_its_outputs(sd3_dir, tmp_path, algo):
    out = tmp_path / "run"
    result = train(tiny_cfg(sd3_dir, *ALGOS[algo]), out)
    assert set(result) >= {"reward", "jpeg_compressibility"}
    rows = read_metrics(out)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 1, 2]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 2 and all(torch.isfinite(torch.tensor(r["reward"])) for r in train_rows)
    for f in ("metrics.jsonl", "report.md", "curves.png", "config.yaml", "transformer/diffusion_pytorch_model.safetensors",
              "samples/step_00002.png"):
        assert (out / f).exists(), f
    if algo == "ac_flow":
        assert {"critic/loss", "acflow/fm", "acflow/w2"} <= set(train_rows[-1])
    else:
        assert train_rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy: recompute == sampler


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(sd3_dir, tmp_path):
    full = tmp_path / "full"
    train(tiny_cfg(sd3_dir, "iterations=3", "save_every=1"), full)
    part = tmp_path / "part"
    train(tiny_cfg(sd3_dir, "iterations=1", "save_every=1"), part)  # "killed" after step 1
    train(tiny_cfg(sd3_dir, "iterations=3", "save_every=1"), part, resume=True)
    a, b = read_metrics(full), read_metrics(part)
    keys = ("step", "split", "reward", "policy/ratio_mean", "grad_norm")
    strip = lambda rows: [{k: r[k] for k in keys if k in r} for r in rows]
    assert strip(a) == strip(b)
    wa, wb = (load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors")) for d in (full, part))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_another_config_and_a_used_directory(sd3_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(sd3_dir, "iterations=1"), out)
    with pytest.raises(CheckpointError, match="different config"):
        train(tiny_cfg(sd3_dir, "iterations=2", "optim.lr=5e-4"), out, resume=True)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(tiny_cfg(sd3_dir, "iterations=1"), out)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_cfg(sd3_dir), tmp_path / "empty", resume=True)


def test_lora_run_exports_diffusers_lora(sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from flowrl.pipelines.sd3 import SD3Pipeline

    out = tmp_path / "run"
    train(tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=4", "iterations=1", "optim.lr=1e-2"), out)
    assert (out / "lora").is_dir()
    ours = SD3Pipeline.from_pretrained(str(sd3_dir))
    cond = ours.encode_prompts(["a red cube"])
    x = ours.initial_noise(1, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.7])
    base = ours.velocity(x, s, cond)
    ref = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    ref.load_lora_weights(str(out / "lora"))
    v = ref.transformer(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    assert float((v - base).abs().max()) > 1e-6  # the trained adapter changes the model ...
    ours.add_lora(rank=4)
    ours.trainable.load_lora_adapter(str(out / "lora"), weight_name="pytorch_lora_weights.safetensors",
                                     prefix="transformer", adapter_name="trained")
    ours.trainable.set_adapters("trained")
    torch.testing.assert_close(ours.velocity(x, s, cond), v, atol=1e-5, rtol=0)  # ... and reloads exactly


def test_bad_input_fails_before_compute(sd3_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key.*'flow.num_stepz'"):
        tiny_cfg(sd3_dir, "flow.num_stepz=3")
    with pytest.raises(ConfigError, match="flow.num_steps: expected an int"):
        tiny_cfg(sd3_dir, "flow.num_steps=many")
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        train(tiny_cfg(sd3_dir, f"flow.prompt_file={empty}"), tmp_path / "a")
    with pytest.raises(ValueError, match="needs flow.process_reward"):
        train(tiny_cfg(sd3_dir, "algorithm=euphonium"), tmp_path / "b")
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        from flowrl.train.flow_task import FlowTask

        class TwoRanks:
            num_processes, process_index, device, is_main_process = 2, 0, torch.device("cpu"), True

        FlowTask(tiny_cfg(sd3_dir, "prompts_per_iter=1", "group_size=3"), TwoRanks())
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_nan_reward_is_a_clear_error(sd3_dir, tmp_path, monkeypatch):
    from flowrl.rewards.base import Reward, register_reward

    @register_reward("nan_for_test")
    class NaNReward(Reward):
        def score(self, samples, prompts, meta):
            r = torch.zeros(samples.shape[0])
            r[1] = float("nan")
            return {self.name: r}

    with pytest.raises(Exception, match=r"(?i)nan|non-finite"):
        train(tiny_cfg(sd3_dir, "flow.rewards={nan_for_test: {weight: 1.0}}", "iterations=1"), tmp_path / "n")
    # with on_error: mask, the sample is masked and counted instead
    out = tmp_path / "m"
    train(tiny_cfg(sd3_dir, "flow.rewards={nan_for_test: {weight: 1.0, on_error: mask}}", "iterations=1"), out)
    row = [r for r in read_metrics(out) if r["split"] == "train"][0]
    assert row["reward/invalid"] == 1.0  # sample 1 of the rollout's 8 is masked and counted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    from flowrl.core import compute_advantages
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    acc = Accelerator(cpu=True)
    cfg = tiny_cfg(model_dir, "iterations=1", "eval.every=100")
    task = FlowTask(cfg, acc)
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, rank))
    adv = compute_advantages(cfg.advantage.estimator, roll.batch.validate(), **cfg.advantage.params)
    torch.save({"adv": adv, "reward": roll.batch.outcome}, Path(out) / f"adv_{rank}.pt")
    train(cfg, Path(out) / "run", accelerator=acc)


def test_two_processes_equal_one(sd3_dir, tmp_path):
    import torch.multiprocessing as mp

    from accelerate import Accelerator

    from flowrl.core import compute_advantages
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    one = tmp_path / "one"
    one.mkdir()
    cfg = tiny_cfg(sd3_dir, "iterations=1", "eval.every=100")
    task = FlowTask(cfg, Accelerator(cpu=True))
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
    adv1 = compute_advantages(cfg.advantage.estimator, roll.batch.validate(), **cfg.advantage.params)
    train(cfg, one / "run")

    two = tmp_path / "two"
    two.mkdir()
    mp.start_processes(_rank_main, args=(2, _free_port(), str(sd3_dir), str(two)), nprocs=2, start_method="spawn")
    parts = [torch.load(two / f"adv_{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(torch.cat([p["reward"] for p in parts]), roll.batch.outcome)
    torch.testing.assert_close(torch.cat([p["adv"] for p in parts]), adv1, atol=1e-5, rtol=0)
    w1, w2 = (load_file(str(d / "run" / "transformer" / "diffusion_pytorch_model.safetensors")) for d in (one, two))
    moved = max(float((w1[k] - task.module.state_dict()[k]).abs().max()) for k in w1)
    assert moved > 0  # the first update did something ...
    for k in w1:  # ... and the same thing on two processes
        torch.testing.assert_close(w2[k], w1[k], atol=2e-6, rtol=1e-4)


SMALL = {"sd3": "{}", "flux": "{height: 16, width: 16}", "wan": "{height: 16, width: 16, num_frames: 5}"}
DIFFUSERS_PIPELINE = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "wan": "WanPipeline"}
DIFFUSERS_TRANSFORMER = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel", "wan": "WanTransformer3DModel"}


@pytest.mark.parametrize("model,builder", [("sd3", "build_tiny_sd3"), ("flux", "build_tiny_flux"), ("wan", "build_tiny_wan")])
def test_published_configs_run_two_iterations_with_tiny_stand_ins(model, builder, tmp_path, monkeypatch):
    """The anchors' published settings (configs/<model>/*.yaml) with tiny models of the same classes, on the
    prompt files they ship (data/): only the model path, the sizes, the batch, the reward (model-free JPEG) and
    the precision (CPU) are overridden; the export each writes must load in diffusers."""
    import diffusers

    import flowrl.pipelines.tiny as tiny
    from flowrl.train.flow_data import load_prompt_sets

    monkeypatch.chdir(ROOT)  # the configs name their prompt files relative to the repository root

    d = getattr(tiny, builder)(tmp_path / "model")
    files = sorted((ROOT / "configs" / model).glob("*.yaml"))
    assert files, f"no configs/{model}/*.yaml"
    rewards = ("{video_frames: {weight: 1.0, image: jpeg_compressibility}}" if model == "wan"
               else "{jpeg_compressibility: {weight: 1.0}}")
    for f in files:
        cfg = load(TrainConfig, f, [f"flow.model_path={d}", f"flow.model_kwargs={SMALL[model]}", "iterations=2",
                                    "prompts_per_iter=2", "group_size=2", "minibatches=1", "flow.num_steps=3",
                                    "flow.eval_num_steps=3", "flow.sde_window=null", "eval.every=100",
                                    "eval.num_per_prompt=1", "eval.grid_per_prompt=1", f"flow.rewards={rewards}",
                                    "advantage.params={}", "progress=false", "trackers=[]", "flow.dtype=float32",
                                    "mixed_precision=no", "flow.eval_size=2"])
        assert cfg.flow.prompt_file and cfg.flow.eval_prompt_file, f"{f.name} ships no prompt files"
        train_set, eval_set = load_prompt_sets(cfg)
        assert len(train_set) >= 100 and len(eval_set) == 2
        assert not set(train_set.prompts) & set(eval_set.prompts)  # the evaluation prompts are held out
        out = tmp_path / f.stem
        train(cfg, out)
        rows = [r for r in read_metrics(out) if r["split"] == "train"]
        assert len(rows) == 2 and all(r["grad_norm"] > 0.0 for r in rows)
        # the export is something diffusers itself loads: a LoRA into the model's diffusers pipeline, or the full
        # fine-tune's transformer folder with from_pretrained
        if cfg.lora.enabled:
            pipe = getattr(diffusers, DIFFUSERS_PIPELINE[model]).from_pretrained(str(d))
            pipe.load_lora_weights(str(out / "lora"))
            assert pipe.transformer.peft_config, f"{f.name}: no adapter attached from {out / 'lora'}"
        else:
            t = getattr(diffusers, DIFFUSERS_TRANSFORMER[model]).from_pretrained(str(out / "transformer"))
            assert sum(p.numel() for p in t.parameters()) > 0


def test_micro_batches_and_step_chunks_accumulate_the_same_gradient(sd3_dir):
    """Gradient accumulation over chunks of samples and of denoising steps equals one pass over the minibatch;
    gradient checkpointing changes nothing but memory."""
    from accelerate import Accelerator

    from flowrl.core import compute_advantages
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    def grads(*overrides):
        cfg = tiny_cfg(sd3_dir, "loss.kl_beta=0.01", *overrides)
        task = FlowTask(cfg, Accelerator(cpu=True))
        roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
        batch = roll.batch.validate()
        adv = compute_advantages(cfg.advantage.estimator, batch, **cfg.advantage.params)
        # a perturbed policy, so that the ratio and the KL have gradients of their own
        with torch.no_grad():
            for p in task.module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        task.backward(roll, torch.arange(batch.batch_size), batch, adv, 0)
        return {n: p.grad.clone() for n, p in task.module.named_parameters() if p.grad is not None}

    whole = grads()
    for extra in (["flow.micro_batch=3"], ["flow.steps_per_backward=1"], ["flow.micro_batch=5", "flow.steps_per_backward=2"],
                  ["gradient_checkpointing=true"]):
        chunked = grads(*extra)
        assert chunked.keys() == whole.keys()
        for n in whole:
            torch.testing.assert_close(chunked[n], whole[n], atol=1e-6, rtol=1e-4, msg=f"{extra}: {n}")
