"""What a run leaves behind, on the tiny SD3 stand-in: the LoRA export holds the EMA weights that the last
evaluation measured (``ema.every`` honoured) and loads into a fresh diffusers pipeline; a full fine-tune is
written in diffusers' ``save_pretrained`` layout and loads with ``from_pretrained``; ``lora.init_from`` starts a
run from an existing diffusers or peft LoRA (and refuses one that does not fit); ``export.push_to_hub`` stages the
export with a model card and uploads it (the hub client is a stand-in: no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flowrl.config import ConfigError, load
from flowrl.train.config import TrainConfig
from flowrl.train.loop import train


def tiny_cfg(model_dir, *overrides):
    base = ["flow.model=sd3", f"flow.model_path={model_dir}", "flow.prompts=[a red cube, a blue ball]",
            "flow.rewards={jpeg_compressibility: {weight: 1.0}}", "iterations=2", "prompts_per_iter=2",
            "group_size=4", "flow.num_steps=3", "eval.every=100", "eval.num_per_prompt=1", "eval.grid_per_prompt=1",
            "progress=false", "trackers=[]", "optim.lr=1e-2", "save_every=1"]
    return load(TrainConfig, None, base + list(overrides))


class FakeHub:
    """Records the calls ``push_to_hub`` makes on a ``huggingface_hub.HfApi``."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        FakeHub.calls.append(("upload_folder", kw))
        return type("Commit", (), {"commit_url": f"https://hub.invalid/{kw['repo_id']}/commit/1"})()


@pytest.fixture(scope="module")
def lora_run(sd3_dir, tmp_path_factory):
    """LoRA + EMA (decay 0.5, every 2nd optimiser step) for 2 iterations, pushed to a stand-in hub."""
    import huggingface_hub

    out = tmp_path_factory.mktemp("lora") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    try:
        train(tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "ema.enabled=true",
                       "ema.decay=0.5", "ema.every=2", "export.push_to_hub=me/tiny-sd3-lora"), out)
    finally:
        mp.undo()
    return out, list(FakeHub.calls)


def _ckpt(out: Path, step: int):
    d = out / "checkpoints" / f"step_{step:06d}"
    return load_file(str(d / "model.safetensors")), torch.load(d / "trainer.pt", weights_only=True)


def test_lora_export_is_the_ema_and_ema_every_counts_optimiser_steps(lora_run, sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    from flowrl.pipelines.sd3 import SD3Pipeline

    out, _ = lora_run
    w1, t1 = _ckpt(out, 1)
    w2, t2 = _ckpt(out, 2)
    fresh = SD3Pipeline.from_pretrained(str(sd3_dir))
    fresh.add_lora(rank=4, alpha=8)
    # the trained parameters in the optimiser's (and the EMA's) order; safetensors files sort their keys
    names = [k for k, p in fresh.trainable.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(w1)
    # ema.every=2: after the first optimiser step the shadow is still the initial LoRA (B = 0), not the weights
    b = [(i, k) for i, k in enumerate(names) if "lora_B" in k]
    assert max(float(w1[k].abs().max()) for _, k in b) > 1e-3
    assert max(float(t1["ema"][f"shadow.{i}"].abs().max()) for i, _ in b) == 0.0
    # after the second it moved half-way (decay 0.5) from the initial LoRA to the weights
    for i, k in enumerate(names):
        if "lora_B" in k:
            torch.testing.assert_close(t2["ema"][f"shadow.{i}"], 0.5 * w2[k], atol=1e-7, rtol=1e-6)
    # the export holds the EMA, not the last weights: loaded into a fresh diffusers pipeline it reproduces it
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    pipe.load_lora_weights(str(out / "lora"), adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert set(loaded) == {k.replace(".default", "") for k in names}
    for i, k in enumerate(names):
        ema = t2["ema"][f"shadow.{i}"]
        torch.testing.assert_close(loaded[k.replace(".default", "")], ema, atol=0, rtol=0)
    assert max(float((loaded[k.replace(".default", "")] - w2[k]).abs().max()) for _, k in b) > 1e-3


def test_push_to_hub_stages_the_export_with_a_card(lora_run):
    out, calls = lora_run
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == "me/tiny-sd3-lora" and calls[0][2]["private"] is True
    up = calls[1][1]
    hub = Path(up["folder_path"])
    assert up["repo_id"] == "me/tiny-sd3-lora" and hub == out / "hub"
    assert (hub / "pytorch_lora_weights.safetensors").read_bytes() == (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    card = (hub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "- lora" in card
    assert 'pipe.load_lora_weights("me/tiny-sd3-lora")' in card
    assert "| metric | before (step 0) | after (step 2) | change |" in card  # the report's table
    grids = sorted(p.name for p in (hub / "samples").iterdir())
    assert grids == ["step_00000.png", "step_00002.png"]
    assert "![before](samples/step_00000.png)" in card and "![after](samples/step_00002.png)" in card


def test_full_fine_tune_export_loads_with_from_pretrained(sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    out = tmp_path / "full"
    train(tiny_cfg(sd3_dir, "iterations=1"), out)
    w, _ = _ckpt(out, 1)
    t = SD3Transformer2DModel.from_pretrained(str(out / "transformer"))
    base = SD3Transformer2DModel.from_pretrained(str(sd3_dir), subfolder="transformer")
    sd, sd0 = t.state_dict(), base.state_dict()
    assert set(w) <= set(sd) and len(w) > 10  # every trained tensor (the state dict adds buffers)
    assert all(torch.equal(sd[k], w[k]) for k in w)
    assert max(float((sd[k] - sd0[k]).abs().max()) for k in w) > 1e-5  # the trained weights, not the base
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), transformer=t)
    assert pipe.transformer is t


def test_lora_init_from_starts_at_the_given_adapter(lora_run, sd3_dir, tmp_path):
    from accelerate import Accelerator
    from peft.utils import get_peft_model_state_dict

    from flowrl.train.flow_task import FlowTask

    out, _ = lora_run
    exported = {k.removeprefix("transformer."): v
                for k, v in load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")).items()}
    # a peft-format copy of the same adapter (adapter_model.safetensors + adapter_config.json)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{k}": v for k, v in exported.items()}, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8.0, "peft_type": "LORA"}))
    for src in (out / "lora", peft_dir):
        cfg = tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=4", "lora.alpha=8", f"lora.init_from={src}")
        task = FlowTask(cfg, Accelerator(cpu=True))
        now = get_peft_model_state_dict(task.module)
        assert set(now) == set(exported)
        for k in now:
            torch.testing.assert_close(now[k], exported[k], atol=0, rtol=0)

    with pytest.raises(ValueError, match=r"set lora.rank"):
        FlowTask(tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=8", "lora.alpha=8", f"lora.init_from={peft_dir}"),
                 Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"lora_alpha=8.0.*set lora.alpha=8.0"):
        FlowTask(tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=4", "lora.alpha=4", f"lora.init_from={out / 'lora'}"),
                 Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"does not match the model's LoRA"):
        FlowTask(tiny_cfg(sd3_dir, "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.target_modules=[to_q]",
                          f"lora.init_from={peft_dir}"), Accelerator(cpu=True))
    with pytest.raises(ConfigError, match=r"lora.init_from.*no LoRA there"):
        tiny_cfg(sd3_dir, "lora.enabled=true", f"lora.init_from={tmp_path / 'nothing'}")
    with pytest.raises(ConfigError, match=r"lora.init_from.*lora.enabled=true"):
        tiny_cfg(sd3_dir, f"lora.init_from={peft_dir}")
    with pytest.raises(ConfigError, match=r"export.push_to_hub.*user/name"):
        tiny_cfg(sd3_dir, "export.push_to_hub=not a repo")
