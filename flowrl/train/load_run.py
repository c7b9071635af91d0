"""Load what a finished run trained (its config, and the full weights or the LoRA) into a fresh task."""
from __future__ import annotations

from pathlib import Path

import torch

from flowrl.config import load
from flowrl.train.config import TrainConfig


def load_run(run_dir: str | Path, accelerator=None):
    """``(cfg, task)`` for ``run_dir`` (written by ``flowrl train``) with the trained weights in the model."""
    from accelerate import Accelerator

    from flowrl.train.tasks import build_task

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a flowrl run directory (no config.yaml)")
    cfg = load(TrainConfig, run / "config.yaml", ["trackers=[]"])
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    lora = run / "lora" / "pytorch_lora_weights.safetensors"
    full = run / "model.safetensors"
    if cfg.lora.enabled:
        if not lora.is_file():
            raise FileNotFoundError(f"{lora} is missing: the run has not finished (resume it), or its export was lost")
        task = build_task(cfg, acc)
        task.module.load_lora_adapter(str(lora.parent), weight_name=lora.name, prefix="transformer",
                                      adapter_name="trained")
        task.module.set_adapters("trained")
    else:
        if not full.is_file():
            raise FileNotFoundError(f"{full} is missing: the run has not finished (resume it), or its export was lost")
        from safetensors.torch import load_file

        task = build_task(cfg, acc)
        task.module.load_state_dict(load_file(str(full)), strict=True)
    return cfg, task
