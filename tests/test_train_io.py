"""Checkpoints (atomic, resumable, config-checked) and the metrics log."""
import json
import os

import pytest
import torch

from flowrl.train.checkpoint import (
    CheckpointError, config_fingerprint, latest_checkpoint, list_checkpoints, load_checkpoint, rng_state,
    save_checkpoint, set_rng_state,
)
from flowrl.train.metrics_log import MetricsLogger, plot_curves, read_metrics


def _save(root, step, w):
    return save_checkpoint(root, step, model_state={"w": w}, trainer_state={"opt": {"m": w * 2, "step": step}},
                           meta={"fingerprint": "abc"}, keep=2)


def test_roundtrip_keep_and_latest(tmp_path):
    for s in (1, 2, 3):
        _save(tmp_path, s, torch.full((3,), float(s)))
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 3]  # keep=2
    ck = latest_checkpoint(tmp_path)
    model, trainer, meta = load_checkpoint(ck, fingerprint="abc")
    assert ck.step == 3 and torch.equal(model["w"], torch.full((3,), 3.0))
    assert torch.equal(trainer["opt"]["m"], torch.full((3,), 6.0)) and trainer["opt"]["step"] == 3


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, torch.ones(2))
    import flowrl.train.checkpoint as ck_mod

    def boom(*a, **k):
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(ck_mod.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, torch.zeros(2))
    ck = latest_checkpoint(tmp_path)
    assert ck.step == 1 and [c.step for c in list_checkpoints(tmp_path)] == [1]  # the half-written one is ignored


def test_other_config_is_refused(tmp_path):
    _save(tmp_path, 1, torch.ones(2))
    with pytest.raises(CheckpointError, match="different config"):
        load_checkpoint(latest_checkpoint(tmp_path), fingerprint="zzz")
    assert config_fingerprint({"a": 1, "b": 2}, ignore=("b",)) == config_fingerprint({"a": 1, "b": 3}, ignore=("b",))
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})


def test_rng_state_roundtrip(tmp_path):
    import random

    st = rng_state()
    save_checkpoint(tmp_path, 1, model_state={}, trainer_state={"rng": st})
    a = (torch.rand(3), random.random())
    _, trainer, _ = load_checkpoint(latest_checkpoint(tmp_path))
    set_rng_state(trainer["rng"])
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_metrics_log_resume_truncates(tmp_path):
    log = MetricsLogger(tmp_path)
    for s in range(5):
        log.log({"reward": torch.tensor(s / 10), "n": s}, step=s)
    log.log({"reward": 0.9, "accuracy": 0.5}, step=4, split="eval")
    MetricsLogger(tmp_path, resume_step=2).log({"reward": 0.3}, step=3)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["reward"] == pytest.approx(0.1) and rows[3]["reward"] == 0.3
    assert all(json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines())
    png = plot_curves(tmp_path)
    assert png.stat().st_size > 1000
