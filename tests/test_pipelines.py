"""Adapters for SD3, FLUX.1 and Wan2.1: tiny real-class models saved to disk, loaded back offline through the
adapters' from_pretrained, rolled out end to end through flowrl's sampler, and checked against diffusers' own
pipeline classes (same components, same noise, ODE: the same images / video frames)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from flowrl.flow.pipeline import FlowPipeline  # noqa: E402
from flowrl.flow.sampler import recompute_log_prob, rollout, sample  # noqa: E402
from flowrl.pipelines.flux import FluxPipeline, pack_latents, unpack_latents  # noqa: E402
from flowrl.pipelines.sd3 import SD3Pipeline  # noqa: E402
from flowrl.pipelines.tiny import build_tiny_flux, build_tiny_wan  # noqa: E402
from flowrl.pipelines.wan import WanPipeline  # noqa: E402

PROMPTS = ["a photo of a cat", "a red dog on the mat"]


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return SD3Pipeline.from_pretrained(sd3_dir)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("wan"))


def assert_cfg_grad_cond_only(p, w: float) -> None:
    """flow.cfg_grad=cond_only through a real adapter: the parameter gradient of the guided velocity is w times the
    conditional branch's alone (autograd on a conditional-only call); "both" differs from it."""
    cond = p.encode_prompts(PROMPTS, cfg=True)
    x = p.initial_noise(2, generator=torch.Generator().manual_seed(4))
    sigma, probe = torch.tensor([0.7, 0.4]), torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    params = [q for q in p.transformer.parameters() if q.requires_grad]
    grad = lambda v: torch.autograd.grad((v * probe).sum(), params, allow_unused=True)
    with p.cfg_gradient("cond_only"):
        got = grad(p.velocity(x, sigma, cond, cfg_scale=w))
    want = grad(p.velocity(x, sigma, {k: c for k, c in cond.items() if not k.startswith("negative_")}))
    both = grad(p.velocity(x, sigma, cond, cfg_scale=w))
    pairs = [(g, h, b) for g, h, b in zip(got, want, both) if h is not None]
    assert len(pairs) > 0 and p.cfg_grad == "both"
    for g, h, _ in pairs:
        torch.testing.assert_close(g, w * h, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(g, b, atol=1e-5, rtol=1e-3) for g, _, b in pairs)


# ------------------------------------------------------------------------------------------------ SD3
def test_sd3_loads_offline_and_follows_protocol(sd3, sd3_dir):
    assert isinstance(sd3, FlowPipeline)
    assert {d.name for d in sd3_dir.iterdir()} >= {"transformer", "vae", "text_encoder", "text_encoder_2",
                                                    "text_encoder_3", "tokenizer", "scheduler", "model_index.json"}
    cond = sd3.encode_prompts(PROMPTS, cfg=True)
    # 77 CLIP tokens + 256 T5 tokens, joint width 32; pooled = CLIP-L (8) + CLIP-G (8)
    assert cond["prompt_embeds"].shape == (2, 77 + 256, 32)
    assert cond["pooled_prompt_embeds"].shape == (2, 16)
    assert cond["negative_prompt_embeds"].shape == (2, 333, 32)
    assert not torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    # the shift-3 schedule of FlowMatchEulerDiscreteScheduler: s*u/(1+(s-1)u) on diffusers' grid, then 0
    sig = sd3.sigmas(4)
    assert sig.shape == (5,) and sig[0] == 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
    sd3.scheduler.set_timesteps(4)
    torch.testing.assert_close(sig, sd3.scheduler.sigmas.float())
    t = torch.linspace(1.0, float(sd3.scheduler.sigma_min), 4, dtype=torch.float64)
    torch.testing.assert_close(sig[:4].double(), 3 * t / (1 + 2 * t), atol=1e-6, rtol=0)
    assert_cfg_grad_cond_only(sd3, 4.5)


def test_sd3_ode_matches_diffusers_pipeline(sd3, sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    ref.set_progress_bar_config(disable=True)
    noise = sd3.initial_noise(2, generator=torch.Generator().manual_seed(0))
    ours = sample(sd3, PROMPTS, num_steps=4, kind="ode", cfg_scale=3.0, seed=0)
    theirs = ref(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(), output_type="pt",
                 height=16, width=16).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # without CFG too (one branch)
    ours1 = sample(sd3, PROMPTS[:1], num_steps=3, kind="ode", seed=1)
    noise1 = sd3.initial_noise(1, generator=torch.Generator().manual_seed(1))
    theirs1 = ref(PROMPTS[:1], num_inference_steps=3, guidance_scale=1.0, latents=noise1, output_type="pt",
                  height=16, width=16).images
    torch.testing.assert_close(ours1, theirs1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["flow_sde", "cps"])
def test_sd3_sde_rollout_ratio_one(sd3, kind):
    traj = rollout(sd3, PROMPTS, num_steps=4, kind=kind, noise_level=0.7, cfg_scale=4.5, samples_per_prompt=2, seed=3)
    assert traj.samples.shape == (4, 3, 16, 16)
    assert traj.latents.shape == (4, 5, 4, 8, 8)
    steps = traj.sde_steps
    assert len(steps) == 3
    for k in steps.tolist():
        new = recompute_log_prob(sd3, traj, k).log_prob
        old = traj.log_probs[:, k]
        assert torch.isfinite(old).all()
        assert float((new - old).abs().max()) < 1e-5
        assert float((new - old).exp().sub(1).abs().max()) < 1e-5
    # mixed steps per row, a subset of rows
    rows = torch.tensor([3, 0, 2])
    ks = steps[torch.tensor([0, 2, 1])]
    new = recompute_log_prob(sd3, traj, ks, index=rows).log_prob
    assert float((new - traj.log_probs[rows, ks]).abs().max()) < 1e-5


def test_sd3_lora_starts_at_base_and_trains_only_adapters(sd3_dir, tmp_path):
    p = SD3Pipeline.from_pretrained(sd3_dir)
    cond = p.encode_prompts(PROMPTS)
    x = p.initial_noise(2, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.9, 0.4])
    v0 = p.velocity(x, s, cond).detach()
    p.add_lora(rank=4)
    names = [n for n, q in p.trainable.named_parameters() if q.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any(q.requires_grad for _, enc in p.clip for q in enc.parameters())
    torch.testing.assert_close(p.velocity(x, s, cond), v0)  # B = 0 at start
    # one gradient step moves the output; disabling the adapter gives back the base model (the KL reference)
    loss = p.velocity(x, s, cond).square().mean()
    loss.backward()
    with torch.no_grad():
        for n, q in p.trainable.named_parameters():
            if q.requires_grad:
                q -= 0.5 * q.grad
    assert float((p.velocity(x, s, cond) - v0).abs().max()) > 1e-4
    p.trainable.disable_adapters()
    torch.testing.assert_close(p.velocity(x, s, cond), v0)
    p.trainable.enable_adapters()
    # diffusers-format export, loadable by StableDiffusion3Pipeline.load_lora_weights
    p.save_lora(tmp_path / "lora")
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    ref.load_lora_weights(str(tmp_path / "lora"))
    v_ref = ref.transformer(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond["prompt_embeds"],
                            pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(v_ref, p.velocity(x, s, cond), atol=1e-5, rtol=0)


def test_sd3_bad_input(sd3):
    cond = sd3.encode_prompts(PROMPTS)
    x = sd3.initial_noise(2)
    with pytest.raises(ValueError, match="sigma must lie in"):
        sd3.velocity(x, torch.tensor([1.2, 0.5]), cond)
    with pytest.raises(ValueError, match="float \\[B\\]"):
        sd3.velocity(x, torch.tensor([0.2, 0.5, 0.1]), cond)
    with pytest.raises(KeyError, match="cfg=True"):
        sd3.velocity(x, torch.tensor([0.2, 0.5]), cond, cfg_scale=3.0)
    with pytest.raises(ValueError, match="must be float \\[B, 4"):
        sd3.velocity(x[:, :2], torch.tensor([0.2, 0.5]), cond)
    with pytest.raises(TypeError, match="list of strings"):
        sd3.encode_prompts("a cat")
    with pytest.raises(ValueError, match="num_steps"):
        sd3.sigmas(0)
    with pytest.raises(ValueError, match="LoRA target"):
        SD3Pipeline.add_lora(sd3, rank=2, target_modules=["nonexistent"])


def test_sd3_without_t5_pads_zeros_like_diffusers(sd3_dir):
    p = SD3Pipeline.from_pretrained(sd3_dir, load_t5=False, max_sequence_length=16)
    cond = p.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + 16, 32)
    assert float(cond["prompt_embeds"][:, 77:].abs().max()) == 0.0


def test_missing_component_is_a_clear_error(tmp_path, sd3_dir):
    import json
    import shutil

    d = tmp_path / "broken"
    shutil.copytree(sd3_dir, d)
    index = json.loads((d / "model_index.json").read_text())
    del index["transformer"]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no component 'transformer'"):
        SD3Pipeline.from_pretrained(d)


def test_adapters_load_by_registered_name(sd3_dir):
    from flowrl.pipelines.registry import load_pipeline, pipeline_names

    assert {"digits", "sd3", "flux", "wan"} <= set(pipeline_names("flow"))
    p = load_pipeline("sd3", sd3_dir, family="flow", device="cpu", dtype=torch.float32, load_t5=False)
    assert type(p) is SD3Pipeline and p.t5 is None  # options reach from_pretrained
    with pytest.raises(ValueError, match="model adapter 'flux' needs a model path"):
        load_pipeline("flux", None, family="flow", device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"unknown flow model adapter 'sdxl'; valid: \[.*'sd3'"):
        load_pipeline("sdxl", sd3_dir, family="flow")


@torch.no_grad()
def test_the_trainers_half_of_the_protocol(sd3_dir, tmp_path):
    """Forward module, other weights, LoRA off, and the weight files: what the flow trainer reaches only through
    the protocol."""
    import copy

    p = SD3Pipeline.from_pretrained(sd3_dir)
    cond = p.encode_prompts(PROMPTS)
    x = p.initial_noise(2, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.7, 0.3])
    base = p.velocity(x, s, cond)
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for DDP: forwards to the module it wraps
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            calls.append(1)
            return self.inner(*a, **k)

    p.set_forward_module(Wrapper(p.trainable))
    torch.testing.assert_close(p.velocity(x, s, cond), base)
    assert calls == [1]
    other = copy.deepcopy(p.trainable)
    for q in other.parameters():
        q.add_(0.05)
    with p.using_weights(other) as q:
        moved = q.velocity(x, s, cond)
    assert calls == [1] and float((moved - base).abs().max()) > 1e-3  # the other weights ran, unwrapped
    torch.testing.assert_close(p.velocity(x, s, cond), base)  # and everything is back, wrapper included
    assert calls == [1, 1]
    p.set_forward_module(None)
    p.save_weights(tmp_path / "w.safetensors")
    fresh = SD3Pipeline.from_pretrained(sd3_dir)
    fresh.load_weights(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        fresh.load_weights(tmp_path / "none.safetensors")
    p.add_lora(rank=2)
    for n, q in p.trainable.named_parameters():
        if "lora_B" in n:
            q.add_(0.1)
    adapted = p.velocity(x, s, cond)
    assert float((adapted - base).abs().max()) > 1e-3
    with p.lora_disabled():
        torch.testing.assert_close(p.velocity(x, s, cond), base)
    torch.testing.assert_close(p.velocity(x, s, cond), adapted)
    p.save_lora(tmp_path / "lora")
    fresh.add_lora(rank=2)
    fresh.load_lora(tmp_path / "lora")
    torch.testing.assert_close(fresh.velocity(x, s, cond), adapted, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ FLUX
def test_flux_packing_roundtrip():
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(z)
    assert packed.shape == (2, 12, 16)
    # patch (row 1, col 2), channel 3, offset (dy=1, dx=0) lives at token 1*4+2, feature 3*4 + 1*2 + 0
    assert packed[1, 6, 14] == z[1, 3, 3, 4]
    torch.testing.assert_close(unpack_latents(packed, 6, 8), z)


def test_flux_roundtrip_matches_diffusers_pipeline(flux_dir):
    from diffusers import FluxPipeline as DiffusersFlux

    p = FluxPipeline.from_pretrained(flux_dir, height=16, width=16, max_sequence_length=32, guidance_scale=3.5)
    assert isinstance(p, FlowPipeline)
    noise = p.initial_noise(2, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 16, 16)  # 8x8 latent of 4 channels -> 4x4 tokens of 16
    assert p.image_ids.shape == (16, 3) and p.image_ids[5].tolist() == [0.0, 1.0, 1.0]
    ours = sample(p, PROMPTS, num_steps=3, kind="ode", seed=0)
    ref = DiffusersFlux.from_pretrained(str(flux_dir))
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPTS, num_inference_steps=3, guidance_scale=3.5, latents=noise.clone(), output_type="pt",
                 height=16, width=16, max_sequence_length=32).images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # sigmas: FLUX's dynamic shift exp(mu) / (exp(mu) + 1/u - 1) over u = linspace(1, 1/N, N), then 0
    import math

    mu = 0.5 + (1.15 - 0.5) * (16 - 256) / (4096 - 256)
    u = torch.linspace(1, 1 / 3, 3, dtype=torch.float64)
    expect = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    torch.testing.assert_close(p.sigmas(3)[:3].double(), expect, atol=1e-6, rtol=0)
    # SDE rollout with true CFG on top of the guidance embedding: ratio 1
    traj = rollout(p, PROMPTS, num_steps=3, kind="flow_sde", cfg_scale=2.0, seed=1)
    for k in traj.sde_steps.tolist():
        assert float((recompute_log_prob(p, traj, k).log_prob - traj.log_probs[:, k]).abs().max()) < 1e-5
    assert_cfg_grad_cond_only(p, 2.0)
    p.add_lora(rank=2)
    assert all("lora_" in n for n, q in p.trainable.named_parameters() if q.requires_grad)


# ------------------------------------------------------------------------------------------------ Wan
def test_wan_video_roundtrip_matches_diffusers_pipeline(wan_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import WanPipeline as DiffusersWan

    p = WanPipeline.from_pretrained(wan_dir, height=16, width=16, num_frames=5, max_sequence_length=32)
    assert isinstance(p, FlowPipeline)
    # the UniPC flow-sigma schedule with flow_shift 3
    u = torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)[:-1]
    torch.testing.assert_close(p.sigmas(4)[:4].double(), 3 * u / (1 + 2 * u), atol=1e-6, rtol=0)
    assert p.sigmas(4)[-1] == 0
    noise = p.initial_noise(2, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4, 2, 2, 2)  # [B, C, F', H', W']: 5 frames -> 2, 16 px -> 2
    cond = p.encode_prompts(PROMPTS, cfg=True)
    assert cond["prompt_embeds"].shape == (2, 32, 32)
    # padding positions are zero (diffusers trims to the prompt length and zero-pads)
    n_tok = len(p.text[0](PROMPTS[0]).input_ids)
    assert float(cond["prompt_embeds"][0, n_tok:].abs().max()) == 0 and float(cond["prompt_embeds"][0, :n_tok].abs().max()) > 0

    # end to end through the sampler: decoded frames [B, F, 3, H, W]
    traj = rollout(p, PROMPTS, num_steps=3, kind="flow_sde", cfg_scale=5.0, seed=2)
    assert traj.samples.shape == (2, 5, 3, 16, 16)
    assert float(traj.samples.min()) >= 0 and float(traj.samples.max()) <= 1
    for k in traj.sde_steps.tolist():
        assert float((recompute_log_prob(p, traj, k).log_prob - traj.log_probs[:, k]).abs().max()) < 1e-5
    assert_cfg_grad_cond_only(p, 5.0)

    # same ODE as diffusers' WanPipeline with an Euler flow scheduler (UniPC is a multistep solver, not our step)
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    p.scheduler = euler
    ref = DiffusersWan.from_pretrained(str(wan_dir), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    ref.set_progress_bar_config(disable=True)
    ours = sample(p, PROMPTS, num_steps=3, kind="ode", cfg_scale=5.0, seed=0)
    theirs = ref(PROMPTS, negative_prompt="", num_inference_steps=3, guidance_scale=5.0, latents=noise.clone(),
                 output_type="pt", height=16, width=16, num_frames=5, max_sequence_length=32).frames
    assert ours.shape == theirs.shape == (2, 5, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_wan_bad_frames(wan_dir):
    with pytest.raises(ValueError, match="num_frames - 1"):
        WanPipeline.from_pretrained(wan_dir, height=16, width=16, num_frames=6)
