#!/usr/bin/env python
"""Benchmark of the trajectory/advantage core on CPU: every estimator, ppo_clip, against a loop and the memory floor.

At B = 16,384 trajectories (1,024 groups of 16, shuffled) and T = 1,024 actions, times every estimator
registered in ``ADVANTAGES`` (the registry is iterated, so estimators added later are measured too) and
``ppo_clip`` (forward + backward), and in the same run two references:

  (a) the loop: GRPO advantages computed the way common non-vectorised code does it (verl's ``grpo``
      shape): a Python loop over samples filling a dict of groups, per-group mean/std, a second loop
      writing each sample's score, then one broadcast to [B, T];
  (b) the memory floor: allocating and filling a float32 [B, T] tensor (what any estimator must at
      least do to return its output).

Time: the median over --repeats calls of the process's CPU time (user + sys, all threads; time.process_time)
and of the wall time. On a machine shared with other jobs the wall time also counts waiting for a core,
so the ratios and PASS/FAIL verdicts use CPU time; with one thread on an idle machine the two agree.
Creating a fresh float [B, T] tensor costs page faults (64 MB at the full size), and on some virtual
machines those dominate: the floor is measured the same way, so the ratios stay fair.

Memory: "peak extra" is the growth of the process's peak resident set size during one call (Linux
VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the call, after freeing
cached allocations with malloc_trim). It sees every page torch touches (outputs, temporaries,
autograd buffers); it misses nothing that is written, and counts nothing that is not.

Usage:  python scripts/bench_core.py [--B 16384] [--T 1024] [--repeats 5] [--threads 1,2] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from collections import defaultdict
from typing import Callable

import torch

from flowrl.core import ADVANTAGES, TrajectoryBatch, compute_advantages, group_advantages
from flowrl.core.kernels import native
from flowrl.core.losses import ppo_clip

# Parameters for estimators that need some to run on the bench batch (none do today; keyed by name).
BENCH_PARAMS: dict[str, dict] = {}
# Settings that take another code path than the defaults, timed as well: (label, estimator, params, holes).
# holes=True: the same batch with 10% of each row's actions masked inside it (tool observations), which sends
# the token-level scans down their general (chunked) path.
VARIANTS: list[tuple[str, str, dict, bool]] = [
    ("reinforce_pp kl_coef=0.05", "reinforce_pp", {"kl_coef": 0.05}, False),
    ("reinforce_pp gamma=0.99", "reinforce_pp", {"gamma": 0.99}, False),
    ("gae gamma=0.99 lam=0.95", "gae", {"gamma": 0.99, "lam": 0.95}, False),
    ("gae, mask with holes", "gae", {}, True),
    ("reinforce_pp kl, holes", "reinforce_pp", {"kl_coef": 0.05}, True),
]
EST_LIMIT_S = 0.100  # every estimator under 100 ms
TARGETS = {"stats_vs_loop": 50.0, "grpo_vs_loop": 5.0, "grpo_vs_floor": 3.0, "peak_vs_inputs": 3.0}


# ----------------------------------------------------------------------------- inputs
def load_all_estimators() -> list[str]:
    """Import every estimator module (the registry's loader) so that every built-in estimator is in ADVANTAGES;
    returns the modules that failed to import (a half-finished module must not hide the others)."""
    ADVANTAGES.load()
    return [f"{mod}: {err}" for mod, err in ADVANTAGES.import_errors.items()]


def make_batch(B: int, G: int, T: int, S: int, n_parts: int, seed: int = 0) -> TrajectoryBatch:
    """B trajectories in B/G groups of G (shuffled), every field filled; ragged masks; step = t * S // T."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = B // G
    perm = torch.randperm(B, generator=gen)
    group = (torch.arange(B) // G)[perm] * 7919 + 11  # sparse ids
    member = (torch.arange(B) % G)[perm]
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
    pos = torch.arange(T)
    mask = pos[None, :] < lengths[:, None]
    step = (pos * S // T).expand(B, T).contiguous()
    correct = (torch.rand(B, generator=gen) < 0.5).float()
    outcome = correct + 0.1 * torch.randn(B, generator=gen)
    parts = {"acc": correct, "fmt": (torch.rand(B, generator=gen) < 0.8).float(), "len": -lengths.float() / T}
    parts = dict(list(parts.items())[:n_parts])
    old_logp = -torch.rand(B, T, generator=gen) * 3
    ref_logp = old_logp + 0.1 * torch.randn(B, T, generator=gen)
    value = torch.randn(B, T, generator=gen)
    entropy = torch.rand(B, T, generator=gen) * 2
    step_reward = torch.rand(B, S, generator=gen)
    # a tree per group: at step s the G members share 2**s prefixes (all distinct from step log2(G) on)
    s_idx = torch.arange(S)
    branch = member[:, None] // (G // 2 ** s_idx.clamp(max=max(G.bit_length() - 1, 0)))[None, :].clamp(min=1)
    node = ((group[:, None] * S + s_idx[None, :]) * G + branch).long()
    del n_groups
    return TrajectoryBatch(group=group, mask=mask, step=step, old_logp=old_logp, outcome=outcome,
                           outcome_parts=parts, ref_logp=ref_logp, step_reward=step_reward, value=value,
                           entropy=entropy, node=node)


def batch_bytes(b: TrajectoryBatch) -> int:
    ts = [getattr(b, f) for f in ("group", "mask", "step", "old_logp", "outcome", "ref_logp", "step_reward",
                                   "value", "entropy", "node", "sample_valid")]
    ts += list(b.outcome_parts.values())
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ----------------------------------------------------------------------------- reference (a): the loop
def loop_group_scores(scores: torch.Tensor, index: list, eps: float = 1e-4) -> torch.Tensor:
    """GRPO scores by a per-sample Python loop with a dict of groups (the non-vectorised shape)."""
    scores = scores.clone()
    by_group: dict = defaultdict(list)
    for i in range(len(index)):
        by_group[index[i]].append(scores[i])
    mean, std = {}, {}
    for g, xs in by_group.items():
        if len(xs) == 1:
            mean[g], std[g] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(xs)
            mean[g], std[g] = t.mean(), t.std()
    for i in range(len(index)):
        scores[i] = (scores[i] - mean[index[i]]) / (std[index[i]] + eps)
    return scores


def loop_grpo(scores: torch.Tensor, index: list, mask: torch.Tensor) -> torch.Tensor:
    return loop_group_scores(scores, index).unsqueeze(-1) * mask


# ----------------------------------------------------------------------------- measurement
class Timing:
    """Medians of ``repeats`` calls (CPU and wall seconds) and the peak extra memory of the warm-up call."""

    def __init__(self, fn: Callable, repeats: int, mem: bool = False):
        self.peak = peak_extra_bytes(fn) if mem else None  # the warm-up call, measured
        if not mem:
            fn()
        cpu, wall = [], []
        for _ in range(repeats):
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            r = fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            del r
        self.cpu, self.wall = statistics.median(cpu), statistics.median(wall)


_LIBC = None


def _malloc_trim() -> None:
    """Hand freed memory back to the system, so that a peak measures what a call needs and not what earlier calls
    happened to leave cached: glibc's malloc_trim, and with jemalloc preloaded a purge of every arena (its
    retained dirty pages would otherwise serve the call without raising the RSS)."""
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL(None)
        if hasattr(_LIBC, "mallctl"):  # jemalloc: "arena.<MALLCTL_ARENAS_ALL = 4096>.purge"
            _LIBC.mallctl(b"arena.4096.purge", None, None, None, ctypes.c_size_t(0))
        if hasattr(_LIBC, "malloc_trim"):
            _LIBC.malloc_trim(0)
    except OSError:
        pass


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def can_measure_memory() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable) -> int:
    """Growth of peak RSS during one call of ``fn`` (see the module docstring)."""
    gc.collect()
    _malloc_trim()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    r = fn()
    peak = _status_kb("VmHWM")
    del r
    gc.collect()
    _malloc_trim()
    return max(peak - base, 0) * 1024


def ms(x: float) -> str:
    return f"{x * 1e3:9.2f}"


# ----------------------------------------------------------------------------- the run
def run(args, threads: int, batch: TrajectoryBatch, mem_ok: bool) -> list[tuple[str, bool, str]]:
    torch.set_num_threads(threads)
    B, T = batch.mask.shape
    inputs = batch_bytes(batch)
    bt_bytes = B * T * 4
    verdicts: list[tuple[str, bool, str]] = []
    # One thread: CPU time (robust to other jobs). More threads: wall time, since the CPU time of idle
    # OpenMP workers (spin-waiting) would be charged to the work.
    basis = "cpu" if threads == 1 else "wall"
    key = (lambda tm: tm.cpu) if basis == "cpu" else (lambda tm: tm.wall)
    print(f"\n=== torch threads = {torch.get_num_threads()} (ratios and verdicts on {basis} time) ===")

    index = batch.group.tolist()  # the loop gets a ready Python list (not timed; favours the loop)
    loop_scores = Timing(lambda: loop_group_scores(batch.outcome, index), args.loop_repeats)
    loop_total = Timing(lambda: loop_grpo(batch.outcome, index, batch.mask), args.loop_repeats)
    floor = Timing(lambda: torch.full((B, T), 1.0), args.repeats)
    buf = torch.empty(B, T)
    fill = Timing(lambda: buf.fill_(1.0), args.repeats)
    del buf
    stats = Timing(lambda: group_advantages(batch.outcome, batch.group), args.repeats)
    # validate() runs once per rollout (the trainer's; compute_advantages re-validates only a changed batch)
    validate = Timing(lambda: dataclasses.replace(batch).validate(), args.repeats)
    # the loop computes the same numbers as the vectorised grpo
    diff = (loop_grpo(batch.outcome, index, batch.mask) - compute_advantages("grpo", batch)).abs().max().item()

    print(f"references (medians of {args.repeats} calls; the loop: of {args.loop_repeats})")
    print(f"  {'what':<48}{'cpu ms':>10}{'wall ms':>10}")
    for what, tm in [("(a) loop, [B] scores (dict of groups)", loop_scores), ("(a) loop, with [B, T] output", loop_total),
                     ("(b) memory floor: torch.full float [B, T]", floor),
                     ("    (fill_ into an existing [B, T], for info)", fill),
                     ("group statistics, [B] (group_advantages)", stats),
                     ("TrajectoryBatch.validate(), once per rollout", validate)]:
        print(f"  {what:<48}{ms(tm.cpu):>10}{ms(tm.wall):>10}")
    print(f"  loop vs vectorised grpo: max |difference| = {diff:.2e}")

    print(f"\nestimators, default params. fn: the registered function on a validated batch (like the loop, no "
          f"checks); checked: compute_advantages (validate + re-mask + NaN check). Ratios use fn {basis} time.")
    print(f"inputs = all batch tensors = {inputs / 2**20:.0f} MB; [B,T]s = peak extra (of the checked call) in "
          f"float32 [B, T] units of {bt_bytes / 2**20:.0f} MB")
    has_native = native.library() is not None
    print(f"native CPU kernels: {'on, ' + ('AVX2' if native.simd() else 'portable C') if has_native else 'off'}"
          + ("; 'torch path': the same fn with them off (what CUDA runs), and its time over fn's" if has_native else ""))
    hdr = f"  {'estimator':<24}{'fn cpu':>9}{'fn wall':>9}{'checked':>9}{'vs floor':>9}{'vs loop':>9}"
    if mem_ok:
        hdr += f"{'peak MB':>9}{'/inputs':>8}{'[B,T]s':>7}"
    if has_native:
        hdr += f"{'torch path':>11}{'':>7}"
    print(hdr + "\n" + f"  {'':<24}{'ms':>9}{'ms':>9}{basis + ' ms':>9}" + (f"{'':>42}{basis + ' ms':>11}" if has_native and mem_ok else ""))
    grpo = None
    holed = None
    rows = [(name, name, BENCH_PARAMS.get(name, {}), False) for name in sorted(ADVANTAGES)] + VARIANTS
    for label, name, params, holes in rows:
        fn = ADVANTAGES[name]
        if holes and holed is None:
            gen = torch.Generator().manual_seed(2)
            holed = dataclasses.replace(batch, mask=batch.mask & (torch.rand(B, T, generator=gen) > 0.1)).validate()
        b = holed if holes else batch
        try:
            checked = Timing(lambda: compute_advantages(name, b, **params), args.repeats, mem=mem_ok)
            raw = Timing(lambda: fn(b, **params), args.repeats)
        except Exception as e:
            print(f"  {label:<24}ERROR {type(e).__name__}: {e}")
            verdicts.append((f"{label} runs", False, f"{type(e).__name__}"))
            continue
        if label == "grpo":
            grpo = (raw, checked)
        t = key(raw)
        line = f"  {label:<24}{ms(raw.cpu)}{ms(raw.wall)}{ms(key(checked))}{t / key(floor):8.2f}x{key(loop_total) / t:8.1f}x"
        if mem_ok:
            peak = checked.peak
            line += f"{peak / 2**20:9.0f}{peak / inputs:8.2f}{peak / bt_bytes:7.2f}"
            verdicts.append((f"{label}: peak extra memory < 3x inputs", peak < TARGETS["peak_vs_inputs"] * inputs,
                             f"{peak / inputs:.2f}x"))
        if has_native:
            with native.enabled(False):
                slow = Timing(lambda: fn(b, **params), args.repeats)
            line += f"{ms(key(slow)):>11}{key(slow) / t:6.1f}x"
        print(line)
        verdicts.append((f"{label}: under 100 ms (fn; checked in brackets)", t < EST_LIMIT_S,
                         f"{t * 1e3:.0f} ms ({key(checked) * 1e3:.0f} ms)"))

    # ppo_clip forward + backward
    gen = torch.Generator().manual_seed(1)
    logp = (batch.old_logp + 0.05 * torch.randn(B, T, generator=gen)).requires_grad_(True)
    adv = compute_advantages("grpo", batch)

    def ppo_step():
        logp.grad = None
        loss, _ = ppo_clip(logp, batch.old_logp, adv, batch.mask)
        loss.backward()
        return loss

    ppo = Timing(ppo_step, args.repeats, mem=mem_ok)
    ppo_inputs = 3 * bt_bytes + B * T  # logp, old_logp, adv (float32) and mask (bool)
    line = f"  {'ppo_clip fwd+bwd':<24}{ms(ppo.cpu)}{ms(ppo.wall)}{'':>9}{key(ppo) / key(floor):8.2f}x{'':>9}"
    if mem_ok:
        peak = ppo.peak  # includes logp's gradient (one [B, T]), an output the step must produce
        line += f"{peak / 2**20:9.0f}{peak / ppo_inputs:8.2f}{peak / bt_bytes:7.2f}"
        verdicts.append(("ppo_clip fwd+bwd: peak extra memory < 3x its inputs (logp, old_logp, adv, mask)",
                         peak < TARGETS["peak_vs_inputs"] * ppo_inputs, f"{peak / ppo_inputs:.2f}x"))
    print(line)

    head = [("group statistics [B] >= 50x faster than the loop's [B] part", key(loop_scores) / key(stats) >= 50,
             f"{key(loop_scores) / key(stats):.0f}x")]
    if grpo is not None:
        raw, checked = grpo
        head += [
            ("grpo with [B, T] output >= 5x faster than the loop", key(loop_total) / key(raw) >= 5,
             f"{key(loop_total) / key(raw):.1f}x (checked: {key(loop_total) / key(checked):.1f}x)"),
            ("grpo within 3x of the memory floor", key(raw) / key(floor) <= 3,
             f"{key(raw) / key(floor):.2f}x (checked: {key(checked) / key(floor):.2f}x)"),
        ]
    return head + verdicts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=16384, help="trajectories (a multiple of --group)")
    p.add_argument("--T", type=int, default=1024, help="actions per trajectory")
    p.add_argument("--S", type=int, default=16, help="steps per trajectory (step = t * S // T)")
    p.add_argument("--group", type=int, default=16, help="samples per group")
    p.add_argument("--parts", type=int, default=3, help="named outcome parts (2-3)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--loop-repeats", type=int, default=3, help="timed calls of the slow loop reference")
    p.add_argument("--threads", default="1", help="comma-separated torch thread counts to run, e.g. 1,2")
    p.add_argument("--quick", action="store_true", help="small smoke run: B=1024, T=128, 2 repeats, 1 thread")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    args = p.parse_args(argv)
    if args.quick:
        args.B, args.T, args.repeats, args.loop_repeats, args.threads = 1024, 128, 2, 1, "1"
    if args.B % args.group:
        p.error(f"--B={args.B} must be a multiple of --group={args.group}")
    threads = [int(x) for x in args.threads.split(",") if x]

    failed = load_all_estimators()
    mem_ok = can_measure_memory()
    print(f"flowrl core benchmark | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | python {platform.python_version()}")
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs on this machine slow the wall times)")
    pre = os.environ.get("LD_PRELOAD", "")
    alloc = "jemalloc (LD_PRELOAD)" if "jemalloc" in pre else ("tcmalloc (LD_PRELOAD)" if "tcmalloc" in pre else "glibc malloc")
    print(f"allocator: {alloc}. glibc maps every 64 MB tensor fresh (about 16k page faults per [B, T]); a caching "
          "allocator (jemalloc here, torch's own on CUDA) reuses them: `make bench` preloads jemalloc when installed")
    print(f"B={args.B} ({args.B // args.group} groups of {args.group}, shuffled), T={args.T}, S={args.S}, "
          f"{args.parts} outcome parts, {len(ADVANTAGES)} registered estimators")
    if not mem_ok:
        print("peak memory: not measured (/proc/self/clear_refs unavailable on this system)")
    for f in failed:
        print(f"warning: could not import {f}")
    t0 = time.perf_counter()
    batch = make_batch(args.B, args.group, args.T, args.S, args.parts).validate()
    print(f"batch built in {time.perf_counter() - t0:.1f} s ({batch_bytes(batch) / 2**20:.0f} MB of tensors)")

    all_ok = True
    for n in threads:
        verdicts = run(args, n, batch, mem_ok)
        print(f"\ntargets (threads = {n})")
        for what, ok, fig in verdicts:
            all_ok &= ok
            print(f"  {'PASS' if ok else 'FAIL'}  {what:<72} {fig}")
    if args.quick:
        print("\n(--quick: sizes are far below the targets' B and T; the verdicts above are only a smoke test)")
    return 1 if (args.strict and not all_ok) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
