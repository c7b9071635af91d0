"""The metrics log: resume truncates it, curves plot from it. (Checkpoints: tests/test_checkpoint.py.)"""
import json

import pytest
import torch

from flowrl.train.metrics_log import MetricsLogger, plot_curves, read_metrics


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
