"""The `flowrl` command: version, config help, sampling, evaluation of a run, clear errors."""
import subprocess
import sys

import pytest
from PIL import Image

from flowrl.cli import main


def test_version_and_help_config(capsys):
    assert main(["version"]) == 0
    assert "flowrl 0.1.0" in capsys.readouterr().out
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "flow.kind (flow_sde | dance_sde | cps, default 'flow_sde')" in out and "optim.lr (float" in out


def test_train_rejects_bad_config_before_compute(capsys, tmp_path):
    assert main(["train", "configs/digits/flow_grpo.yaml", "--set", "flow.noise_levl=1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) ['flow.noise_levl']" in err and "noise_level" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_sample_and_eval_a_run(tmp_path, capsys):
    png = tmp_path / "grid.png"
    assert main(["sample", "-n", "3", "--out", str(png), "--kind", "flow_sde"]) == 0
    assert Image.open(png).size == (3 * 9 + 1, 10 * 9 + 1)  # 10 digits x 3 samples of 8x8, padding 1
    run = tmp_path / "run"
    assert main(["train", "configs/digits/flow_grpo.yaml", "--out", str(run), "--set", "iterations=1",
                 "--set", "prompts_per_iter=2", "--set", "group_size=4", "--set", "eval.num_per_prompt=2",
                 "--set", "progress=false", "--set", "trackers=[]"]) == 0
    assert main(["eval", str(run), "--num-per-prompt", "3"]) == 0
    out = capsys.readouterr().out
    assert '"accuracy"' in out and (run / "eval.json").is_file()
    with pytest.raises(FileNotFoundError, match="not a flowrl run directory"):
        main(["eval", str(tmp_path)])


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "flowrl.cli", "--help"], capture_output=True, text=True, check=True)
    assert "train" in r.stdout and "serve-reward" in r.stdout and "sample" in r.stdout
