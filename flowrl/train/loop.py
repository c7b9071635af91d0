"""The one training loop: rollout -> score -> advantages -> minibatch updates -> log / evaluate / checkpoint.

A *task* (:class:`flowrl.train.task.Task`) supplies what depends on the model family and the registered
*algorithm* (:mod:`flowrl.train.algorithms`) what depends on the method; everything else is here, once. Read
one iteration top to bottom in :func:`train`. The loop never names a concrete task: it is handed one (or
a factory), or asks the algorithm registry for the factory of ``cfg.algorithm``.

Determinism: every random draw of iteration ``it`` (prompts, rollout noise, minibatch order) comes
from generators seeded with ``(seed, it, rank)`` (:func:`flowrl.train.task.iteration_generator`), so a run
killed after iteration k and resumed from its checkpoint continues exactly as the uninterrupted run.

Failures: a non-finite gradient norm or non-finite weights after an update stop the run with
:class:`TrainingDiverged`, naming the iteration, before anything is checkpointed, so the newest checkpoint
on disk is the last good one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from flowrl.config import to_dict
from flowrl.core import compute_advantages, zero_variance_filter
from flowrl.train.checkpoint import (
    CheckpointError, config_fingerprint, find_resumable, full_optimizer_state, full_tensor, gather_state_dict,
    is_sharded, latest_checkpoint, load_checkpoint, reshard, save_checkpoint, shard_like, shard_optimizer_state,
)
from flowrl.train.config import TrainConfig
from flowrl.train.ema import EMA
from flowrl.train.metrics_log import MetricsLogger, plot_curves
from flowrl.train.optim import build_optimizer
from flowrl.train.task import Task, iteration_generator

# Keys that may change between a run and its resume (they do not change what an iteration computes).
RESUMABLE_KEYS = ("iterations", "max_minutes", "progress", "save_every", "trackers", "tracker_project", "run_name",
                  "tracker_init", "export")


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite; the run stops, keeping its last good
    checkpoint."""


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    out = {}
    for k in sorted(keys):
        vals = [float(r[k]) for r in rows if k in r]
        out[k] = sum(vals) / len(vals)
    return out


def check_run_dir(out_dir: Path, cfg: TrainConfig, resume: bool) -> tuple[str, Optional[Any]]:
    """Config fingerprint and the checkpoint to resume from: the newest one that verifies, each damaged one
    skipped named on stderr. Refuse mismatches before any compute."""
    fp = config_fingerprint(to_dict(cfg), ignore=RESUMABLE_KEYS)
    root = out_dir / "checkpoints"
    if not resume:
        used = latest_checkpoint(root)  # any checkpoint directory, damaged or not, means the directory is in use
        if used is not None:
            raise CheckpointError(f"{out_dir} already holds checkpoints (step {used.step}); pass --resume to "
                                  "continue or choose a new --out directory")
        return fp, None
    ckpt, skipped = find_resumable(root)  # CheckpointError (one line) when checkpoints exist but none verifies
    for s in skipped:
        print(f"warning: --resume: skipping damaged checkpoint {s}", file=sys.stderr, flush=True)
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint under {root}; start without --resume")
    if ckpt.meta.get("fingerprint") != fp:
        raise CheckpointError(
            f"--resume: {out_dir} was written by a different config (fingerprint {ckpt.meta.get('fingerprint')} "
            f"!= {fp}); only {list(RESUMABLE_KEYS)} may change on resume. Use the same config or a new --out"
        )
    return fp, ckpt


def make_accelerator(cfg: TrainConfig, out_dir: Path):
    """An Accelerator logging to ``cfg.trackers`` that are installed (a missing one is named in a warning), with
    the tracker project, the run name (default: the run directory's name) and the per-tracker init arguments."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    trackers = available_trackers(cfg.trackers)
    acc = Accelerator(cpu=cpu, mixed_precision="no" if cpu else cfg.mixed_precision,
                      log_with=trackers or None, project_dir=str(out_dir))
    if trackers:
        acc.init_trackers(cfg.tracker_project, config=_flat(to_dict(cfg)),
                          init_kwargs=tracker_init_kwargs(cfg, trackers, out_dir))
    return acc


def available_trackers(requested: list[str]) -> list[str]:
    """The requested trackers whose package is installed; each missing one is named in a warning (the run goes
    on logging to ``metrics.jsonl`` and the others)."""
    import warnings

    from accelerate import tracking
    from accelerate.utils import LoggerType

    have = {str(t) for t in tracking.get_available_trackers()}
    out = []
    for t in requested:
        builtin = t in {str(x) for x in LoggerType}
        if builtin and t not in have:
            warnings.warn(f"trackers: {t!r} was requested but its package is not installed, so this run sends it "
                          f"nothing (install it, e.g. `pip install {t}`, or remove it from trackers); metrics.jsonl "
                          "and the other trackers still get everything", RuntimeWarning, stacklevel=2)
        elif builtin or t in tracking.LOGGER_TYPE_TO_CLASS:
            out.append(t)
    return out


def tracker_init_kwargs(cfg: TrainConfig, trackers: list[str], out_dir: Path) -> dict[str, dict]:
    """accelerate's ``init_kwargs``: ``cfg.tracker_init`` per tracker, with the run name for W&B (``name``)."""
    run_name = cfg.run_name or Path(out_dir).resolve().name
    kw = {t: dict(cfg.tracker_init.get(t, {})) for t in trackers}
    for t, v in kw.items():
        if t in RUN_NAME_ARG:
            v.setdefault(RUN_NAME_ARG[t], run_name)
    return {t: v for t, v in kw.items() if v}


# the init argument that names a run, per tracker (TensorBoard: the run directory is the name)
RUN_NAME_ARG = {"wandb": "name", "trackio": "name", "mlflow": "run_name", "swanlab": "experiment_name"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, task: Optional[Task] = None,
          build_task: Optional[Callable[[TrainConfig, Any], Task]] = None, accelerator=None) -> dict[str, float]:
    """Run ``cfg`` into ``out_dir``; returns the last evaluation's metrics.

    The task is ``task`` when given, else ``build_task(cfg, accelerator)``, else the factory that the
    algorithm registered under ``cfg.algorithm`` provides. The run directory is checked (resume or not,
    same config) before the task is built, so a mismatch costs no model load.
    """
    out_dir = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    # torch's global generator starts from entropy in every process; whatever draws from it while the task is
    # built (LoRA's initial weights, a critic's layers) must be the same on every rank and every run
    torch.manual_seed(cfg.seed)
    fingerprint, ckpt = check_run_dir(out_dir, cfg, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(_yaml(to_dict(cfg)))
    acc = accelerator if accelerator is not None else make_accelerator(cfg, out_dir)
    rank, main = acc.process_index, acc.is_main_process
    if task is None:
        if build_task is None:
            from flowrl.train.algorithms import ALGORITHMS

            build_task = ALGORITHMS[cfg.algorithm].build_task
        task = build_task(cfg, acc)
    plan = task.report_plan()
    if main and plan is not None:
        from flowrl.train.report import save_plan

        save_plan(out_dir, plan)
    params = [p for p in task.module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the task's module has no trainable parameter")
    optimizer = build_optimizer(params, cfg.optim)  # optim.name: the registered optimiser (adamw by default)
    module, optimizer = acc.prepare(task.module, optimizer)
    task.set_forward_module(module)  # forward through the DDP/FSDP wrapper so gradients are synchronised
    task.prepared_module = module  # what grad_sync holds back while chunks of one step accumulate
    # taken again after prepare: FSDP2 replaces every parameter by its shard (a DTensor), and clipping, the
    # finiteness check, the EMA and the checkpoints must act on the tensors the optimiser updates
    params = [p for p in task.module.parameters() if p.requires_grad]
    sharded = is_sharded(params)
    ema = EMA(params, decay=cfg.ema.decay) if cfg.ema.enabled else None

    start = 0
    if ckpt is not None:
        model_state, trainer_state, meta = load_checkpoint(ckpt, fingerprint=fingerprint, device=acc.device)
        named = dict(task.module.named_parameters())
        missing = [k for k in model_state if k not in named]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt.path} has weights the model lacks: {missing[:5]}")
        with torch.no_grad():
            for k, v in model_state.items():  # checkpoints hold whole tensors; under FSDP2 each rank takes its shard
                named[k].copy_(shard_like(v, named[k]))
        opt_state = trainer_state["optimizer"]
        if sharded:
            opt_state = shard_optimizer_state(opt_state, [p for g in optimizer.param_groups for p in g["params"]])
        optimizer.load_state_dict(opt_state)
        if ema is not None:
            ema.load_state_dict(trainer_state["ema"])
        task.load_extra_state(trainer_state.get("task", {}))
        start = ckpt.step
    logger = MetricsLogger(out_dir, accelerator=acc, resume_step=start if ckpt is not None else None, is_main=main)

    def evaluate(step: int) -> dict[str, float]:
        with (ema.swapped() if ema is not None else contextlib.nullcontext()):
            m = task.evaluate(step, out_dir)
            if sharded:  # the EMA's weights are still gathered in FSDP2's root module: drop them before swapping back
                reshard(task.module)
        logger.log(m, step=step, split="eval")
        return m

    def checkpoint(step: int) -> None:
        acc.wait_for_everyone()
        # whole tensors, gathered on every rank under FSDP2 (collectives), written by the main process
        trainable = {k: full_tensor(v) for k, v in task.module.named_parameters() if v.requires_grad}
        opt_state = full_optimizer_state(optimizer.state_dict()) if sharded else optimizer.state_dict()
        ema_state = ema.state_dict() if ema is not None else {}
        if main:
            save_checkpoint(out_dir / "checkpoints", step, model_state=trainable,
                            trainer_state={"optimizer": opt_state, "ema": ema_state, "task": task.extra_state()},
                            meta={"fingerprint": fingerprint})
        acc.wait_for_everyone()

    last_eval = evaluate(0) if start == 0 else {}
    t_start = time.time()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="train",
               disable=not (cfg.progress and main))
    for it in bar:
        t0 = time.time()
        roll = task.rollout(it, iteration_generator(cfg.seed, it, rank))
        batch = roll.batch.validate()
        metrics = dict(roll.metrics)
        if cfg.advantage.filter_zero_variance:
            keep = zero_variance_filter(batch.outcome, batch.group, valid=batch.valid)
            metrics["filter/kept_frac"] = float(keep.float().mean())
            batch = dataclasses.replace(batch, sample_valid=keep, mask=batch.mask & keep[:, None])
        adv = compute_advantages(cfg.advantage.estimator, batch, **cfg.advantage.params)
        adv, prep = task.prepare_update(roll, batch, adv, it)
        metrics.update(prep)
        t_roll = time.time() - t0

        rows = []
        updates = 0
        for epoch in range(cfg.updates_per_rollout):
            gen = iteration_generator(cfg.seed, it, rank, salt=1 + epoch)
            for idx, mb in batch.minibatches(cfg.minibatches, gen):
                optimizer.zero_grad(set_to_none=True)
                m = task.backward(roll, idx, mb, adv[idx], it)
                if cfg.optim.grad_clip > 0:
                    m["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.optim.grad_clip))
                    if not math.isfinite(m["grad_norm"]):
                        raise TrainingDiverged(_diverged(it, "the gradient norm is " + str(m["grad_norm"]), out_dir))
                optimizer.step()
                updates += 1
                if not _all_finite(params, sharded):
                    raise TrainingDiverged(_diverged(it, "the weights hold NaN or inf after the update", out_dir))
                # counted over the run (the same on resume): optimiser step it * (updates per iteration) + updates
                if ema is not None and (it * cfg.updates_per_rollout * cfg.minibatches + updates) % cfg.ema.every == 0:
                    ema.update()
                rows.append(m)
        metrics.update(_mean_metrics(rows))
        metrics.update({"time/rollout_s": t_roll, "time/iteration_s": time.time() - t0,
                        "time/elapsed_s": time.time() - t_start})
        step = it + 1
        if acc.num_processes > 1:  # each rank measured its share of the batch: log the mean over ranks
            metrics = _rank_mean(metrics, acc.num_processes)
        row = logger.log(metrics, step=step)
        bar.set_postfix(reward=f"{row.get('reward', float('nan')):.3f}", s_per_it=f"{row['time/iteration_s']:.2f}")
        out_of_time = cfg.max_minutes > 0 and (time.time() - t_start) > 60 * cfg.max_minutes
        if step % cfg.eval.every == 0 or step == cfg.iterations or out_of_time:
            last_eval = evaluate(step)
        if step % cfg.save_every == 0 or step == cfg.iterations or out_of_time:
            checkpoint(step)
        if out_of_time:
            break
    bar.close()
    # the export holds the weights the last evaluation (and so the report) measured: the EMA's when it is on
    with (ema.swapped() if ema is not None else contextlib.nullcontext()):
        state = gather_state_dict(task.module, keep=main) if sharded else None  # whole, on the main process
        if main:
            task.export(out_dir) if state is None else task.export(out_dir, state=state)
    if main:
        plot_curves(out_dir, keys=_curve_keys(out_dir, plan))
        from flowrl.train.report import write_report

        write_report(out_dir, plan=plan)
        if cfg.export.push_to_hub:
            from flowrl.train.hub import push_to_hub

            print(f"export pushed to the hub: {push_to_hub(cfg, out_dir)}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()
    return last_eval


def _rank_mean(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Each key's mean over the ranks that logged it (equal shares of the batch: the whole batch's mean for a
    per-sample mean such as ``reward``). One small all-gather per iteration."""
    rows: list[Optional[dict]] = [None] * world
    torch.distributed.all_gather_object(rows, metrics)
    return _mean_metrics([r for r in rows if r])


def _all_finite(params: list[torch.Tensor], sharded: bool = False) -> bool:
    """Whether every trained weight is finite: one norm per tensor, one host sync per update. Sharded (FSDP2):
    each rank checks its shards and the ranks agree (one all-reduce), so that all of them stop together."""
    local = [p.to_local() if sharded and hasattr(p, "to_local") else p for p in params]
    norms = torch._foreach_norm([p.detach() for p in local])
    bad = (~torch.isfinite(torch.stack([n.float() for n in norms])).all()).float()
    if sharded:
        torch.distributed.all_reduce(bad)
    return not bool(bad)


def _diverged(it: int, why: str, out_dir: Path) -> str:
    ckpt = latest_checkpoint(out_dir / "checkpoints")
    kept = f"the last good checkpoint is {ckpt.path}" if ckpt is not None else "no checkpoint was written yet"
    return (f"training diverged at iteration {it + 1}: {why}; stopped before checkpointing ({kept}). "
            "Lower optim.lr, set optim.grad_clip, or check the rewards")


def _curve_keys(out_dir: Path, plan: Any = None) -> list[str]:
    """The panels of ``curves.png``: the metrics the task's report plan shows that were logged (evaluation or
    training), else reward / accuracy / reward_accuracy / realism / diversity where logged."""
    from flowrl.train.metrics_log import read_metrics

    rows = read_metrics(out_dir)
    wanted = plan.metrics if plan is not None else ("reward", "accuracy", "reward_accuracy", "realism", "diversity")
    keys = [k for k in wanted if any(isinstance(r.get(k), (int, float)) for r in rows)]
    return keys or ["reward"]


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
