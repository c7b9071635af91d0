"""The LLM half of training: token rollouts, verifiable rewards, process rewards, teacher-forced log-probs.

:class:`LLMTask` is plumbing: it samples and scores completions (:class:`flowrl.llm.TokenRollout`), fills the
:class:`flowrl.core.TrajectoryBatch` and recomputes log-probs; what the update optimises comes from the
registered LLM algorithm (:mod:`flowrl.train.algorithms.llm_base`: ``llm_grpo``, ``llm_prime``, or a user's).
The model is a registered LLM adapter (``llm.model``: ``arithmetic``, ``countdown``) or any transformers causal
LM by hub id / local folder (the ``causal_lm`` adapter). Options of ``llm``, in the order a rollout applies them:
a process reward scoring each step (``process_reward``) fills ``TrajectoryBatch.step_reward`` for the step-level
estimators; the KL to the reference (LoRA disabled, or a frozen copy of the initial weights) with k1/k2/k3 in
the reward (``kl_in_reward``: r_i <- r_i - c * sum_t KL_t); DAPO's soft overlong penalty (``overlong_cache``),
truncated-completion masking (``mask_truncated``) and dynamic sampling with refill (``dynamic_sampling``); a
registered shaper before the estimator (``shaping``, :mod:`flowrl.train.llm_shaping`).

Sampler vs trainer: with the transformers sampler and no top-k/top-p, ``old_logp`` is the sampler's own
log-prob of each token, equal to the trainer's recompute (ratio 1 at unchanged weights). With vLLM or
top-k/top-p, the trainer's log-probs are recomputed as ``old_logp`` and the per-token loss is multiplied by
``importance_weights(old_logp, sampler_logp)`` (TIS/MIS; ``llm.is_*``).

Distribution: the global batch (P prompts x G samples, rows ``p * G + j``) is split into contiguous row
blocks, one per rank. Prompts are drawn from the iteration's seed (rank-independent) and rows are generated
in chunks of ``llm.gen_batch`` rows, chunk ``c`` of the global batch sampled with a generator seeded from
``(seed, iteration, c)``: when ``gen_batch`` divides the rows of a rank, R ranks sample exactly what one
process samples, and the core's (gathered) group statistics are the global ones. Dynamic sampling and the
shapers work on whole groups per rank (rank-local refill: the same distribution, not the same draws).
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowrl.core import (
    TrajectoryBatch, importance_weights, kl_estimate, masked_mean, soft_overlong_penalty, zero_variance_filter,
)
from flowrl.core.dtypes import torch_dtype
from flowrl.llm import TokenRollout, segment_steps, step_texts, token_logprobs
from flowrl.train.llm_data import default_rewards, load_dataset, merge_reward_metrics, row_meta
from flowrl.train.llm_eval import pass_k_metrics
from flowrl.train.llm_shaping import ShapingInput, process_score, shape
from flowrl.train.task import Rollout, TaskBase, iteration_generator

if TYPE_CHECKING:
    from flowrl.train.algorithms.llm_base import LLMAlgorithm
    from flowrl.train.config import TrainConfig


def load_llm_pipeline(cfg: "TrainConfig", device: Any):
    """The adapter of ``cfg.llm.model``: a registered LLM adapter loaded from ``llm.model_path`` (None: its own
    weights), or else the ``causal_lm`` adapter loaded from ``llm.model`` as a hub id / local folder."""
    from flowrl.pipelines.registry import PIPELINES, load_pipeline

    lc = cfg.llm
    lora = None
    if cfg.lora.enabled:
        lora = {"r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
                "target_modules": list(cfg.lora.target_modules) or "all-linear"}
    kw = dict(dtype=torch_dtype(lc.dtype, who="llm.dtype"), device=device, lora=lora, chat_template=lc.chat_template,
              backend=lc.backend)
    if lc.model in PIPELINES:  # a flow adapter's name is refused here with the list of LLM adapters
        pipe = load_pipeline(lc.model, lc.model_path, family="llm", **kw)
    elif lc.model_path is not None:
        raise ValueError(f"llm.model_path={lc.model_path!r} is the weights folder of a registered LLM adapter, but "
                         f"llm.model={lc.model!r} is not one (a hub id / local folder goes in llm.model alone)")
    else:
        from flowrl.rewards.base import hub_guard

        # a model that is neither cached nor reachable: one sentence naming it, not the hub's traceback
        with hub_guard(lc.model, "log in (`huggingface-cli login`) for a gated model, or set llm.model to a local folder"):
            pipe = load_pipeline("causal_lm", lc.model, family="llm", **kw)
    if lc.backend == "vllm" and not pipe.external_sampler:
        raise ValueError(f"llm.backend=vllm: the adapter of llm.model={lc.model!r} has no vLLM sampler")
    return pipe


class LLMTask(TaskBase):
    """See the module docstring. ``module`` is the causal LM (a peft model under LoRA); ``algorithm`` defaults to
    the registered algorithm ``cfg.algorithm``."""

    def __init__(self, cfg: "TrainConfig", accelerator, algorithm: Optional["LLMAlgorithm"] = None):
        from flowrl.train.algorithms import ALGORITHMS

        if algorithm is None:
            cls = ALGORITHMS[cfg.algorithm]
            if getattr(cls, "family", "") != "llm":
                llm = [n for n in ALGORITHMS.names() if getattr(ALGORITHMS[n], "family", "") == "llm"]
                raise ValueError(f"algorithm {cfg.algorithm!r} is not an LLM algorithm; valid: {llm}")
            algorithm = cls(cfg)
        type(algorithm).validate_config(cfg)
        self.cfg, self.lc, self.acc, self.algorithm = cfg, cfg.llm, accelerator, algorithm
        self.show_progress = bool(cfg.progress and accelerator.is_main_process)
        P, G = cfg.prompts_per_iter, cfg.group_size
        if (P * G) % self.world:
            raise ValueError(f"prompts_per_iter * group_size = {P * G} must be divisible by the number of processes "
                             f"{self.world}")
        if (self.lc.dynamic_sampling or self.lc.shaping is not None) and P % self.world:
            raise ValueError(f"llm.dynamic_sampling / llm.shaping work on whole groups per process: prompts_per_iter={P} "
                             f"must be divisible by the number of processes {self.world}")
        self.train_rows, self.eval_rows = load_dataset(cfg)

        self.pipe = load_llm_pipeline(cfg, accelerator.device)
        self.module: nn.Module = self.pipe.model
        if cfg.lora.init_from:  # continue from an existing peft LoRA: its weights in the trained adapter
            from flowrl.pipelines.lora import load_lora_into

            load_lora_into(self.module, cfg.lora.init_from)
        if cfg.lora.enabled and cfg.lora.fp32_params:  # LoRA in fp32 over the bf16/fp16 base (no-op in fp32)
            from flowrl.pipelines.lora import upcast_trainable

            upcast_trainable(self.module)
        if cfg.gradient_checkpointing:
            self.pipe.enable_gradient_checkpointing()
        if not cfg.lora.enabled:
            self.module.requires_grad_(True)
        self.module.train()
        self._fwd: nn.Module = self.module
        self.needs_ref = type(algorithm).needs_reference(cfg)
        self.init_reference(self.needs_ref)
        algorithm.setup(self)

        from flowrl.rewards import build_process_reward, build_rewards

        self.reward = build_rewards(default_rewards(cfg))
        self.score_key = next(iter(self.reward.weights))
        self.process_reward = None
        if self.lc.process_reward:
            pr = dict(self.lc.process_reward)
            if "type" not in pr:
                raise ValueError(f"llm.process_reward needs a 'type' (a registered process reward); got {self.lc.process_reward}")
            self.process_reward = build_process_reward(pr.pop("type"), **pr)
        self.pad_id = int(self.pipe.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ model plumbing
    def set_forward_module(self, module: nn.Module) -> None:
        """Forward the training pass through the (DDP/FSDP-)wrapped model so gradients are synchronised."""
        self._fwd = module

    @property
    def forward_module(self) -> nn.Module:
        """The module the training passes go through (the wrapped ``module`` under DDP/FSDP)."""
        return self._fwd

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference policy: the model with its LoRA adapters disabled, or the frozen initial copy."""
        if self.cfg.lora.enabled:
            with self.pipe.adapters_disabled() as model:
                yield model
        else:
            yield self.reference_module

    def logprobs(self, model: nn.Module, s: TokenRollout, rows: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced log-probs float [n, T] of the completions of ``s`` (rows ``rows``, default all) under
        ``model`` at the rollout's temperature."""
        ids, am, cm = s.input_ids, s.attention_mask, s.comp_mask
        if rows is not None:
            ids, am, cm = ids[rows], am[rows], cm[rows]
        return token_logprobs(model, ids, am, cm, temperature=s.temperature)

    # ------------------------------------------------------------------ rollout
    def _generate(self, rows: list[int], it: int, chunk_ids: list[int], chunk: int, salt: int) -> TokenRollout:
        """Sample and score dataset rows ``rows`` in chunks of ``chunk`` rows; chunk k is seeded from
        ``(seed, it, chunk_ids[k], salt)``."""
        lc, pieces = self.lc, []
        starts = range(0, len(rows), chunk)
        for k, start in enumerate(tqdm(starts, desc="rollout", leave=False, disable=not self.show_progress)):
            sub = rows[start:start + chunk]
            data = [self.train_rows[i] for i in sub]
            prompts = [d["prompt"] for d in data]
            gen = iteration_generator(self.cfg.seed, it, 0, salt=salt + 1000 + chunk_ids[k])
            g = self.pipe.generate(prompts, max_new_tokens=lc.max_new_tokens, temperature=lc.temperature,
                                   top_k=lc.top_k, top_p=lc.top_p, generator=gen)
            texts = self.pipe.decode(g)
            outcome, parts, valid, rm = self.reward.score(texts, prompts, row_meta(data))
            score = parts[self.score_key].float()
            correct = torch.where(valid, score >= lc.correct_threshold, torch.zeros_like(valid))
            pieces.append(TokenRollout(
                prompt_ids=g.prompt_ids, prompt_mask=g.prompt_mask, comp_ids=g.completion_ids,
                comp_mask=g.completion_mask, logp=g.logp, entropy=g.entropy, sampler_logp=g.sampler_logp,
                truncated=g.truncated, outcome=outcome.float(), valid=valid, correct=correct,
                row=torch.tensor(sub, dtype=torch.long), parts={kk: v.float() for kk, v in parts.items() if v.dtype != torch.bool},
                texts=texts, prompts=prompts, temperature=g.temperature, reward_metrics=[(len(sub), rm)],
            ))
        return TokenRollout.cat(pieces, self.pad_id)

    def rollout(self, it: int, generator: torch.Generator) -> Rollout:
        cfg, lc = self.cfg, self.lc
        P, G = cfg.prompts_per_iter, cfg.group_size
        b = P * G // self.world
        self.pipe.sync_sampler()
        metrics: dict[str, float] = {}
        if lc.dynamic_sampling:
            piece, group, ds = self._dynamic_rollout(it)
            metrics.update(ds)
        else:
            g = iteration_generator(cfg.seed, it, 0, salt=97)  # rank-independent: the global batch
            chosen = torch.randint(len(self.train_rows), (P,), generator=g)
            rows = torch.arange(self.rank * b, (self.rank + 1) * b)
            chunk = lc.gen_batch or b
            first = self.rank * b
            chunk_ids = [(first + s) // chunk for s in range(0, b, chunk)]
            piece = self._generate(chosen[rows // G].tolist(), it, chunk_ids, chunk, salt=0)
            group = it * P + rows // G
        return self._finish(piece, group.to(self.acc.device), it, metrics)

    def _dynamic_rollout(self, it: int) -> tuple[TokenRollout, Tensor, dict]:
        """DAPO dynamic sampling: rounds of P/R fresh prompts per rank until P/R groups with unequal rewards
        are found (at most 1 + max_refill_rounds rounds; then constant groups fill the rest, advantage 0)."""
        cfg, lc = self.cfg, self.lc
        G, Pl = cfg.group_size, cfg.prompts_per_iter // self.world
        chunk = lc.gen_batch or Pl * G
        pool, good, rounds = [], 0, 0
        for r in range(1 + lc.max_refill_rounds):  # refill rounds
            g = iteration_generator(cfg.seed, it, self.rank, salt=97 + 7919 * r)
            chosen = torch.randint(len(self.train_rows), (Pl,), generator=g).repeat_interleave(G).tolist()
            n_chunks = math.ceil(len(chosen) / chunk)
            piece = self._generate(chosen, it, [self.rank * 10_007 + r * 101 + c for c in range(n_chunks)], chunk,
                                   salt=50_000 * (r + 1))
            pool.append(piece)
            rounds += 1
            local_group = torch.arange(Pl).repeat_interleave(G)
            keep = zero_variance_filter(piece.outcome.cpu(), local_group, valid=piece.valid.cpu())
            good += int(keep.view(Pl, G).any(dim=1).sum())
            if good >= Pl:
                break
        allp = TokenRollout.cat(pool, self.pad_id)
        n = len(allp) // G
        grp = torch.arange(n).repeat_interleave(G)
        varies = zero_variance_filter(allp.outcome.cpu(), grp, valid=allp.valid.cpu()).view(n, G).any(dim=1)
        order = torch.argsort((~varies).long(), stable=True)[:Pl]  # groups with signal first, in generation order
        rows = (order[:, None] * G + torch.arange(G)).flatten()
        group = it * cfg.prompts_per_iter + self.rank * Pl + torch.arange(Pl).repeat_interleave(G)
        m = {"dynamic/rounds": float(rounds), "dynamic/kept_frac": float(varies[order].float().mean()),
             "dynamic/signal_groups_per_round": good / rounds}
        return allp.select(rows), group, m

    def _finish(self, s: TokenRollout, group: Tensor, it: int, metrics: dict) -> Rollout:
        """Steps, process rewards, reference log-probs, penalties and shaping; the TrajectoryBatch."""
        lc, dev = self.lc, self.acc.device
        s.with_inputs()
        cm = s.comp_mask
        outcome, valid, correct = s.outcome.to(dev), s.valid.to(dev), s.correct.to(dev)
        b = cm.shape[0]
        step, nsteps = segment_steps(s.comp_ids, cm, self.pipe.tokenizer, how=lc.steps, pattern=lc.step_pattern,
                                     chunk_size=lc.step_chunk)
        S = max(int(nsteps.max()), 1)
        step_reward = None
        if self.process_reward is not None:
            texts = step_texts(s.comp_ids, cm, step, nsteps, self.pipe.tokenizer)
            sr = self.process_reward(s.prompts, texts, row_meta([self.train_rows[i] for i in s.row.tolist()]))
            sr = torch.as_tensor(sr, dtype=torch.float32).to(dev)
            if sr.dim() != 2 or sr.shape[0] != b or sr.shape[1] > S:
                raise ValueError(f"process reward returned shape {tuple(sr.shape)}; expected float [B, S<={S}] with B={b}")
            step_reward = torch.nn.functional.pad(sr, (0, S - sr.shape[1]), value=float("nan"))
        # behaviour log-probs: the sampler's own, or the trainer's recompute plus IS weights
        use_is = lc.is_correction == "always" or (lc.is_correction == "auto" and (s.sampler_logp is not None
                                                                                  or self.pipe.external_sampler))
        old_logp = s.logp
        s.is_w = None
        if use_is:
            with torch.no_grad():
                old_logp = self.logprobs(self.module, s).float()
            sampler_lp = s.sampler_logp if s.sampler_logp is not None else s.logp
            s.is_w, im = importance_weights(old_logp, sampler_lp, cm, level=lc.is_level, mode=lc.is_mode, c_max=lc.is_cmax)
            metrics.update({k: float(v) for k, v in im.items()})
        ref_logp = None
        if self.needs_ref:
            with torch.no_grad(), self.reference() as ref:
                ref_logp = self.logprobs(ref, s).float()
            kl = torch.where(cm, kl_estimate(old_logp, ref_logp, lc.kl_kind), torch.zeros((), device=dev))
            metrics["kl_ref"] = float(masked_mean(kl, cm))
            if lc.kl_in_reward > 0:
                outcome = outcome - lc.kl_in_reward * kl.sum(dim=1)
        lengths = cm.sum(dim=1)
        if lc.overlong_cache > 0:
            pen = soft_overlong_penalty(lengths, lc.max_new_tokens, lc.overlong_cache, lc.overlong_factor).to(dev)
            outcome = outcome + pen
            metrics["overlong/penalty_mean"] = float(pen.mean())
        mask = cm.clone()
        if lc.mask_truncated:
            mask &= ~s.truncated[:, None]
        keep = torch.ones_like(valid)
        if lc.shaping is not None:
            outcome, keep, sm = self._shape(outcome, correct, step_reward, group, valid, it)
            metrics.update(sm)
        mask &= (keep & valid)[:, None]
        batch = TrajectoryBatch(
            group=group, mask=mask, step=step, old_logp=old_logp.float(), outcome=outcome,
            outcome_parts={k: s.parts[k].to(dev) for k in self.reward.weights}, ref_logp=ref_logp,
            step_reward=step_reward, entropy=s.entropy, sample_valid=valid & keep,
        )
        metrics.update(merge_reward_metrics(s.reward_metrics))
        metrics.update(self._rollout_metrics(s, valid, correct, lengths, step_reward))
        metrics["reward"] = float(outcome[valid].mean()) if bool(valid.any()) else float("nan")
        return Rollout(batch=batch, side=s, metrics=metrics)

    def _rollout_metrics(self, s: TokenRollout, valid: Tensor, correct: Tensor, lengths: Tensor, step_reward) -> dict:
        v = valid
        n = v.float().sum().clamp_min(1)
        m = {"correct": float((correct & v).float().sum() / n), "response_length": float(lengths.float().mean()),
             "truncated_frac": float(s.truncated.float().mean())}
        for part, name in (("all_steps_correct", "all_steps_correct"), ("miracle", "miracle_rate")):
            key = f"{self.score_key}/{part}"
            if key in s.parts:
                x = s.parts[key].to(v.device)
                m[name] = float(torch.where(v, x, torch.zeros_like(x)).sum() / n)
        if step_reward is not None:
            fin = torch.isfinite(step_reward)
            m["step_score"] = float(step_reward[fin].mean()) if bool(fin.any()) else float("nan")
        if s.entropy is not None:
            m["entropy"] = float(masked_mean(s.entropy, s.comp_mask))
        return m

    def _shape(self, outcome: Tensor, correct: Tensor, step_reward: Optional[Tensor], group: Tensor, valid: Tensor,
               it: int) -> tuple[Tensor, Tensor, dict]:
        """Apply the registered shaper ``llm.shaping``: returns (outcome, keep bool [B], metrics)."""
        m: dict[str, float] = {}
        proc = None
        if step_reward is not None:
            proc, has = process_score(step_reward)
            m["shaping/no_step"] = float((~has).float().sum())
        x = ShapingInput(outcome=outcome, correct=correct, valid=valid, group=group, step_reward=step_reward,
                         process=proc, iteration=it, group_size=self.cfg.group_size)
        out = shape(self.lc.shaping, dict(self.lc.shaping_params), x)
        m.update(out.metrics)
        m["shaping/kept_frac"] = float((out.keep & valid).float().mean())
        return out.outcome, out.keep, m

    # ------------------------------------------------------------------ evaluation / export
    @torch.no_grad()
    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Greedy decoding on the fixed held-out set: ``accuracy`` (first reward's score >= correct_threshold),
        ``reward``, and for the arithmetic verifier ``miracle_rate``, ``all_steps_correct``, ``step_accuracy``;
        then sampled ``pass@k``, ``distinct_correct`` (:mod:`flowrl.train.llm_eval`) unless eval.pass_problems is 0."""
        lc = self.lc
        texts, parts_all, outs = [], [], []
        batches = range(0, len(self.eval_rows), 100)
        for i in tqdm(batches, desc="eval", leave=False, disable=not self.show_progress):  # eval batches
            data = self.eval_rows[i:i + 100]
            prompts = [d["prompt"] for d in data]
            g = self.pipe.generate(prompts, max_new_tokens=lc.max_new_tokens, temperature=0.0)
            t = self.pipe.decode(g)
            outcome, parts, valid, _ = self.reward.score(t, prompts, row_meta(data))
            texts += t
            outs.append(torch.where(valid, outcome, torch.zeros_like(outcome)).float())
            parts_all.append({k: v.float() for k, v in parts.items() if v.dtype != torch.bool})
        parts = {k: torch.cat([p[k] for p in parts_all]) for k in parts_all[0]}
        score = torch.nan_to_num(parts[self.score_key], nan=0.0)
        m = {"accuracy": float((score >= lc.correct_threshold).float().mean()), "reward": float(torch.cat(outs).mean())}
        for part, name in (("miracle", "miracle_rate"), ("all_steps_correct", "all_steps_correct"),
                           ("step_accuracy", "step_accuracy")):
            key = f"{self.score_key}/{part}"
            if key in parts:
                x = parts[key]
                m[name] = float(x[torch.isfinite(x)].mean()) if bool(torch.isfinite(x).any()) else float("nan")
        if self.acc.is_main_process:
            self._save_completions(step, out_dir, texts, torch.cat(outs), score >= lc.correct_threshold)
        m.update(pass_k_metrics(self))  # sampled: pass@k, distinct_correct (eval.pass_*; its own generator)
        return m

    def _save_completions(self, step: int, out_dir: Path, texts: list[str], reward: Tensor, correct: Tensor) -> None:
        """``samples/step_<step>.jsonl`` (every held-out completion: prompt, completion, reward, correct), the
        first 8 as ``.txt``, and the first ``eval.table_rows`` as a table to the trackers."""
        from flowrl.train import visuals

        d = out_dir / "samples"
        d.mkdir(parents=True, exist_ok=True)
        cols = ["prompt", "completion", "reward", "correct"]
        rows = [[self.eval_rows[i]["prompt"], texts[i], float(reward[i]), bool(correct[i])] for i in range(len(texts))]
        visuals.write_table(d / f"step_{step:05d}.jsonl", cols, rows)
        lines = [f"{r[0]!r} -> {r[1]!r}" for r in rows[:8]]
        (d / f"step_{step:05d}.txt").write_text("\n".join(lines) + "\n")
        if self.cfg.eval.table_rows:
            visuals.log_table(self.acc, "eval/completions", cols, rows[:self.cfg.eval.table_rows], step)

    def report_plan(self):
        """The report of an LLM run: held-out accuracy against the reward, miracle steps and all-steps-correct
        (the last two where the verifier scores steps, e.g. arithmetic), sampled pass@k and distinct correct
        completions against the base model's (eval.pass_*); no judge or realism."""
        from flowrl.train.report import ReportPlan

        ec = self.cfg.eval
        sampled = tuple(f"pass@{k}" for k in ec.pass_k) + ("distinct_correct",) if ec.pass_problems else ()
        return ReportPlan(metrics=("reward", "accuracy", "miracle_rate", "all_steps_correct", "step_accuracy") + sampled,
                          checks=("accuracy", "miracle_steps", "all_steps_correct", "pass_at_k", "distinct_correct"),
                          source="the LLM task (greedy decoding of the held-out set)")

    def export(self, out_dir: Path, state: Optional[dict] = None) -> None:
        """The adapter's export; ``state``: the model's whole state dict when it is sharded (FSDP), gathered."""
        self.pipe.export(out_dir) if state is None else self.pipe.export(out_dir, state=state)

    def load_export(self, out_dir: Path) -> None:
        """Load what :meth:`export` wrote (a finished run's trained weights) into the model."""
        self.pipe.load_export(out_dir)
