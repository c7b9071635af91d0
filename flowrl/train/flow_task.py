"""The flow-model half of training: prompts, rollouts through the SDE sampler, rewards, the TrajectoryBatch,
evaluation, sample grids and export. What an algorithm adds (step rewards, a critic, its update) comes from
the registered flow algorithm's hooks (:class:`flowrl.train.algorithms.flow_base.FlowAlgorithm`); what a model
does comes from its adapter through :class:`flowrl.flow.pipeline.FlowPipeline`. Neither is named here.

The batch: one action per trained denoising step (T = trained steps, ``step[b, t] = t``) with the kernel's
log-prob as ``old_logp``; ``outcome`` is the combined outcome reward and ``step_reward`` whatever the algorithm's
``step_rewards`` returns. Beside the batch, ``side`` holds the trajectory (``traj``), the trained steps
(``steps`` long [T], or long [b, T] with ``flow.timestep_subset: sample``: row b's own steps) and the rank's
prompts, for the algorithm's update.

Distribution: the global batch (P prompts x G samples) is split into contiguous row blocks, one per
rank; the noise of every row is drawn for the global batch from the iteration's seed, so R ranks sample
exactly what one process samples and the core's group statistics (gathered) are the global ones.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from flowrl.core import TrajectoryBatch
from flowrl.core.dtypes import torch_dtype
from flowrl.flow.guidance import Guidance
from flowrl.flow.pipeline import OwnEvaluation, OwnReport, PromptDefaults, SavesPretrained, cond_select
from flowrl.flow.sampler import progress_bars
from flowrl.flow.chunks import rollout_in_chunks
from flowrl.pipelines.registry import load_pipeline
from flowrl.train.config import TrainConfig
from flowrl.train.flow_data import PromptSet, load_prompt_sets
from flowrl.train.task import Rollout, TaskBase, iteration_generator


class FlowTask(TaskBase):
    """See the module docstring. ``module`` is the adapter's trainable network (``pipe.trainable``)."""

    def __init__(self, cfg: TrainConfig, accelerator, algorithm: Any = None):
        if algorithm is None:
            from flowrl.train.algorithms import ALGORITHMS

            algorithm = ALGORITHMS[cfg.algorithm](cfg)
        if getattr(algorithm, "family", None) != "flow":
            raise ValueError(f"algorithm {cfg.algorithm!r} is not a flow algorithm (family "
                             f"{getattr(algorithm, 'family', None)!r}); FlowTask runs subclasses of FlowAlgorithm")
        algorithm.validate_config(cfg)
        self.cfg, self.fc, self.acc, self.algorithm = cfg, cfg.flow, accelerator, algorithm
        self.show_progress = bool(cfg.progress and accelerator.is_main_process)
        B = cfg.prompts_per_iter * cfg.group_size
        if B % self.world:
            raise ValueError(f"prompts_per_iter * group_size = {B} must be divisible by the number of processes {self.world}")
        train_set, eval_set = load_prompt_sets(cfg)  # flowrl.train.flow_data: files, datasets, metadata columns
        from flowrl.rewards.base import hub_guard

        # a model that is neither cached nor reachable: one sentence naming it, not the hub's traceback
        with hub_guard(str(self.fc.model_path), "log in (`huggingface-cli login`) for a gated model, or set "
                       "flow.model_path to a local diffusers folder"):
            self.pipe = load_pipeline(self.fc.model, self.fc.model_path, family="flow", device=accelerator.device,
                                      dtype=torch_dtype(self.fc.dtype, who="flow.dtype"), **self.fc.model_kwargs)
        if self.fc.decode_batch:
            if not hasattr(self.pipe, "decode_batch"):
                raise ValueError(f"flow.decode_batch={self.fc.decode_batch}: the model adapter {self.fc.model!r} has no "
                                 "decode_batch attribute (FlowAdapterBase's chunked decode); set flow.decode_batch=0")
            self.pipe.decode_batch = self.fc.decode_batch
        if train_set is None:
            if not isinstance(self.pipe, PromptDefaults):
                raise ValueError(f"no training prompts: set flow.prompts or flow.prompt_file (the model adapter "
                                 f"{self.fc.model!r} has no default prompts)")
            train_set = PromptSet([{"prompt": p} for p in self.pipe.default_prompts()], source="the adapter's own")
        self.prompt_set, self.eval_set = train_set, eval_set or train_set
        self.prompts, self.eval_prompts = train_set.prompts, self.eval_set.prompts
        if cfg.lora.enabled:
            self.pipe.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules or None)
            if cfg.lora.init_from:  # continue from an existing LoRA: its weights in the trained adapter
                from flowrl.pipelines.lora import load_lora_into

                load_lora_into(self.pipe.trainable, cfg.lora.init_from)
            if cfg.lora.fp32_params:  # LoRA in fp32 over the bf16/fp16 base (a no-op for an fp32 model)
                from flowrl.pipelines.lora import upcast_trainable

                upcast_trainable(self.pipe.trainable)
        else:
            self.pipe.trainable.requires_grad_(True)
        self.module: nn.Module = self.pipe.trainable
        if cfg.gradient_checkpointing:
            self.pipe.enable_gradient_checkpointing()
        self.module.train()
        self.init_reference(algorithm.needs_reference(cfg))

        from flowrl.rewards import build_process_reward, build_rewards

        self.reward = build_rewards(self.fc.rewards)
        self.process_reward = None
        if self.fc.process_reward:
            spec = dict(self.fc.process_reward)
            self.process_reward = build_process_reward(spec.pop("type"), **spec)
        self.guidance = None
        if algorithm.uses_guidance(cfg):
            g = self.fc.guidance
            self.guidance = Guidance(self.process_reward, scale=g.scale, kl_beta=g.kl_beta, normalize=g.normalize,
                                     window=tuple(g.window) if g.window else None, estimator=g.estimator,
                                     logprob_mean=g.logprob_mean)
        from flowrl.train.flow_diversity import DiversityBonuses, SampleSubset

        if (self.fc.diversity_bonus or self.fc.sample_subset) and (B // self.world) % cfg.group_size:
            raise ValueError(f"flow.diversity_bonus and flow.sample_subset compare the samples of a group, which must be "
                             f"on one process: prompts_per_iter * group_size / processes = {B // self.world} is not a "
                             f"multiple of group_size={cfg.group_size}")
        self.diversity = DiversityBonuses(self.fc.diversity_bonus)
        self.subset = SampleSubset(self.fc.sample_subset)
        from flowrl.train.flow_eval import eval_features

        # eval.diversity_features: built once (a CLIP model, say); None where nothing is measured: the adapter
        # evaluates itself, or one sample per prompt has no pair to compare
        measured = not isinstance(self.pipe, OwnEvaluation) and cfg.eval.num_per_prompt >= 2
        self.eval_features = eval_features(cfg.eval.diversity_features) if measured else None
        algorithm.setup(self)

    # ------------------------------------------------------------------ model plumbing
    def set_forward_module(self, module: nn.Module) -> None:
        """Route the adapter's forward pass through the (DDP/FSDP-)wrapped module."""
        self.pipe.set_forward_module(module)

    @contextlib.contextmanager
    def reference(self):
        """The reference policy as a pipeline: LoRA disabled, or the frozen copy of the initial weights."""
        if self.cfg.lora.enabled:
            with self.pipe.lora_disabled() as pipe:
                yield pipe
        else:
            if self.reference_module is None:
                raise RuntimeError(f"algorithm {self.cfg.algorithm!r} asked for the reference policy, but its "
                                   "needs_reference(cfg) is False, so no reference copy was kept")
            with self.pipe.using_weights(self.reference_module) as pipe:
                yield pipe

    # ------------------------------------------------------------------ rollout
    def _global_noise(self, B: int, K: int, gen: torch.Generator, group: int) -> Tensor:
        x = self.pipe.initial_noise(B * (K + 1), generator=gen)
        noise = x.view(B, K + 1, *x.shape[1:])
        if self.fc.same_noise_per_prompt:
            noise[:, 0] = noise[::group, 0].repeat_interleave(group, dim=0)
        return noise

    def rollout(self, it: int, generator: torch.Generator) -> Rollout:
        cfg, fc = self.cfg, self.fc
        P, G, K = cfg.prompts_per_iter, cfg.group_size, fc.num_steps
        B = P * G
        g = iteration_generator(cfg.seed, it, 0, salt=97)  # rank-independent: the global batch
        order = torch.randperm(len(self.prompts), generator=g)
        chosen = order[torch.arange(P) % len(self.prompts)]  # every prompt once before repeats
        noise_gen = torch.Generator(device=self.pipe.device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        noise = self._global_noise(B, K, noise_gen, G)
        b = B // self.world
        rows = torch.arange(self.rank * b, (self.rank + 1) * b)
        prompt_of_row = chosen[rows // G]
        local_prompts = [self.prompts[i] for i in prompt_of_row.tolist()]
        uniq, inv = torch.unique(prompt_of_row, return_inverse=True)
        cond = cond_select(self.pipe.encode_prompts([self.prompts[i] for i in uniq.tolist()],
                                                    cfg=fc.cfg_scale is not None), inv.to(self.pipe.device))
        sde_window = tuple(fc.sde_window) if fc.sde_window else None
        # flow.sample_batch rows per sampler call (0: one call); the same trajectories as one call
        traj = rollout_in_chunks(self.pipe, local_prompts, chunk=fc.sample_batch, num_steps=K, kind=fc.kind,
                                 noise_level=fc.noise_level, cfg_scale=fc.cfg_scale, sde_window=sde_window,
                                 guidance=self.guidance, cond=cond, noise=noise[rows.to(noise.device)],
                                 generator=generator, progress=self.show_progress)
        outcome, parts, valid, metrics = self.reward.score(traj.samples, local_prompts,
                                                           self.prompt_set.meta(prompt_of_row.tolist()))
        metrics = dict(metrics)
        metrics["reward"] = float(outcome[valid].mean()) if bool(valid.any()) else float("nan")
        keep = None
        if self.subset:  # flow.sample_subset: the rest of each group leaves the loss and the group statistics
            keep = self.subset(traj.samples, rows // G, outcome, valid).to(valid.device)
            metrics["subset/kept_frac"] = float(keep.float().mean())
            valid = valid & keep
        if self.diversity:  # flow.diversity_bonus: each sample rewarded for differing from its group (kept ones)
            bonus, bonus_parts = self.diversity(traj.samples, rows // G, outcome, keep=keep)
            outcome = outcome + bonus.to(outcome.device)
            parts = {**parts, **bonus_parts}
            for k, v in bonus_parts.items():
                metrics[f"reward/{k}"] = float(v[valid.to(v.device)].mean()) if bool(valid.any()) else float("nan")

        sde = traj.sde_steps
        if fc.timestep_fraction < 1.0:  # DanceGRPO: train a random subset of the SDE steps
            n = max(1, int(round(fc.timestep_fraction * len(sde))))
            if fc.timestep_subset == "sample":  # DanceGRPO: each sample its own subset, drawn for the global batch
                pick = torch.rand(B, len(sde), generator=g).argsort(dim=1)[rows, :n].sort(dim=1).values
                sde = sde[pick.to(sde.device)]
            else:
                sde = sde[torch.randperm(len(sde), generator=g)[:n].sort().values.to(sde.device)]
        T = sde.shape[-1]
        dev = self.pipe.device
        step_reward = self.algorithm.step_rewards(self, traj, sde, local_prompts)
        scored = {k: parts[k].float() for k in (*self.reward.weights, *(p for p in parts if p.startswith("diversity/")))}
        batch = TrajectoryBatch(
            group=(it * P + rows // G).to(dev),
            mask=valid[:, None].expand(b, T).to(dev).clone(),
            step=torch.arange(T, device=dev).expand(b, T).clone(),
            old_logp=traj.log_probs.gather(1, sde.expand(b, T)).float(),
            outcome=outcome.float().to(dev),
            outcome_parts={k: v.to(dev) for k, v in scored.items()},
            step_reward=step_reward,
            sample_valid=valid.to(dev),
        )
        side = {"traj": traj, "steps": sde, "prompts": local_prompts}
        return Rollout(batch=batch, side=side, metrics=metrics)

    # ------------------------------------------------------------------ evaluation / export
    @torch.no_grad()
    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        """The adapter's own evaluation (``OwnEvaluation``) or the run's rewards on samples of the evaluation
        prompts; with ``flow.guidance.eval_guided`` also guided (``guided/*``, the headline ``reward`` stays the
        unguided one). Writes the labelled sample grid of ``step`` (and an animated GIF for video) on the main
        process and sends the grid to the trackers."""
        fc, ec = self.fc, self.cfg.eval
        self.module.eval()
        try:
            kw = dict(num_steps=fc.eval_num_steps or fc.num_steps, kind=fc.kind, noise_level=fc.noise_level,
                      cfg_scale=fc.cfg_scale)
            with progress_bars(self.show_progress):
                m = self._evaluate(ec.num_per_prompt, ec.seed, None, kw)
                if self.guidance is not None and fc.guidance.eval_guided:
                    g = self._evaluate(ec.num_per_prompt, ec.seed, self.guidance, kw)
                    m.update({f"guided/{k}": v for k, v in g.items() if k != "reward"})
                # sampled on every rank (an FSDP-sharded model's forward is a collective), written by the main one
                self._save_grid(step, out_dir, kw, write=self.acc.is_main_process)
        finally:
            self.module.train()
        return m

    def _evaluate(self, n: int, seed: int, guidance: Optional[Guidance], kw: dict) -> dict[str, float]:
        if isinstance(self.pipe, OwnEvaluation):
            return self.pipe.evaluate(num_per_prompt=n, seed=seed, guidance=guidance, **kw)
        from flowrl.train.flow_eval import pop_diversity, scored_eval_parts, vendi_options

        # chunks of eval.batch_size shared out over the ranks, scores gathered (flowrl.train.flow_eval)
        parts = scored_eval_parts(self._eval_sampler(guidance, kw), self._eval_scorer, self.eval_prompts, n, seed,
                                  batch_size=self.cfg.eval.batch_size, rank=self.rank, world=self.world,
                                  features=self.eval_features)
        diversity = pop_diversity(parts, n, vendi_options(self.cfg.eval.diversity_features)) \
            if self.eval_features is not None else {}  # per prompt, mean over prompts: diversity, vendi
        outcome, valid, metrics = self.reward.combine(parts)
        out = {k.removeprefix("reward/"): v for k, v in metrics.items()}
        out["reward"] = float(outcome[valid].mean())
        return {**out, **diversity}

    def _eval_scorer(self, samples, prompts: list[str]):
        """The run's rewards on evaluation samples, with the metadata columns of their prompts."""
        return self.reward(samples, prompts, self.eval_set.meta_of(prompts))

    def _eval_sampler(self, guidance: Optional[Guidance], kw: dict):
        from flowrl.flow.sampler import sample

        return lambda prompts, **a: sample(self.pipe, prompts, guidance=guidance, **kw, **a)

    def _save_grid(self, step: int, out_dir: Path, kw: dict, write: bool = True) -> None:
        """``samples/step_<step>.png``: ``eval.grid_per_prompt`` samples of each evaluation prompt (fixed seed),
        each upscaled to at least ``eval.grid_min_px`` pixels and captioned with its reward under the run's
        rewards; video adds ``samples/step_<step>.gif`` (the grid of middle frames is the PNG)."""
        from flowrl.train import visuals
        from flowrl.train.flow_eval import scored_eval_parts

        ec = self.cfg.eval
        n = ec.grid_per_prompt
        kept = []  # the images of each chunk, on the CPU when there are several chunks (eval.batch_size)
        parts = scored_eval_parts(self._eval_sampler(None, kw), self._eval_scorer, self.eval_prompts, n, ec.seed,
                                  batch_size=ec.batch_size, rank=0, world=1,
                                  keep=lambda x, rows, p: kept.append(x if ec.batch_size <= 0 else x.cpu()))
        imgs = kept[0] if len(kept) == 1 else torch.cat(kept)
        prompts = [p for p in self.eval_prompts for _ in range(n)]
        outcome, valid, _ = self.reward.combine(parts)
        rewards = torch.where(valid.to(outcome.device), outcome.float(), torch.full_like(outcome.float(), float("nan")))
        captions = visuals.reward_captions(rewards, len(prompts))
        if not write:
            return
        d = out_dir / "samples"
        d.mkdir(parents=True, exist_ok=True)
        grid_kw = dict(prompts=self.eval_prompts, captions=captions, per_row=n, min_px=ec.grid_min_px)
        if imgs.dim() == 5:  # video [B, F, C, H, W]: the animation, and the middle frames as the still grid
            visuals.save_animation(imgs, d / f"step_{step:05d}.gif", fps=ec.video_fps, **grid_kw)
            imgs = imgs[:, imgs.shape[1] // 2]
        grid = visuals.labelled_grid(imgs, **grid_kw)
        grid.save(d / f"step_{step:05d}.png")
        visuals.log_image(self.acc, "eval/samples", grid, step)

    def report_plan(self):
        """What the report shows and checks: the adapter's own plan (``OwnReport``), else the run's reward
        and its parts with no verdict (nothing independent of the reward is measured)."""
        from flowrl.train.report import ReportPlan

        if isinstance(self.pipe, OwnReport):
            return ReportPlan.from_dict(self.pipe.report_plan(), source=f"the {self.fc.model!r} adapter's evaluation")
        div = ("diversity", "vendi") if self.eval_features is not None else ()  # collapse checks where measured
        return ReportPlan(metrics=("reward", *self.reward.weights, *div), checks=("reward_change", *div),
                          source="the flow task (the run's own rewards)")

    def export(self, out_dir: Path, state: Optional[dict[str, Tensor]] = None) -> None:
        """The trained weights: ``lora/`` in diffusers' format under LoRA, else ``transformer/`` in diffusers'
        ``save_pretrained`` layout (``SavesPretrained`` adapters; others: ``model.safetensors``). ``state``: the
        whole state dict of the trained module when it is sharded (FSDP), gathered by the loop."""
        if self.cfg.lora.enabled:
            self.pipe.save_lora(out_dir / "lora", **({"state": state} if state is not None else {}))
        elif isinstance(self.pipe, SavesPretrained):
            self.pipe.save_pretrained(out_dir / "transformer", state=state)
        elif state is not None:
            raise ValueError(f"the model adapter {self.fc.model!r} cannot export a sharded (FSDP) full fine-tune: it "
                             "has no save_pretrained(directory, state=...) (flowrl.flow.pipeline.SavesPretrained)")
        else:
            self.pipe.save_weights(out_dir / "model.safetensors")

    def load_export(self, out_dir: Path) -> None:
        """Load what :meth:`export` wrote into ``out_dir`` (a finished run) into this task's model."""
        if self.cfg.lora.enabled:
            self.pipe.load_lora(Path(out_dir) / "lora")
        elif isinstance(self.pipe, SavesPretrained):
            self.pipe.load_pretrained(Path(out_dir) / "transformer")
        else:
            self.pipe.load_weights(Path(out_dir) / "model.safetensors")
