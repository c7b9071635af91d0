"""Benchmark: a flowrl training step against the bare forward + backward of the same model on the same batch.

The physical cost of an update is the model's forward and backward passes over the trained actions.
flowrl adds the SDE kernel's log-prob, the advantage and loss core, and bookkeeping. This script times,
in one process and interleaved (so machine load hits both alike):

- flowrl: ``FlowTask.backward`` (recompute log-probs of every trained denoising step through the adapter,
  PPO-clip, aggregation, backward) + optimiser step, without the KL term (a reference forward is model
  cost, reported on its own line);
- bare: the same transformer called directly on the same (x, timestep, prompt embeddings) batch, loss =
  mean of the output, backward + optimiser step.

It also reports the peak resident memory of a short digits demo run (a child process).

    .venv/bin/python scripts/bench_train.py [--repeats 15] [--threads 1]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(kl_beta: float):
    from accelerate import Accelerator

    from flowrl.config import load
    from flowrl.core import compute_advantages
    from flowrl.train.config import TrainConfig
    from flowrl.train.flow_task import FlowTask
    from flowrl.train.task import iteration_generator

    cfg = load(TrainConfig, ROOT / "configs/digits/flow_grpo.yaml", [f"loss.kl_beta={kl_beta}", "trackers=[]"])
    task = FlowTask(cfg, Accelerator(cpu=True))
    roll = task.rollout(0, iteration_generator(cfg.seed, 0, 0))
    batch = roll.batch.validate()
    adv = compute_advantages(cfg.advantage.estimator, batch, **cfg.advantage.params)
    params = [p for p in task.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    return cfg, task, roll, batch, adv, params, opt


def flowrl_step(task, roll, batch, adv, opt):
    opt.zero_grad(set_to_none=True)
    task.backward(roll, torch.arange(batch.batch_size), batch, adv, 0)
    opt.step()


def bare_inputs(task, roll):
    traj, steps = roll.side["traj"], roll.side["steps"]
    b, T = traj.batch_size, len(steps)
    rows = torch.arange(b).repeat(T)
    st = steps.repeat_interleave(b)
    x = traj.latents[rows, st]
    t = traj.sigmas[st] * task.pipe.scheduler.config.num_train_timesteps
    cond = {k: v[rows] for k, v in traj.cond.items()}
    return x, t, cond


def bare_step(task, inputs, opt):
    x, t, cond = inputs
    opt.zero_grad(set_to_none=True)
    out = task.pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    out.float().mean().backward()
    opt.step()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_memory_of_demo(iterations: int) -> float:
    """Peak RSS (MiB) of `flowrl train configs/digits/flow_grpo.yaml` for a few iterations, in a child."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-m", "flowrl.cli", "train", str(ROOT / "configs/digits/flow_grpo.yaml"),
                        "--out", d + "/run", "--set", f"iterations={iterations}", "--set", "progress=false",
                        "--set", "eval.every=1000"], check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--demo-iterations", type=int, default=5, help="iterations of the peak-memory demo run (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg, task, roll, batch, adv, params, opt = build(kl_beta=0.0)
    inputs = bare_inputs(task, roll)
    b, T = batch.mask.shape
    for _ in range(3):  # warm-up
        flowrl_step(task, roll, batch, adv, opt)
        bare_step(task, inputs, opt)
    ours, bare = [], []
    for _ in range(args.repeats):  # interleaved: the same load on both
        ours += timed(lambda: flowrl_step(task, roll, batch, adv, opt), 1)
        bare += timed(lambda: bare_step(task, inputs, opt), 1)
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)

    cfg_kl, task_kl, roll_kl, batch_kl, adv_kl, _, opt_kl = build(kl_beta=0.01)
    kl = timed(lambda: flowrl_step(task_kl, roll_kl, batch_kl, adv_kl, opt_kl), max(3, args.repeats // 3))

    print(f"digits flow model, batch {b} samples x {T} trained denoising steps = {b * T} transformer inputs, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'':<46}{'median ms':>10}{'min ms':>10}")
    print(f"{'bare forward + backward + AdamW step':<46}{1e3 * m_bare:>10.1f}{1e3 * min(bare):>10.1f}")
    print(f"{'flowrl training step (no KL)':<46}{1e3 * m_ours:>10.1f}{1e3 * min(ours):>10.1f}")
    print(f"{'flowrl training step with KL (+ ref forward)':<46}{1e3 * statistics.median(kl):>10.1f}{1e3 * min(kl):>10.1f}")
    ratio = m_ours / m_bare
    print(f"ratio flowrl / bare: {ratio:.3f} (target <= 1.20: {'PASS' if ratio <= 1.2 else 'FAIL'})")
    if args.demo_iterations > 0:
        print(f"peak RSS of the digits demo ({args.demo_iterations} iterations, whole process): "
              f"{peak_memory_of_demo(args.demo_iterations):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
