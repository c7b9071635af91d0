"""Memory knobs of the real-model path: rollout micro-batches (flow.sample_batch), chunked VAE decode
(flow.decode_batch), chunked evaluation shared out over ranks (eval.batch_size), LoRA in fp32 over a bf16 base,
the optimiser registry (adamw_8bit) and gradient checkpointing under LoRA. Each knob must change memory only."""
import pytest
import torch

from flowrl.config import load
from flowrl.train.config import TrainConfig


def tiny_cfg(model_dir, *overrides):
    base = ["flow.model=sd3", f"flow.model_path={model_dir}", "flow.prompts=[a red cube, a blue ball, a cat]",
            "flow.rewards={jpeg_compressibility: {weight: 1.0}}", "iterations=1", "prompts_per_iter=3",
            "group_size=3", "flow.num_steps=3", "eval.num_per_prompt=3", "eval.grid_per_prompt=2",
            "progress=false", "trackers=[]", "flow.cfg_scale=2.0"]
    return load(TrainConfig, None, base + list(overrides))


def task_of(cfg):
    from accelerate import Accelerator

    from flowrl.train.flow_task import FlowTask

    torch.manual_seed(cfg.seed)  # LoRA's initial A draws from the global generator (train() seeds it the same way)
    return FlowTask(cfg, Accelerator(cpu=True))


def test_rollout_micro_batches_and_chunked_decode_sample_what_one_call_samples(sd3_dir):
    from flowrl.train.task import iteration_generator

    def roll(*overrides):
        cfg = tiny_cfg(sd3_dir, *overrides)
        task = task_of(cfg)
        calls = []
        vae_decode = task.pipe.vae.decode
        task.pipe.vae.decode = lambda z, **kw: (calls.append(z.shape[0]), vae_decode(z, **kw))[1]
        return task.rollout(0, iteration_generator(cfg.seed, 0, 0)), calls

    whole, calls = roll()
    assert calls == [9]
    for extra, want in ((["flow.sample_batch=4", "flow.decode_batch=3"], [3, 1, 3, 1, 1]),):
        chunked, calls = roll(*extra)
        assert calls == want, extra  # the knob really cut the batch
        a, b = whole.side["traj"], chunked.side["traj"]
        torch.testing.assert_close(b.latents, a.latents, atol=1e-6, rtol=1e-5, msg=str(extra))
        torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-6, rtol=1e-5, equal_nan=True, msg=str(extra))
        torch.testing.assert_close(b.samples, a.samples, atol=1e-6, rtol=1e-5, msg=str(extra))
        assert torch.equal(b.group, a.group) and b.prompts == a.prompts
        assert set(b.cond) == set(a.cond) and all(torch.equal(b.cond[k], a.cond[k]) for k in a.cond)


def test_eval_chunks_and_their_share_per_rank():
    from flowrl.train.flow_eval import eval_chunks, rank_chunks

    assert eval_chunks(10, 0, 1) == [(0, 10)]
    assert eval_chunks(10, 0, 3) == [(0, 4), (4, 8), (8, 10)]
    chunks = eval_chunks(10, 4, 2)
    assert chunks == [(0, 4), (4, 8), (8, 10)]
    assert rank_chunks(chunks, 0, 2) == [(0, True), (2, True)]
    assert rank_chunks(chunks, 1, 2) == [(1, True), (0, False)]  # the same number of sampler calls on every rank
    assert rank_chunks(eval_chunks(2, 0, 4), 3, 4) == [(1, False)]


def test_evaluation_default_is_one_call_and_ranks_share_the_chunks(sd3_dir, monkeypatch):
    """eval.batch_size 0 on one process is the unchunked sampler call; with a batch size, two ranks' chunks are
    exactly the one-process chunks (the same seeds), so the gathered metrics do not depend on the rank count."""
    import flowrl.train.flow_eval as fe
    from flowrl.flow.sampler import sample

    task = task_of(tiny_cfg(sd3_dir))
    kw = dict(num_steps=3, kind="flow_sde", noise_level=0.7, cfg_scale=2.0)
    m = task._evaluate(3, 1234, None, kw)
    imgs = sample(task.pipe, task.eval_prompts, samples_per_prompt=3, seed=1234, **kw)
    outcome, _, valid, metrics = task.reward.score(imgs, [p for p in task.eval_prompts for _ in range(3)])
    assert m["reward"] == float(outcome[valid].mean()) and m["jpeg_compressibility"] == metrics["reward/jpeg_compressibility"]

    sampler = task._eval_sampler(None, kw)
    one = fe.scored_eval_parts(sampler, task.reward, task.eval_prompts, 3, 1234, batch_size=2, rank=0, world=1)
    assert one["jpeg_compressibility"].shape == (9,)
    assert not torch.allclose(one["jpeg_compressibility"], outcome)  # chunks have their own seeds
    monkeypatch.setattr(fe, "gather_parts", lambda parts, world: parts)  # each rank's own rows
    ranks = [fe.scored_eval_parts(sampler, task.reward, task.eval_prompts, 3, 1234, batch_size=2, rank=r, world=2)
             for r in (0, 1)]
    assert [len(p["jpeg_compressibility"]) for p in ranks] == [5, 4]  # chunks of 2, 2, 1 | 2, 2 rows (+ a spare, dropped)
    both = torch.cat([p["jpeg_compressibility"] for p in ranks])
    torch.testing.assert_close(both.sort().values, one["jpeg_compressibility"].sort().values, atol=1e-6, rtol=0)


def test_lora_trains_in_fp32_over_a_bf16_base(sd3_dir):
    task = task_of(tiny_cfg(sd3_dir, "flow.dtype=bfloat16", "lora.enabled=true", "lora.rank=2"))
    named = dict(task.module.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for n, p in named.items() if not p.requires_grad} == {torch.bfloat16}
    # a forward and backward through the mixed layers give fp32 gradients
    from flowrl.train.task import iteration_generator

    roll = task.rollout(0, iteration_generator(0, 0, 0))
    assert torch.isfinite(roll.batch.old_logp).all()
    from flowrl.pipelines.lora import upcast_trainable

    assert upcast_trainable(task.module) == 0  # nothing left to cast


def test_optimiser_registry_and_the_8bit_option_without_bitsandbytes(sd3_dir):
    import importlib.util

    from flowrl.train.optim import build_optimizer

    with pytest.raises(ValueError, match=r"optim.name='adam_w': unknown optimiser; valid: \['adamw', 'adamw_8bit'\]"):
        load(TrainConfig, None, ["optim.name=adam_w"])
    cfg = load(TrainConfig, None, ["optim.lr=0.003", "optim.betas=[0.8, 0.9]", "optim.weight_decay=0.1"])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optim)
    assert type(opt) is torch.optim.AdamW
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == (0.003, (0.8, 0.9), 0.1)
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: the missing-package message cannot be shown")
    msg = ("optim.name='adamw_8bit' needs the package 'bitsandbytes', which is not installed: `pip install "
           "bitsandbytes` (a CUDA machine), or use optim.name=adamw")
    with pytest.raises(ValueError) as e:
        load(TrainConfig, None, ["optim.name=adamw_8bit"])
    assert msg in str(e.value)
    cfg.optim.name = "adamw_8bit"  # a config built past the check still fails with the same sentence
    with pytest.raises(ValueError, match="needs the package 'bitsandbytes'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg.optim)


def test_gradient_checkpointing_under_lora_gives_the_same_gradients(sd3_dir):
    from flowrl.core import compute_advantages
    from flowrl.train.task import iteration_generator

    def grads(*overrides):
        cfg = tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=2", "loss.kl_beta=0.01", *overrides)
        task = task_of(cfg)
        roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
        batch = roll.batch.validate()
        adv = compute_advantages(cfg.advantage.estimator, batch, **cfg.advantage.params)
        with torch.no_grad():  # move off the reference so that the ratio and KL have gradients
            for p in task.module.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        task.backward(roll, torch.arange(batch.batch_size), batch, adv, 0)
        return task, {n: p.grad.clone() for n, p in task.module.named_parameters() if p.grad is not None}

    _, plain = grads()
    task, ckpt = grads("gradient_checkpointing=true")
    assert task.pipe.transformer.is_gradient_checkpointing
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    assert max(float(g.abs().max()) for g in plain.values()) > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-4, msg=n)
