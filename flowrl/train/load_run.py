"""Load what a finished run trained (its config, and the full weights or the LoRA) into a fresh task."""
from __future__ import annotations

from pathlib import Path

import torch

from flowrl.config import load
from flowrl.train.config import TrainConfig


def load_run(run_dir: str | Path, accelerator=None):
    """``(cfg, task)`` for ``run_dir`` (written by ``flowrl train``) with the trained weights in the model: the
    task of the run's registered algorithm, then its ``load_export`` (the inverse of ``export``)."""
    from accelerate import Accelerator

    from flowrl.train.algorithms import ALGORITHMS

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a flowrl run directory (no config.yaml)")
    cfg = load(TrainConfig, run / "config.yaml", ["trackers=[]"])
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    task = ALGORITHMS[cfg.algorithm].build_task(cfg, acc)
    try:
        task.load_export(run)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: the run has not finished (resume it), or its export was lost") from None
    return cfg, task
