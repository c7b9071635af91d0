"""scripts/gpu_smoke.py --tiny: one iteration of each shipped real-model recipe (SD3, FLUX, Wan, countdown LLM) on
tiny random models of the same classes, on the CPU; and the architectures it builds for the GPU are the published
ones (parameter counts of the real checkpoints, counted on the meta device)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_smoke_runs_every_recipe_and_reports_its_phases():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--tiny"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    for model, recipe in (("sd3", "configs/sd3/flow_grpo_pickscore.yaml"), ("flux", "configs/flux/dance_grpo_hps.yaml"),
                          ("wan", "configs/wan/flow_grpo.yaml"), ("qwen", "configs/countdown/grpo.yaml")):
        block = out[out.index(f"== {model}:"):]
        assert f"recipe {recipe}" in block
        m = re.search(r"rollout ([0-9.]+) s \| reward ([0-9.]+) s \| update ([0-9.]+) s", block)
        assert m and float(m.group(1)) > 0 and float(m.group(3)) > 0, block[:2000]
        row = re.search(rf"^\| {model} \| 1x4 \|.*\| ([0-9.]+ MiB) \|$", out, re.M)  # the estimator's figure
        assert row, out[-2000:]
    # learned rewards are not cached here: the stand-in is announced under the recipe's own reward names
    assert "reward: STAND-IN smoke_standin (mean brightness) under the recipe's names ['pickscore']" in out
    assert "under the recipe's names ['clip', 'hpsv2']" in out
    assert "reward: the recipe's own (a rule, no weights)" in out


@pytest.mark.parametrize("model,cls,component,billions", [
    ("sd3", "SD3Transformer2DModel", "transformer", (2.2, 2.6)),   # SD3.5-medium: 2.5B
    ("flux", "FluxTransformer2DModel", "transformer", (11.8, 12.0)),  # FLUX.1-dev: 11.9B
    ("wan", "WanTransformer3DModel", "transformer", (1.3, 1.5)),   # Wan2.1-T2V-1.3B: 1.4B
])
def test_published_architectures_have_the_published_sizes(model, cls, component, billions):
    import diffusers
    from accelerate import init_empty_weights

    spec = json.loads((ROOT / "scripts" / "smoke_archs.json").read_text())[model][component]
    with init_empty_weights():
        m = getattr(diffusers, cls)(**spec)
    n = sum(p.numel() for p in m.parameters()) / 1e9
    assert billions[0] <= n <= billions[1], n


def test_published_llm_has_qwen25_05b_size():
    from accelerate import init_empty_weights
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = json.loads((ROOT / "scripts" / "smoke_archs.json").read_text())["qwen"]["model"]
    with init_empty_weights():
        m = Qwen2ForCausalLM(Qwen2Config(**spec))
    m.tie_weights()  # as from_pretrained does (tie_word_embeddings)
    assert 0.49 <= sum(p.numel() for p in m.parameters()) / 1e9 <= 0.50  # 494M (tied embeddings)
