"""A model that is neither cached nor reachable (offline, as in CI) is one sentence from `flowrl train` naming the
model and what to do, exit status 2, no traceback from inside transformers or diffusers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, config, *sets):
    args = [sys.executable, "-m", "flowrl.cli", "train", str(config), "--out", str(tmp_path / "run")]
    for s in sets:
        args += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.mark.parametrize("config,sets,model", [
    (ROOT / "configs/arith/grpo.yaml", ["llm.model=no-such-org/no-such-model", "progress=false"], "no-such-org/no-such-model"),
    (ROOT / "configs/sd3/flow_grpo_pickscore.yaml", ["flow.model_path=no-such-org/no-such-sd3", "flow.prompt_file=null",
                                                    "flow.eval_prompt_file=null", "flow.prompts=[a cat]", "progress=false"], "no-such-org/no-such-sd3"),
], ids=["llm", "sd3"])
def test_a_missing_model_is_one_sentence(tmp_path, config, sets, model):
    r = _train(tmp_path, config, *sets)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("flowrl train: ") and model in last and "local" in last, last
