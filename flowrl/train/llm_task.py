"""The LLM half of training: token rollouts, verifiable rewards, process rewards, teacher-forced log-probs.

Every algorithm is a config over the one loop (``flowrl.train.loop``) and the core; ``configs/arith/*.yaml``:

- ``llm_grpo``: the GRPO family. The estimator (``advantage.estimator``: grpo, dr_grpo, rloo, reinforce_pp,
  dual_level, ...) and the loss (``loss.name``: ppo_clip with clip-higher / dual-clip, gspo, ...) come from the
  config; several updates per rollout are ``updates_per_rollout`` x ``minibatches``. Options of ``llm``:
  KL to the reference (LoRA disabled, or a frozen copy of the initial weights) with k1/k2/k3 in the reward
  (``kl_in_reward``: r_i <- r_i - c * sum_t KL_t) or in the loss (``loss.kl_beta``: + beta * agg(KL_t));
  DAPO dynamic sampling with refill (``dynamic_sampling``), the soft overlong penalty (``overlong_cache``),
  truncated-completion masking (``mask_truncated``); a process reward scoring each step (``process_reward``,
  e.g. the embedded step verifier ``arithmetic_steps``) fills ``TrajectoryBatch.step_reward`` for the
  step-level estimators (dual_level, step_returns, ...); shaping before the estimator (``shaping``: PROF
  filter, Posterior-GRPO gate, Trust-GRPO weight, PRIME's accuracy band).
- ``llm_prime``: PRIME (Cui et al. 2025). A second model, the implicit PRM pi_phi (a copy of the initial
  policy), is trained online on every rollout with ``implicit_prm_loss`` from the outcome labels
  (before or after its rewards are read, ``llm.prm_update``); its log-probs feed the ``prime`` estimator
  (q_t = beta * (log pi_phi - log pi_ref), RLOO per source, whitened).

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
import copy
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from flowrl.core import (
    TrajectoryBatch, accuracy_band_filter, aggregate, compute_advantages, compute_policy_loss,
    importance_weights, kl_estimate, soft_overlong_penalty, zero_variance_filter,
)
from flowrl.core.credit import implicit_prm_loss
from flowrl.core.losses import masked_mean
from flowrl.core.process_shaping import posterior_gate, prof_filter, trust_weight
from flowrl.llm.generate import token_logprobs
from flowrl.llm.steps import segment_steps, step_texts
from flowrl.train.config import TrainConfig
from flowrl.train.loop import Rollout, iteration_generator

LLM_ALGORITHMS = ("llm_grpo", "llm_prime")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHAPERS = ("prof", "posterior_gate", "trust_weight", "accuracy_band")


# ----------------------------------------------------------------------------- data
def load_dataset(cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows); a row is ``{"prompt": str, "meta": dict or None}`` (+ reasoning-gym fields)."""
    lc = cfg.llm
    if lc.dataset_size < 1:
        raise ValueError(f"llm.dataset_size={lc.dataset_size}: the training dataset is empty; it needs >= 1 problem")
    if lc.eval_size < 1:
        raise ValueError(f"llm.eval_size={lc.eval_size}: the evaluation set is empty; it needs >= 1 problem")
    if lc.dataset == "arithmetic":
        from flowrl.pipelines.arithmetic import make_problems, prompt_text

        train = [{"prompt": prompt_text(a, b)} for a, b in make_problems(lc.dataset_size, split="train",
                                                                           seed=lc.data_seed, digits=lc.digits)]
        ev = [{"prompt": prompt_text(a, b)} for a, b in make_problems(lc.eval_size, split="heldout",
                                                                        seed=cfg.eval.seed, digits=lc.digits)]
        return train, ev
    from flowrl.rewards.reasoning_gym_tasks import DEFAULT_TEMPLATE, make_task_dataset

    tpl = lc.template or DEFAULT_TEMPLATE
    fmt = lc.prompt_format
    train = make_task_dataset(lc.task, size=lc.dataset_size, seed=lc.data_seed, template=tpl, prompt_format=fmt,
                              **lc.task_options)
    ev = make_task_dataset(lc.task, size=lc.eval_size, seed=10_000_019 + cfg.eval.seed, template=tpl, prompt_format=fmt,
                           **lc.task_options)
    return train, ev


def _meta(rows: list[dict]) -> Optional[dict]:
    if "entry" not in rows[0]:
        return None
    from flowrl.rewards.reasoning_gym_tasks import task_meta

    return task_meta(rows)


def _pad_cat(pieces: list[dict], pad_id: int) -> dict:
    """Concatenate generation pieces along rows: prompts re-padded on the left, completions on the right."""
    P = max(p["prompt_ids"].shape[1] for p in pieces)
    T = max(p["comp_ids"].shape[1] for p in pieces)
    out: dict[str, Any] = {}

    def left(t: Tensor, width: int, value) -> Tensor:
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    def right(t: Tensor, width: int, value) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    out["prompt_ids"] = torch.cat([left(p["prompt_ids"], P, pad_id) for p in pieces])
    out["prompt_mask"] = torch.cat([left(p["prompt_mask"], P, False) for p in pieces])
    out["comp_ids"] = torch.cat([right(p["comp_ids"], T, pad_id) for p in pieces])
    for k in ("comp_mask",):
        out[k] = torch.cat([right(p[k], T, False) for p in pieces])
    for k in ("logp", "entropy", "sampler_logp"):
        vals = [p.get(k) for p in pieces]
        out[k] = None if any(v is None for v in vals) else torch.cat([right(v, T, 0.0) for v in vals])
    for k in ("truncated", "outcome", "valid", "correct", "row"):
        out[k] = torch.cat([p[k] for p in pieces])
    out["parts"] = {k: torch.cat([p["parts"][k] for p in pieces]) for k in pieces[0]["parts"]}
    for k in ("texts", "prompts"):
        out[k] = [x for p in pieces for x in p[k]]
    out["temperature"] = pieces[0]["temperature"]
    out["reward_metrics"] = [x for p in pieces for x in p["reward_metrics"]]
    return out


def _merge_reward_metrics(items: list[tuple[int, dict]]) -> dict[str, float]:
    """Reward metrics of several scored chunks: invalid counts add up, means are weighted by rows."""
    out: dict[str, float] = {}
    keys = {k for _, m in items for k in m}
    for k in sorted(keys):
        vals = [(n, m[k]) for n, m in items if k in m]
        if k.endswith("invalid"):
            out[k] = float(sum(v for _, v in vals))
        else:
            fin = [(n, v) for n, v in vals if math.isfinite(v)]
            out[k] = sum(n * v for n, v in fin) / sum(n for n, _ in fin) if fin else float("nan")
    return out


def _take(d: dict, idx: Tensor) -> dict:
    """Rows ``idx`` (long) of a piece."""
    out = dict(d)
    il = idx.tolist()
    for k, v in d.items():
        if isinstance(v, Tensor):
            out[k] = v[idx.to(v.device)]
        elif isinstance(v, list) and k != "reward_metrics":
            out[k] = [v[i] for i in il]
        elif isinstance(v, dict):
            out[k] = {kk: vv[idx.to(vv.device)] for kk, vv in v.items()}
    return out


class LLMTask:
    """See the module docstring. ``module`` is the causal LM (a peft model under LoRA)."""

    def __init__(self, cfg: TrainConfig, accelerator):
        if cfg.algorithm not in LLM_ALGORITHMS:
            raise ValueError(f"algorithm {cfg.algorithm!r} is not an LLM algorithm; valid: {LLM_ALGORITHMS}")
        self.cfg, self.lc, self.acc = cfg, cfg.llm, accelerator
        lc = self.lc
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        P, G = cfg.prompts_per_iter, cfg.group_size
        if P < 1 or G < 1:
            raise ValueError(f"prompts_per_iter={P} and group_size={G} must both be >= 1")
        B = P * G
        if B % self.world:
            raise ValueError(f"prompts_per_iter * group_size = {B} must be divisible by the number of processes {self.world}")
        whole_groups = lc.dynamic_sampling or lc.shaping is not None
        if whole_groups and P % self.world:
            raise ValueError(f"llm.dynamic_sampling / llm.shaping work on whole groups per process: prompts_per_iter={P} "
                             f"must be divisible by the number of processes {self.world}")
        if lc.max_new_tokens < 1:
            raise ValueError(f"llm.max_new_tokens={lc.max_new_tokens}; must be >= 1")
        if lc.temperature <= 0:
            raise ValueError(f"llm.temperature={lc.temperature}; rollouts sample, so it must be > 0 (evaluation is greedy)")
        if lc.gen_batch < 0:
            raise ValueError(f"llm.gen_batch={lc.gen_batch}; must be >= 0 (0: one generate call per rank)")
        if lc.overlong_cache < 0 or lc.overlong_cache > lc.max_new_tokens:
            raise ValueError(f"llm.overlong_cache={lc.overlong_cache} must lie in [0, llm.max_new_tokens={lc.max_new_tokens}]")
        if lc.shaping in ("prof", "posterior_gate", "trust_weight") and lc.process_reward is None:
            raise ValueError(f"llm.shaping={lc.shaping!r} needs llm.process_reward (the step scores it gates/filters on)")
        if cfg.algorithm == "llm_prime" and cfg.advantage.estimator != "prime":
            raise ValueError(f"algorithm llm_prime feeds the implicit PRM to the 'prime' estimator; set advantage.estimator=prime "
                             f"(got {cfg.advantage.estimator!r})")
        if cfg.advantage.estimator == "prime" and cfg.algorithm != "llm_prime":
            raise ValueError("advantage.estimator=prime needs algorithm=llm_prime (the implicit PRM trained online)")
        if lc.kl_in_reward < 0 or cfg.loss.kl_beta < 0:
            raise ValueError(f"llm.kl_in_reward={lc.kl_in_reward} and loss.kl_beta={cfg.loss.kl_beta} must be >= 0")
        self.train_rows, self.eval_rows = load_dataset(cfg)

        dev, dtype = accelerator.device, _DTYPES[lc.dtype]
        lora = None
        if cfg.lora.enabled:
            lora = {"r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
                    "target_modules": list(cfg.lora.target_modules) or "all-linear"}
        if lc.model in ("arithmetic", "countdown"):  # the embedded models, shipped in the package
            if lc.model == "arithmetic":
                from flowrl.pipelines.arithmetic import load_arithmetic as load_embedded
            else:
                from flowrl.pipelines.countdown import load_countdown as load_embedded

            self.pipe = load_embedded(lc.model_path, dtype=dtype, device=dev, lora=lora)
        else:
            from flowrl.pipelines.causal_lm import load_causal_lm

            self.pipe = load_causal_lm(lc.model, dtype=dtype, device=dev, lora=lora, chat_template=lc.chat_template,
                                       backend=lc.backend)
        if lc.backend == "vllm" and self.pipe.vllm is None:
            raise ValueError("llm.backend=vllm needs a model loaded through load_causal_lm (set llm.model to a path/hub id)")
        self.module: nn.Module = self.pipe.model
        if cfg.gradient_checkpointing:
            self.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not cfg.lora.enabled:
            self.module.requires_grad_(True)
        self.module.train()
        self._fwd: nn.Module = self.module
        self.needs_ref = (cfg.loss.kl_beta > 0 or lc.kl_in_reward > 0 or cfg.algorithm == "llm_prime"
                          or float(cfg.advantage.params.get("kl_coef", 0.0)) > 0)
        self._ref = None
        if self.needs_ref and not cfg.lora.enabled:
            self._ref = copy.deepcopy(self.module).requires_grad_(False).eval()
        self.prm = self.prm_opt = None
        if cfg.algorithm == "llm_prime":  # the implicit PRM: a second model, initialised from the policy
            self.prm = copy.deepcopy(self.module).train()
            self.prm_opt = torch.optim.AdamW([p for p in self.prm.parameters() if p.requires_grad], lr=lc.prm_lr)

        from flowrl.rewards import build_process_reward, build_rewards

        spec = dict(lc.rewards) or {("arithmetic" if lc.dataset == "arithmetic" else "reasoning_gym"): {"weight": 1.0}}
        self.reward = build_rewards(spec)
        self.score_key = next(iter(self.reward.weights))
        self.process_reward = None
        if lc.process_reward:
            pr = dict(lc.process_reward)
            if "type" not in pr:
                raise ValueError(f"llm.process_reward needs a 'type' (a registered process reward); got {lc.process_reward}")
            self.process_reward = build_process_reward(pr.pop("type"), **pr)
        self.pad_id = int(self.pipe.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ model plumbing
    def set_forward_module(self, module: nn.Module) -> None:
        """Forward the training pass through the (DDP/FSDP-)wrapped model so gradients are synchronised."""
        self._fwd = module

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the model with its LoRA adapters disabled, or the frozen initial copy."""
        if self.cfg.lora.enabled:
            with self.module.disable_adapter():
                yield self.module
        else:
            yield self._ref

    def _logp(self, model, s: dict, rows: Optional[Tensor] = None) -> Tensor:
        ids, am, cm = s["input_ids"], s["attention_mask"], s["comp_mask"]
        if rows is not None:
            ids, am, cm = ids[rows], am[rows], cm[rows]
        return token_logprobs(model, ids, am, cm, temperature=s["temperature"])

    # ------------------------------------------------------------------ rollout
    def _generate(self, rows: list[int], it: int, chunk_ids: list[int], chunk: int, salt: int) -> dict:
        """Sample and score dataset rows ``rows`` in chunks of ``chunk`` rows; chunk k is seeded from
        ``(seed, it, chunk_ids[k], salt)``. Returns a piece (tensors on the device, texts, rewards)."""
        lc, pieces = self.lc, []
        for k, start in enumerate(range(0, len(rows), chunk)):
            sub = rows[start:start + chunk]
            data = [self.train_rows[i] for i in sub]
            prompts = [d["prompt"] for d in data]
            gen = iteration_generator(self.cfg.seed, it, 0, salt=salt + 1000 + chunk_ids[k])
            g = self.pipe.generate(prompts, max_new_tokens=lc.max_new_tokens, temperature=lc.temperature,
                                   top_k=lc.top_k, top_p=lc.top_p, generator=gen)
            texts = self.pipe.decode(g)
            outcome, parts, valid, rm = self.reward.score(texts, prompts, _meta(data))
            score = parts[self.score_key].float()
            correct = torch.where(valid, score >= lc.correct_threshold, torch.zeros_like(valid))
            pieces.append({
                "prompt_ids": g.prompt_ids, "prompt_mask": g.prompt_mask, "comp_ids": g.completion_ids,
                "comp_mask": g.completion_mask, "logp": g.logp, "entropy": g.entropy, "sampler_logp": g.sampler_logp,
                "truncated": g.truncated, "outcome": outcome.float(), "valid": valid, "correct": correct,
                "parts": {kk: v.float() for kk, v in parts.items() if v.dtype != torch.bool},
                "row": torch.tensor(sub, dtype=torch.long), "texts": texts, "prompts": prompts,
                "temperature": g.temperature, "reward_metrics": [(len(sub), rm)],
            })
        return _pad_cat(pieces, self.pad_id)

    def _sync_vllm(self) -> None:
        if self.pipe.vllm is None:
            return
        if self.cfg.lora.enabled:
            self.module.merge_adapter()
            try:
                state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                         for k, v in self.module.state_dict().items() if "lora_" not in k}
                self.pipe.vllm.load_weights(state)
            finally:
                self.module.unmerge_adapter()
        else:
            self.pipe.vllm.load_weights(self.module.state_dict())

    def rollout(self, it: int, generator: torch.Generator) -> Rollout:
        cfg, lc = self.cfg, self.lc
        P, G = cfg.prompts_per_iter, cfg.group_size
        B = P * G
        b = B // self.world
        if it > 0 or self.pipe.vllm is not None:
            self._sync_vllm()
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

    def _dynamic_rollout(self, it: int) -> tuple[dict, Tensor, dict]:
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
            keep = zero_variance_filter(piece["outcome"].cpu(), local_group, valid=piece["valid"].cpu())
            good += int(keep.view(Pl, G).any(dim=1).sum())
            if good >= Pl:
                break
        allp = _pad_cat(pool, self.pad_id)
        n = len(allp["texts"]) // G
        grp = torch.arange(n).repeat_interleave(G)
        varies = zero_variance_filter(allp["outcome"].cpu(), grp, valid=allp["valid"].cpu()).view(n, G).any(dim=1)
        order = torch.argsort((~varies).long(), stable=True)[:Pl]  # groups with signal first, in generation order
        rows = (order[:, None] * G + torch.arange(G)).flatten()
        piece = _take(allp, rows)
        group = it * cfg.prompts_per_iter + self.rank * Pl + torch.arange(Pl).repeat_interleave(G)
        m = {"dynamic/rounds": float(rounds), "dynamic/kept_frac": float(varies[order].float().mean()),
             "dynamic/signal_groups_per_round": good / rounds}
        return piece, group, m

    def _finish(self, s: dict, group: Tensor, it: int, metrics: dict) -> Rollout:
        """Steps, process rewards, reference log-probs, penalties and shaping; the TrajectoryBatch."""
        lc = self.lc
        dev = self.acc.device
        s["input_ids"] = torch.cat([s["prompt_ids"], s["comp_ids"]], dim=1)
        s["attention_mask"] = torch.cat([s["prompt_mask"], s["comp_mask"]], dim=1).long()
        cm = s["comp_mask"]
        outcome, valid, correct = s["outcome"].to(dev), s["valid"].to(dev), s["correct"].to(dev)
        b = cm.shape[0]
        step, nsteps = segment_steps(s["comp_ids"], cm, self.pipe.tokenizer, how=lc.steps, pattern=lc.step_pattern,
                                     chunk_size=lc.step_chunk)
        S = max(int(nsteps.max()), 1)
        step_reward = None
        if self.process_reward is not None:
            texts = step_texts(s["comp_ids"], cm, step, nsteps, self.pipe.tokenizer)
            sr = self.process_reward(s["prompts"], texts, _meta([self.train_rows[i] for i in s["row"].tolist()]))
            sr = torch.as_tensor(sr, dtype=torch.float32).to(dev)
            if sr.dim() != 2 or sr.shape[0] != b or sr.shape[1] > S:
                raise ValueError(f"process reward returned shape {tuple(sr.shape)}; expected float [B, S<={S}] with B={b}")
            step_reward = torch.nn.functional.pad(sr, (0, S - sr.shape[1]), value=float("nan"))
        # behaviour log-probs: the sampler's own, or the trainer's recompute plus IS weights
        sampler = s["sampler_logp"] if s["sampler_logp"] is not None else None
        use_is = lc.is_correction == "always" or (lc.is_correction == "auto" and (sampler is not None or self.pipe.vllm is not None))
        old_logp = s["logp"]
        s["is_w"] = None
        if use_is:
            with torch.no_grad():
                old_logp = self._logp(self.module, s).float()
            sampler_lp = sampler if sampler is not None else s["logp"]
            s["is_w"], im = importance_weights(old_logp, sampler_lp, cm, level=lc.is_level, mode=lc.is_mode, c_max=lc.is_cmax)
            metrics.update({k: float(v) for k, v in im.items()})
        ref_logp = None
        if self.needs_ref:
            with torch.no_grad(), self.reference() as ref:
                ref_logp = self._logp(ref, s).float()
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
            mask &= ~s["truncated"][:, None]
        keep = torch.ones_like(valid)
        if lc.shaping is not None:
            outcome, keep, sm = self._shape(outcome, correct, step_reward, group, valid, it)
            metrics.update(sm)
        mask &= (keep & valid)[:, None]
        batch = TrajectoryBatch(
            group=group, mask=mask, step=step, old_logp=old_logp.float(), outcome=outcome,
            outcome_parts={k: s["parts"][k].to(dev) for k in self.reward.weights}, ref_logp=ref_logp,
            step_reward=step_reward, entropy=s["entropy"], sample_valid=valid & keep,
        )
        metrics.update(_merge_reward_metrics(s["reward_metrics"]))
        metrics.update(self._rollout_metrics(s, valid, correct, lengths, step_reward))
        metrics["reward"] = float(outcome[valid].mean()) if bool(valid.any()) else float("nan")
        return Rollout(batch=batch, side=s, metrics=metrics)

    def _rollout_metrics(self, s: dict, valid: Tensor, correct: Tensor, lengths: Tensor, step_reward) -> dict:
        v = valid
        n = v.float().sum().clamp_min(1)
        m = {"correct": float((correct & v).float().sum() / n), "response_length": float(lengths.float().mean()),
             "truncated_frac": float(s["truncated"].float().mean())}
        for part, name in (("all_steps_correct", "all_steps_correct"), ("miracle", "miracle_rate")):
            key = f"{self.score_key}/{part}"
            if key in s["parts"]:
                x = s["parts"][key].to(v.device)
                m[name] = float(torch.where(v, x, torch.zeros_like(x)).sum() / n)
        if step_reward is not None:
            fin = torch.isfinite(step_reward)
            m["step_score"] = float(step_reward[fin].mean()) if bool(fin.any()) else float("nan")
        if s["entropy"] is not None:
            m["entropy"] = float(masked_mean(s["entropy"], s["comp_mask"]))
        return m

    def _shape(self, outcome: Tensor, correct: Tensor, step_reward: Optional[Tensor], group: Tensor, valid: Tensor,
               it: int) -> tuple[Tensor, Tensor, dict]:
        """Apply ``llm.shaping``: returns (outcome, keep bool [B], metrics). Completions with no scored step
        (only an answer line) have process score 0: they contain no right step; counted in ``shaping/no_step``."""
        lc, p = self.lc, dict(self.lc.shaping_params)
        keep = torch.ones_like(valid)
        m: dict[str, float] = {}
        proc = None
        if step_reward is not None:
            has = torch.isfinite(step_reward).any(dim=1)
            proc = torch.where(has, torch.nan_to_num(step_reward, nan=0.0).sum(1) / torch.isfinite(step_reward).sum(1).clamp_min(1),
                               torch.zeros_like(outcome))
            m["shaping/no_step"] = float((~has).float().sum())
        if lc.shaping == "prof":
            sr = step_reward.clone()
            sr[:, 0] = torch.where(torch.isfinite(sr).any(dim=1), sr[:, 0], torch.zeros_like(sr[:, 0]))
            keep = prof_filter(correct, sr, group, keep=int(p.pop("keep", max(1, self.cfg.group_size // 2))),
                               valid=valid, **p)
        elif lc.shaping == "posterior_gate":
            outcome = torch.where(valid, posterior_gate(torch.where(valid, outcome, torch.zeros_like(outcome)), proc, correct, **p),
                                  outcome)
        elif lc.shaping == "trust_weight":
            w = trust_weight(correct, proc, group, step=float(it), **p)
            outcome = outcome + w * proc
            m["shaping/trust_weight_mean"] = float(w.mean())
        elif lc.shaping == "accuracy_band":
            keep = accuracy_band_filter(correct, group, valid=valid, **p)
        m["shaping/kept_frac"] = float((keep & valid).float().mean())
        return outcome, keep, m

    # ------------------------------------------------------------------ updates
    def prepare_update(self, roll: Rollout, batch: TrajectoryBatch, adv: Tensor, it: int):
        if self.prm is None:
            return adv, {}
        return self._prime(roll, batch, it)

    def _prime(self, roll: Rollout, batch: TrajectoryBatch, it: int):
        """PRIME: train the implicit PRM on this rollout (BCE of beta * sum_t (log pi_phi - log pi_ref) against the
        outcome labels) and read its token log-probs for the ``prime`` estimator, before or after the update."""
        s, lc = roll.side, self.lc
        labels = s["correct"].to(batch.device).float()
        mask = batch.mask & batch.valid[:, None]

        def read() -> Tensor:
            with torch.no_grad():
                return self._logp(self.prm, s).float()

        def update() -> dict:
            lp = self._logp(self.prm, s)
            loss, m = implicit_prm_loss(lp, batch.ref_logp, mask, labels, beta=lc.prm_beta)
            self.prm_opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.world > 1:
                for prm_p in self.prm.parameters():
                    if prm_p.grad is not None:
                        torch.distributed.all_reduce(prm_p.grad)
                        prm_p.grad /= self.world
            if self.cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([q for q in self.prm.parameters() if q.requires_grad], self.cfg.optim.grad_clip)
            self.prm_opt.step()
            return {k: float(v) for k, v in m.items()}

        if lc.prm_update == "before":
            m = update()
            prm_lp = read()
        else:
            prm_lp = read()
            m = update()
        params = {"beta": lc.prm_beta, **self.cfg.advantage.params}
        adv = compute_advantages("prime", batch, prm_logp=prm_lp, **params)
        return adv, m

    def backward(self, roll: Rollout, index: Tensor, batch: TrajectoryBatch, adv: Tensor, it: int) -> dict:
        cfg, s = self.cfg, roll.side
        idx = index.to(s["input_ids"].device)
        logp = self._logp(self._fwd, s, idx)
        kw = dict(cfg.loss.params)
        if s.get("is_w") is not None:
            kw["is_weights"] = s["is_w"][idx]
        if cfg.loss.agg == "seq_mean_token_sum_norm":
            kw.setdefault("max_len", self.lc.max_new_tokens)
        loss, lm = compute_policy_loss(cfg.loss.name, logp, batch.old_logp, adv, batch.mask, agg=cfg.loss.agg, **kw)
        if cfg.loss.kl_beta > 0:
            kl = aggregate(kl_estimate(logp, batch.ref_logp, self.lc.kl_kind), batch.mask, cfg.loss.agg,
                           max_len=self.lc.max_new_tokens)
            loss = loss + cfg.loss.kl_beta * kl
            lm["policy/kl"] = kl.detach()
        self.acc.backward(loss)
        out = {k: float(v) for k, v in lm.items()}
        out["policy/loss"] = float(loss.detach())
        return out

    # ------------------------------------------------------------------ evaluation / export
    @torch.no_grad()
    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Greedy decoding on the fixed held-out set: ``accuracy`` (first reward's score >= correct_threshold),
        ``reward``, and for the arithmetic verifier ``miracle_rate``, ``all_steps_correct``, ``step_accuracy``."""
        lc = self.lc
        texts, parts_all, outs = [], [], []
        for i in range(0, len(self.eval_rows), 100):  # eval batches
            data = self.eval_rows[i:i + 100]
            prompts = [d["prompt"] for d in data]
            g = self.pipe.generate(prompts, max_new_tokens=lc.max_new_tokens, temperature=0.0)
            t = self.pipe.decode(g)
            outcome, parts, valid, _ = self.reward.score(t, prompts, _meta(data))
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
            d = out_dir / "samples"
            d.mkdir(parents=True, exist_ok=True)
            lines = [f"{self.eval_rows[i]['prompt']!r} -> {texts[i]!r}" for i in range(min(8, len(texts)))]
            (d / f"step_{step:05d}.txt").write_text("\n".join(lines) + "\n")
        return m

    def extra_state(self) -> dict:
        if self.prm is None:
            return {}
        return {"prm": {k: v for k, v in self.prm.state_dict().items()}, "prm_opt": self.prm_opt.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.prm is not None and state:
            self.prm.load_state_dict(state["prm"])
            self.prm_opt.load_state_dict(state["prm_opt"])

    def export(self, out_dir: Path) -> None:
        if self.cfg.lora.enabled:
            self.module.save_pretrained(str(out_dir / "lora"))
        else:
            self.module.save_pretrained(str(out_dir / "model"), safe_serialization=True)
            self.pipe.tokenizer.save_pretrained(str(out_dir / "model"))
