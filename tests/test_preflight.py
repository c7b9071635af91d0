"""`flowrl train --dry-run` (flowrl.train.preflight): the memory estimate's parameter, gradient, optimiser and
reference terms equal what the built task allocates (tiny SD3 / FLUX / Wan / Llama of the real classes), and the
shipped real-model configs, offline, say in one sentence which model is missing, with no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from flowrl.config import load
from flowrl.train.config import TrainConfig
from flowrl.train.preflight import MemoryEstimate, PreflightError, estimate_memory, run_preflight

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"sd3": "{}", "flux": "{height: 16, width: 16}", "wan": "{height: 16, width: 16, num_frames: 5}"}


class CPU:
    num_processes, process_index, device, is_main_process = 1, 0, torch.device("cpu"), True


def _modules(obj, seen=None) -> list[nn.Module]:
    """Every nn.Module the adapter holds (attributes, and inside lists / tuples)."""
    out = []
    for v in (vars(obj).values() if not isinstance(obj, (list, tuple)) else obj):
        if isinstance(v, nn.Module):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += _modules(v)
    return out


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _allocated(task) -> dict[str, int]:
    """What the built task holds: every parameter, the trainable ones, the reference copy, and the AdamW state
    after one step (exp_avg + exp_avg_sq of every trainable parameter)."""
    params = {id(p): p for m in _modules(task.pipe) for p in m.parameters()}
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    ref = task.reference_module
    return {"params": _bytes(params.values()), "trainable": _bytes(trainable), "gradients": _bytes(trainable),
            "optimizer": state, "reference": _bytes(ref.parameters()) if ref is not None else 0,
            "trainable_params": sum(p.numel() for p in trainable)}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    import flowrl.pipelines.tiny as tiny

    root = tmp_path_factory.mktemp("tiny")
    return {m: getattr(tiny, f"build_tiny_{m}")(root / m) for m in ("sd3", "flux", "wan")}


@pytest.mark.parametrize("model,sets", [
    ("sd3", ["lora.enabled=false", "loss.kl_beta=0.01", "flow.dtype=bfloat16"]),
    ("sd3", ["lora.enabled=true", "lora.rank=3", "flow.dtype=bfloat16", "ema.enabled=true", "loss.kl_beta=0.01"]),
    ("flux", ["lora.enabled=true", "lora.rank=2"]),
    ("wan", ["lora.enabled=false", "loss.kl_beta=0.01"]),
], ids=["sd3-full-bf16-ref", "sd3-lora-bf16-ema-kl", "flux-lora", "wan-full-ref"])
def test_estimate_equals_what_the_task_allocates(tiny_dirs, model, sets):
    from flowrl.train.flow_task import FlowTask

    cfg = load(TrainConfig, None, [f"flow.model={model}", f"flow.model_path={tiny_dirs[model]}",
                                   f"flow.model_kwargs={SMALL[model]}", "flow.prompts=[a cat]",
                                   "flow.rewards={jpeg_compressibility: {weight: 1.0}}", "prompts_per_iter=2",
                                   "group_size=2", "progress=false", "trackers=[]", *sets])
    est = estimate_memory(cfg)
    assert isinstance(est, MemoryEstimate) and est.complete, est.notes
    got = _allocated(FlowTask(cfg, CPU()))
    want = {k: getattr(est, k) for k in got}
    assert want == got
    assert est.ema == (est.trainable if cfg.ema.enabled else 0)
    assert est.activations > 0 and est.total == (est.params + est.gradients + est.optimizer + est.reference
                                                 + est.ema + est.activations)
    assert sum(c.bytes for c in est.components) == est.params - (est.trainable if cfg.lora.enabled else 0)


def test_llm_estimate_counts_the_model_and_peft_all_linear_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(str(d))
    cfg = load(TrainConfig, ROOT / "configs/arith/grpo.yaml", [f"llm.model={d}", "lora.enabled=true", "lora.rank=4",
                                                               "llm.dtype=bfloat16"])
    est = estimate_memory(cfg)
    model = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)
    base = _bytes(model.parameters())
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora = [p for p in peft.parameters() if p.requires_grad]
    assert est.trainable_params == sum(p.numel() for p in lora) and est.trainable == _bytes(lora)  # fp32 adapters
    assert est.params == base + _bytes(lora) and est.optimizer == 2 * est.trainable and est.reference == 0


def test_dry_run_with_a_local_model_prints_the_table_and_exits_0(tiny_dirs, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load(TrainConfig, ROOT / "configs/sd3/flow_grpo_pickscore.yaml",
               [f"flow.model_path={tiny_dirs['sd3']}", "flow.rewards={jpeg_compressibility: {weight: 1.0}}"])
    rc, failures = run_preflight(cfg, "sd3.yaml")
    out = capsys.readouterr().out
    assert (rc, failures) == (0, [])
    for text in ("flow.model=sd3 (registered)", "216 training", "50 evaluation", "transformer", "optimiser state", "activations (rough)", "total"):
        assert text in out, out


def test_hub_answers_become_one_sentence(monkeypatch):
    """Online, not cached: a gated model, an unknown id and an unreachable hub each name the model and the fix."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cfg = load(TrainConfig, None, ["flow.model=sd3", "flow.model_path=some-org/some-model", "flow.prompts=[a cat]"])
    for name, words in (("GatedRepoError", "is gated: accept its license"), ("RepositoryNotFoundError", "is not on"),
                        ("ConnectTimeout", "the hub is not reachable")):
        err = type(name, (Exception,), {})

        def info(self, *a, _e=err, **k):
            raise _e("refused")

        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", info)
        with pytest.raises(PreflightError) as e:
            estimate_memory(cfg)
        msg = str(e.value)
        assert words in msg and "'some-org/some-model'" in msg and "flow.model_path" in msg and "\n" not in msg, msg
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: type("I", (), {"gated": False})())
    est = estimate_memory(cfg)  # on the hub, not cached: no config to read, said so
    assert not est.complete and "on the hub" in est.notes[0]


CODE = """
import contextlib, io, json, sys
from flowrl.cli import main
out = {}
for c in sys.argv[1:]:
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = main(["train", c, "--dry-run"])
    out[c] = [rc, o.getvalue(), e.getvalue()]
print(json.dumps(out))
"""


def test_shipped_configs_offline_say_which_model_is_missing():
    configs = ["configs/sd3/flow_grpo_pickscore.yaml", "configs/flux/dance_grpo_hps.yaml", "configs/wan/flow_grpo.yaml"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(ROOT / ".no-such-hf-home"))
    r = subprocess.run([sys.executable, "-c", CODE, *configs], capture_output=True, text=True, timeout=300, env=env,
                       cwd=ROOT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for c in configs:
        rc, out, err = res[c]
        model = yaml.safe_load((ROOT / c).read_text())["flow"]["model_path"]
        assert rc == 2 and "Traceback" not in err, err
        assert "  ok    data " in out and "  FAIL  model" in out, (c, out, err)
        lines = err.strip().splitlines()
        assert all(line.startswith("flowrl train --dry-run: ") for line in lines), err
        sentence = [line for line in lines if f"flow.model_path={model!r}" in line]
        assert len(sentence) == 1 and "HF_HUB_OFFLINE=1" in sentence[0] and "huggingface-cli" in sentence[0], err
