"""FSDP2 (``torch.distributed.fsdp.fully_shard`` through accelerate's FSDP plugin) on two CPU processes (gloo),
on the embedded digits model: a sharded run, killed after its first checkpoint and resumed, computes what one
uninterrupted process computes (metrics of every iteration and the final exported weights).

Both ranks sample their half of the global batch (the flow task draws every row's noise from the iteration's
seed), each rank's loss is the token mean of its half, and FSDP averages the two halves' gradients: with equal
halves that is the gradient of the token mean over the whole batch, the one process's computation. Each
optimiser step accumulates two micro-batches (``flow.micro_batch``), so the chunks' reduction is held back
until the last one (``TaskBase.grad_sync``).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl.config import load
from flowrl.train.config import TrainConfig
from flowrl.train.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["iterations=2", "prompts_per_iter=2", "group_size=4", "flow.num_steps=3", "flow.micro_batch=2",
             "eval.every=100", "eval.num_per_prompt=1", "eval.grid_per_prompt=1", "progress=false", "trackers=[]",
             "save_every=1", "ema.enabled=true", "ema.decay=0.5", "optim.lr=1e-3", "loss.kl_beta=0.0",
             # Adam moves a weight by lr * g / (|g| + eps): with eps 1e-8 a gradient of 1e-9 (here: a few dozen
             # weights) moves by an amount that the reduction order's last bits decide; eps 1e-6 keeps it stable
             "optim.eps=1e-6"]
KEYS = ("step", "split", "reward", "policy/ratio_mean", "grad_norm", "accuracy")


def digits_cfg(*extra):
    return load(TrainConfig, ROOT / "configs" / "digits" / "flow_grpo.yaml", OVERRIDES + list(extra))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_rank(rank: int, world: int, port: int, out: str, extra: list[str], resume: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from flowrl.train.loop import train

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    # accelerate files cpu=True under MULTI_CPU (DDP) before it reads the FSDP plugin; its FSDP2 path itself
    # (fully_shard, no_sync, clipping, get_state_dict) runs on CPU over gloo, so take it as a GPU launch would
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    assert acc.is_fsdp2
    train(digits_cfg(*extra), out, resume=resume, accelerator=acc)


def _launch(out: Path, *extra: str, resume: bool = False) -> None:
    """One launch of two ranks (train() ends by destroying the process group: one run per launch)."""
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp_rank, args=(2, _free_port(), str(out), list(extra), resume), nprocs=2,
                       start_method="spawn")


def _strip(rows):
    return [{k: r[k] for k in KEYS if k in r} for r in rows]


def test_fsdp_run_killed_and_resumed_equals_one_uninterrupted_process(tmp_path):
    """Two launches of two ranks: a run "killed" after iteration 1 (its checkpoint), then resumed to the end.
    Iteration 1 compares FSDP with one process; iteration 2 also needs the checkpoint's weights, Adam moments
    and EMA shadows back in their shards (with any of them lost, the second update moves by ~lr = 1e-3)."""
    from flowrl.train.loop import train

    one, part = tmp_path / "one", tmp_path / "fsdp"
    train(digits_cfg(), one)
    _launch(part, "iterations=1")  # "killed" after iteration 1 and its checkpoint
    _launch(part, resume=True)

    a = _strip(read_metrics(one))
    b = [r for r in _strip(read_metrics(part)) if (r["step"], r["split"]) != (1, "eval")]  # the killed run's last
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval")]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == (pytest.approx(rb[k], rel=1e-4, abs=1e-6) if isinstance(ra[k], float) else rb[k]), (k, ra, rb)
    # the export is the EMA (decay 0.5) of the final weights, gathered from the shards
    w1 = load_file(str(one / "transformer" / "diffusion_pytorch_model.safetensors"))
    w2 = load_file(str(part / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(ROOT / "pipelines" / "digits_weights" / "flow" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert w1.keys() == w2.keys() == base.keys()
    assert max(float((w1[k] - base[k]).abs().max()) for k in w1) > 1e-4  # training moved the weights ...
    for k in w1:  # ... and the same way on two sharded, resumed processes
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)  # 1% of one step (lr)


def test_chunks_of_one_step_reduce_only_at_the_last():
    """flow.micro_batch=2 over a rank's 8 samples: 4 backward chunks in one optimiser step. The first 3 run inside
    accelerator.no_sync (no all-reduce / reduce-scatter) with sync_gradients False (DeepSpeed: no engine step);
    the last reduces. Recorded on one process through the accelerator's own hooks."""
    import contextlib

    from accelerate import Accelerator

    from flowrl.core import compute_advantages
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    cfg = digits_cfg()
    acc = Accelerator(cpu=True)
    task = FlowTask(cfg, acc)
    task.prepared_module = task.module
    seen, inside = [], []

    @contextlib.contextmanager
    def no_sync(model):
        assert model is task.module
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    backward = acc.backward
    acc.no_sync = no_sync
    acc.backward = lambda loss, **kw: (seen.append((bool(inside), acc.sync_gradients)), backward(loss, **kw))
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
    batch = roll.batch.validate()
    adv = compute_advantages(cfg.advantage.estimator, batch, **cfg.advantage.params)
    task.backward(roll, torch.arange(batch.batch_size), batch, adv, 0)
    assert seen == [(True, False)] * 3 + [(False, True)]
    assert acc.sync_gradients  # restored for the optimiser step
