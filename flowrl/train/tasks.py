"""Which task drives the loop for a config: the flow task for flow algorithms (the LLM task joins here)."""
from __future__ import annotations

from flowrl.train.config import TrainConfig


def build_task(cfg: TrainConfig, accelerator):
    from flowrl.train.flow_task import FLOW_ALGORITHMS, FlowTask

    if cfg.algorithm in FLOW_ALGORITHMS:
        return FlowTask(cfg, accelerator)
    if cfg.algorithm.startswith("llm_"):
        from flowrl.train.llm_task import LLMTask

        return LLMTask(cfg, accelerator)
    raise ValueError(f"unknown algorithm {cfg.algorithm!r}; valid: {FLOW_ALGORITHMS}")
