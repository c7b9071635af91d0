"""The training config: one typed dataclass tree for every algorithm, read from ``configs/*.yaml``.

Shared sections (the loop, optimiser, LoRA, EMA, advantage, policy loss, evaluation) sit at the top
level; ``flow`` holds what only a flow-model run reads (sampler, guidance, turning points, critic).
``flowrl train CONFIG --set key=value`` overrides any leaf; ``flowrl train --help-config`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from flowrl.config import check, field, finite


@dataclass
class OptimConfig:
    name: str = field("adamw", help="registered optimiser (flowrl.train.optim.OPTIMIZERS): adamw (torch), adamw_8bit "
                                     "(bitsandbytes' 8-bit AdamW: CUDA only, optimiser state in 8 bits)")
    lr: float = field(1e-4, help="AdamW learning rate")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], help="AdamW betas")
    eps: float = field(1e-8, help="AdamW epsilon")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0 = off)")

    def __post_init__(self):
        check(finite(self.lr) and self.lr > 0, f"lr={self.lr}: the learning rate must be a finite number > 0")
        check(finite(self.grad_clip) and self.grad_clip >= 0,
              f"grad_clip={self.grad_clip}: must be a finite number > 0, or 0 to turn clipping off")
        check(finite(self.weight_decay) and self.weight_decay >= 0, f"weight_decay={self.weight_decay}: must be finite and >= 0")
        check(finite(self.eps) and self.eps > 0, f"eps={self.eps}: must be finite and > 0")
        check(len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas),
              f"betas={list(self.betas)}: must be two numbers in [0, 1)")


@dataclass
class LoraConfig:
    enabled: bool = field(False, help="train LoRA adapters (peft) instead of the full model")
    rank: int = field(8, help="LoRA rank r")
    alpha: float = field(16.0, help="LoRA alpha (scaling alpha / r)")
    target_modules: list[str] = field(default_factory=list, help="module names to adapt (empty: the adapter's default attention projections)")
    fp32_params: bool = field(True, help="keep the trainable LoRA parameters (and so the optimiser state) in fp32 over a "
                                          "bf16/fp16 base (Flow-GRPO's cast_training_params); false: the model's dtype")
    init_from: Optional[str] = field(None, help="continue from an existing LoRA: a local diffusers LoRA (directory with "
                                     "pytorch_lora_weights.safetensors, e.g. a run's lora/) or peft adapter (directory "
                                     "with adapter_model.safetensors) or a .safetensors file; rank, alpha and "
                                     "target_modules must be the adapter's (checked when the model loads)")

    def __post_init__(self):
        check(self.rank >= 1, f"rank={self.rank}: the LoRA rank must be >= 1")
        check(finite(self.alpha) and self.alpha > 0, f"alpha={self.alpha}: must be finite and > 0")
        if self.init_from is not None:
            check(self.enabled, f"init_from={self.init_from!r}: set lora.enabled=true to continue from a LoRA")
            from pathlib import Path

            p = Path(self.init_from)  # the names flowrl.pipelines.lora.lora_file reads (no torch import here)
            check((p.is_file() and p.suffix == ".safetensors") or (p / "pytorch_lora_weights.safetensors").is_file()
                  or (p / "adapter_model.safetensors").is_file(),
                  f"init_from={self.init_from!r}: no LoRA there; give a .safetensors file or a directory holding "
                  "pytorch_lora_weights.safetensors (diffusers) or adapter_model.safetensors (peft)")


@dataclass
class ExportConfig:
    push_to_hub: Optional[str] = field(None, help="a Hugging Face Hub repo id (user/name) to upload the run's export "
                                       "(lora/ or transformer/ or model/) to at the end, with a model card showing the "
                                       "report's before/after samples; null: no upload (the default)")
    private: bool = field(True, help="create the hub repo as private (push_to_hub only)")

    def __post_init__(self):
        if self.push_to_hub is not None:
            parts = self.push_to_hub.split("/")
            check(len(parts) == 2 and all(parts) and " " not in self.push_to_hub,
                  f"push_to_hub={self.push_to_hub!r}: must be a hub repo id 'user/name' (or null: no upload)")


@dataclass
class EMAConfig:
    enabled: bool = field(False, help="keep an exponential moving average of the trained weights (used for evaluation)")
    decay: float = field(0.9, help="EMA decay per update")
    every: int = field(1, help="update the EMA every this many optimiser steps (counted over the run)")

    def __post_init__(self):
        check(finite(self.decay) and 0 <= self.decay < 1, f"decay={self.decay}: must be in [0, 1)")
        check(self.every >= 1, f"every={self.every}: must be >= 1")


@dataclass
class AdvantageConfig:
    estimator: str = field("grpo", help="registered advantage estimator (flowrl.core.ADVANTAGES)")
    params: dict[str, Any] = field(default_factory=dict, help="keyword parameters of the estimator")
    filter_zero_variance: bool = field(False, help="drop groups whose rewards are all equal (DAPO dynamic sampling); counted in metrics")


@dataclass
class PolicyLossConfig:
    name: str = field("ppo_clip", help="registered policy loss (flowrl.core.LOSSES)")
    agg: Optional[str] = field(None, help="loss aggregation: token_mean | seq_mean_token_mean | seq_mean_token_sum | "
                               "seq_mean_token_sum_norm; null: the loss's own (ppo_clip: token_mean, gspo: seq_mean_token_mean)")
    params: Optional[dict[str, Any]] = field(None, help="keyword parameters of the loss (eps_low/eps_high/dual_clip/adv_clip "
                                             "...), the whole mapping: a key left out takes the loss function's own default; "
                                             "null: the loss's registered defaults (ppo_clip: {eps_low: 1e-4, adv_clip: 5.0}, "
                                             "Flow-GRPO's; gspo: {eps_low: 3e-4, eps_high: 4e-4})")
    kl_beta: float = field(0.0, help="weight of the KL to the reference policy in the loss (0 = no reference pass)")

    def __post_init__(self):
        check(self.agg is None or isinstance(self.agg, str), f"agg={self.agg!r}: must be an aggregation name or null")
        check(self.params is None or isinstance(self.params, dict),
              f"params={self.params!r}: must be a mapping of the loss's keyword parameters, or null")

    def resolve_defaults(self) -> None:
        """Fill an unset ``agg`` / ``params`` from the registered loss's own defaults
        (``flowrl.core.losses.loss_defaults``); a value the config sets is kept."""
        from flowrl.core.losses import loss_defaults

        own = loss_defaults(self.name)
        if self.agg is None:
            self.agg = own["agg"]
        if self.params is None:
            self.params = own["params"]


@dataclass
class EvalConfig:
    every: int = field(10, help="evaluate every this many iterations (and at the start and the end)")
    num_per_prompt: int = field(20, help="evaluation samples per evaluation prompt")
    seed: int = field(1234, help="seed of the evaluation noise (fixed across evaluations)")
    grid_per_prompt: int = field(8, help="samples per prompt in the PNG grid")
    grid_min_px: int = field(64, help="each grid sample is upscaled (nearest, integer factor) to at least this many pixels")
    video_fps: float = field(8.0, help="frame rate of the animated GIF of video samples")
    table_rows: int = field(16, help="LLM: completions (prompt, completion, reward) in the table sent to the trackers")
    batch_size: int = field(0, help="flow: evaluation samples per sampler call (each call its own seed, eval.seed + chunk "
                                    "index); the chunks are shared out over the ranks and the scores gathered. 0: one "
                                    "call per rank (one process: the whole set in one call)")
    diversity_features: Optional[Any] = field(default_factory=lambda: {"name": "pixels", "size": 64},
                                              help="flow, generic evaluation: the feature space of the logged diversity "
                                              "(mean pairwise distance of a prompt's samples) and Vendi score, per prompt, "
                                              "mean over prompts: a registered sample feature (flowrl.rewards.features: "
                                              "pixels, clip, digits_classifier) or {name, ...options}; null: not measured. Needs "
                                              "num_per_prompt >= 2. Adapters with their own evaluation (digits) measure theirs")
    pass_k: list[int] = field(default_factory=lambda: [1, 8], help="LLM: the k of the sampled pass@k logged at each "
                              "evaluation (pass@<k>, Codex's unbiased estimator; each k <= pass_samples)")
    pass_samples: int = field(16, help="LLM: completions sampled per problem for pass@k and distinct_correct, at the "
                                       "rollout's temperature / top-k / top-p (seeded from eval.seed)")
    pass_problems: int = field(50, help="LLM: held-out problems of the sampled evaluation (a fixed subset drawn from "
                                         "eval.seed; all of them when fewer). 0: no sampled evaluation")

    def __post_init__(self):
        check(self.every >= 1, f"every={self.every}: evaluate every this many iterations; must be >= 1")
        check(self.num_per_prompt >= 1, f"num_per_prompt={self.num_per_prompt}: must be >= 1")
        check(self.grid_per_prompt >= 1, f"grid_per_prompt={self.grid_per_prompt}: must be >= 1")
        check(1 <= self.grid_min_px <= 4096, f"grid_min_px={self.grid_min_px}: must be in [1, 4096]")
        check(finite(self.video_fps) and self.video_fps > 0, f"video_fps={self.video_fps}: must be finite and > 0")
        check(self.table_rows >= 0, f"table_rows={self.table_rows}: must be >= 0 (0: no table)")
        check(self.batch_size >= 0, f"batch_size={self.batch_size}: must be >= 0 (0: one sampler call per rank)")
        check(self.diversity_features is None or isinstance(self.diversity_features, str)
              or (isinstance(self.diversity_features, dict) and isinstance(self.diversity_features.get("name"), str)),
              f"diversity_features={self.diversity_features!r}: must be a registered sample feature's name, "
              "{name: ..., ...options}, or null (no diversity measured)")
        check(self.pass_problems >= 0, f"pass_problems={self.pass_problems}: must be >= 0 (0: no sampled evaluation)")
        check(self.pass_samples >= 1, f"pass_samples={self.pass_samples}: must be >= 1")
        check(self.pass_problems == 0 or (len(self.pass_k) > 0 and all(1 <= k <= self.pass_samples for k in self.pass_k)),
              f"pass_k={list(self.pass_k)}: each k must be in [1, pass_samples={self.pass_samples}] (an unbiased "
              f"pass@k needs at least k samples), and at least one k unless pass_problems is 0")


@dataclass
class GuidanceConfig:
    enabled: bool = field(False, help="steer sampling with the process reward's gradient (Euphonium)")
    scale: float = field(0.01, help="lambda: drift = lambda * Delta * grad r (ignored in KL mode)")
    kl_beta: Optional[float] = field(None, help="KL mode: lambda = g^2 / (2 beta)")
    normalize: bool = field(False, help="RMS-normalise the reward gradient per sample")
    window: Optional[list[int]] = field(None, help="[start, stop) steps where guidance applies (None: all)")
    estimator: Literal["autograd", "spsa"] = field("autograd", help="gradient of the process reward: autograd or SPSA")
    logprob_mean: Literal["unguided", "guided"] = field("unguided", help="score actions under the unguided mean (distils guidance) or the guided one")
    eval_guided: bool = field(False, help="also evaluate with guidance (the default evaluation is unguided)")
    step_reward: Literal["next_state", "guided_state"] = field("next_state", help="euphonium's process step reward: r(x_{k+1}), the state step k leads to, on every trained step (next_state), or r(x_k), the state whose gradient steered step k, on the window's steps only (guided_state: the reference's)")

    def __post_init__(self):
        check(finite(self.scale) and self.scale >= 0, f"scale={self.scale}: must be finite and >= 0")
        check(self.kl_beta is None or (finite(self.kl_beta) and self.kl_beta > 0),
              f"kl_beta={self.kl_beta}: must be > 0 (or null: scale mode)")
        check(self.window is None or (len(self.window) == 2 and 0 <= self.window[0] < self.window[1]),
              f"window={self.window}: must be [start, stop) with 0 <= start < stop (or null: every step)")


@dataclass
class CriticConfig:
    """AC-Flow (actor-critic flow fine-tuning)."""

    lr: float = field(1e-3, help="critic learning rate")
    width: int = field(64, help="critic hidden width")
    warmup_iters: int = field(5, help="iterations during which only the critic trains and the actor uses plain normalised rewards")
    updates_per_iter: int = field(4, help="critic regression steps per iteration")
    adv_clip: float = field(2.0, help="clip A = G - V to [-c, c]")
    temperature: float = field(1.0, help="tau in the weight w = exp(A / tau), normalised to mean 1 over the batch")
    w2_alpha: float = field(1.0, help="alpha of the Wasserstein-2 regulariser alpha * ||v - v_ref||^2")
    fm_samples: int = field(2, help="noise draws eps per trained step of each sample for the weighted flow-matching loss (at that step's sigma_k), in every update pass")
    weighting: Literal["exp", "positive"] = field("exp", help="w from A: exp = exp(A / tau) (ORW-CFM-W2); positive = max(A, 0); both normalised to mean 1 over the batch")

    def __post_init__(self):
        for key in ("lr", "temperature", "adv_clip"):
            value = getattr(self, key)
            check(finite(value) and value > 0, f"{key}={value}: must be finite and > 0")
        check(finite(self.w2_alpha) and self.w2_alpha >= 0, f"w2_alpha={self.w2_alpha}: must be finite and >= 0")
        for key in ("width", "updates_per_iter", "fm_samples"):
            check(getattr(self, key) >= 1, f"{key}={getattr(self, key)}: must be >= 1")
        check(self.warmup_iters >= 0, f"warmup_iters={self.warmup_iters}: must be >= 0")


@dataclass
class FlowConfig:
    model: str = field("digits", help="registered flow model adapter (flowrl.pipelines.registry.PIPELINES, family flow)")
    model_path: Optional[str] = field(None, help="hub id or local directory of the model, given to the adapter's loader (None: the adapter's own weights, e.g. digits' shipped ones)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="model dtype (bf16/fp16 on GPU)")
    model_kwargs: dict[str, Any] = field(default_factory=dict, help="keyword options of the adapter's loader (sd3/flux/wan: from_pretrained's height, width, num_frames, guidance_scale, ...)")
    prompts: list[str] = field(default_factory=list, help="training prompts (empty: the task's default set, e.g. the ten digits)")
    prompt_file: Optional[str] = field(None, help="the training prompts (overrides prompts): a text file (one prompt per line), a JSON-lines file, "
                                              "or a Hugging Face dataset (save_to_disk folder, .json/.csv/.parquet file, hub id); relative to the working directory")
    prompt_source: str = field("auto", help="how prompt_file is read, a registered prompt source (flowrl.train.flow_data.PROMPT_SOURCES): "
                                            "text, jsonl, hf; auto: by the file's suffix (.txt, .jsonl), else hf (folders, hub ids)")
    prompt_column: str = field("prompt", help="jsonl/hf: the column holding the prompt; every other column reaches the rewards as meta")
    data_split: str = field("train", help="hf: the split of the training prompts")
    data_options: dict[str, Any] = field(default_factory=dict, help="hf: datasets.load_dataset keywords (name, data_dir, revision, cache_dir, ...)")
    eval_prompt_file: Optional[str] = field(None, help="the evaluation prompts, read like prompt_file (None: eval_split, eval_prompts, else the training prompts)")
    eval_split: Optional[str] = field(None, help="hf: the split of prompt_file's dataset holding the evaluation prompts")
    dataset_size: Optional[int] = field(None, help="at most this many training prompts, the first (None: all)")
    eval_size: Optional[int] = field(None, help="at most this many evaluation prompts, the first (None: all)")
    eval_prompts: list[str] = field(default_factory=list, help="evaluation prompts (empty: the training prompts)")
    num_steps: int = field(6, help="denoising steps per rollout")
    eval_num_steps: Optional[int] = field(None, help="denoising steps at evaluation (None: num_steps)")
    kind: Literal["flow_sde", "dance_sde", "cps"] = field("flow_sde", help="SDE kernel of the rollouts")
    noise_level: float = field(0.7, help="kernel noise level (a in Flow-GRPO, eta in DanceGRPO, the cps angle)")
    cfg_scale: Optional[float] = field(None, help="classifier-free guidance scale (None: off)")
    cfg_grad: Literal["both", "cond_only"] = field("both", help="gradient of the guided velocity in the training recompute (the value is unchanged): both = through both branches, w dv_c - (w-1) dv_u (the exact gradient; Flow-GRPO's train_sd3.py/train_wan2_1.py, TP-GRPO); cond_only = unconditional branch detached, w dv_c (the July 2025 train_sd3.py). Needs cfg_scale")
    kl_form: Literal["true_kl", "flow_grpo_sd3"] = field("true_kl", help="KL to the reference (loss.kl_beta > 0): true_kl = ||mu - mu_ref||^2 / (2 g^2 Delta), the KL of the step kernels (Flow-GRPO's train_wan2_1.py); flow_grpo_sd3 = ||mu - mu_ref||^2 / (2 g^2) = Delta * true_kl (Flow-GRPO's train_sd3.py; equal to true_kl for cps)")
    logp_form: Literal["density", "flow_grpo_cps"] = field("density", help="log-prob the policy loss sees: density = the true Gaussian log-density; flow_grpo_cps = -mean (x' - mu)^2, Flow-GRPO's and TP-GRPO's cps log-prob (kind cps only; the references pair it with a ratio clip of 1e-5)")
    sde_window: Optional[list[int]] = field(None, help="[start, stop): SDE only on these steps, ODE elsewhere (Flow-GRPO-Fast)")
    same_noise_per_prompt: bool = field(False, help="one initial noise per prompt's group (DanceGRPO)")
    timestep_fraction: float = field(1.0, help="fraction of the SDE steps trained per iteration, drawn at random (DanceGRPO)")
    timestep_subset: Literal["batch", "sample"] = field("batch", help="with timestep_fraction < 1: one random subset of the steps for the whole batch (batch), or one per sample (sample: DanceGRPO's per-sample permutations)")
    steps_per_backward: int = field(0, help="denoising steps per forward/backward chunk (0: all at once)")
    micro_batch: int = field(0, help="samples per forward/backward chunk; gradients accumulate over chunks (0: the whole minibatch)")
    sample_batch: int = field(0, help="rollout micro-batch per rank: the sampler runs over chunks of this many samples "
                                      "and the trajectories are concatenated (the same samples as one call; 0: one call)")
    decode_batch: int = field(0, help="VAE decode chunk: latents are decoded this many at a time (0: all at once)")
    rewards: dict[str, Any] = field(default_factory=lambda: {"digits": {"weight": 1.0}},
                                    help="outcome rewards {name: {weight, type, options}} (flowrl.rewards.build_rewards)")
    process_reward: Optional[dict[str, Any]] = field(None, help="process reward {type: registered name, ...options} for guidance / dual rewards")
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig, help="reward-gradient guidance (Euphonium)")
    diversity_bonus: list[dict[str, Any]] = field(default_factory=list, help="diversity bonuses added to the outcome reward, summed: a list of "
                                                  "{name: a registered bonus (flowrl.core.diversity_bonus: pairwise, ...), weight, features: a registered "
                                                  "sample feature (flowrl.rewards.features: pixels, clip, digits_classifier) or {name, ...options}, params: {...}}; each is "
                                                  "also the outcome part 'diversity/<name>' (with a per-reward estimator its column's weight is "
                                                  "advantage.params.weights['diversity/<name>'])")
    kl_weight: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"}, help="weight of each step's KL by its noise level: "
                                      "{name: a registered weight (flowrl.flow.kl_weights: uniform, sigma_power, early_steps), ...params}")
    sample_subset: Optional[dict[str, Any]] = field(None, help="train on a subset of each group: {name: a sample selector (flowrl.core.sample_subset: drift, top), keep: samples kept per group (<= group_size), ...params}; the rest leave the loss and the group statistics")
    critic: CriticConfig = field(default_factory=CriticConfig, help="AC-Flow critic")

    def __post_init__(self):
        check(self.num_steps >= 1, f"num_steps={self.num_steps}: must be >= 1")
        check(self.eval_num_steps is None or self.eval_num_steps >= 1,
              f"eval_num_steps={self.eval_num_steps}: must be >= 1 (or null: num_steps)")
        check(finite(self.noise_level) and self.noise_level >= 0, f"noise_level={self.noise_level}: must be finite and >= 0")
        check(self.cfg_scale is None or finite(self.cfg_scale), f"cfg_scale={self.cfg_scale}: must be finite (or null: off)")
        check(self.cfg_grad == "both" or self.cfg_scale is not None,
              f"cfg_grad={self.cfg_grad!r} has no effect without cfg_scale: set cfg_scale or leave cfg_grad 'both'")
        check(self.logp_form == "density" or self.kind == "cps",
              f"logp_form={self.logp_form!r} is the cps kernel's reference log-prob; kind={self.kind!r} takes 'density'")
        check(finite(self.timestep_fraction) and 0.0 < self.timestep_fraction <= 1.0,
              f"timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        check(self.sde_window is None or (len(self.sde_window) == 2 and 0 <= self.sde_window[0] < self.sde_window[1]),
              f"sde_window={self.sde_window}: must be [start, stop) with 0 <= start < stop (or null: every step)")
        check(self.steps_per_backward >= 0, f"steps_per_backward={self.steps_per_backward}: must be >= 0 (0: all steps)")
        check(self.micro_batch >= 0, f"micro_batch={self.micro_batch}: must be >= 0 (0: the whole minibatch)")
        check(self.sample_batch >= 0, f"sample_batch={self.sample_batch}: must be >= 0 (0: the rank's rollout in one call)")
        check(self.decode_batch >= 0, f"decode_batch={self.decode_batch}: must be >= 0 (0: decode all latents at once)")
        check(not (self.sample_batch and self.guidance.enabled and self.guidance.estimator == "spsa"),
              "sample_batch with guidance.estimator=spsa: SPSA directions are drawn per sampler call, so chunks would "
              "not sample what one call samples; use estimator=autograd or sample_batch=0")
        for key in ("dataset_size", "eval_size"):
            check(getattr(self, key) is None or getattr(self, key) >= 1, f"{key}={getattr(self, key)}: must be >= 1 (or null: all)")
        if self.prompt_source != "auto" or self.eval_split or self.eval_prompt_file:  # the sources' registry imports torch
            from flowrl.train.flow_data import check_prompt_data

            check_prompt_data(self)
        for i, spec in enumerate(self.diversity_bonus):
            check(isinstance(spec, dict) and "name" in spec and set(spec) <= {"name", "weight", "features", "params"},
                  f"diversity_bonus[{i}]={spec}: needs 'name' and takes only name, weight, features, params")
        check(isinstance(self.kl_weight, dict) and "name" in self.kl_weight,
              f"kl_weight={self.kl_weight}: needs a 'name' (a registered KL weight: uniform, sigma_power, early_steps)")
        check(self.process_reward is None or "type" in self.process_reward,
              f"process_reward={self.process_reward}: needs a 'type' (a registered process reward)")


@dataclass
class LLMConfig:
    """LLM rollouts (an LLM algorithm: ``llm_grpo``, ``llm_prime``, ...; flowrl.train.llm_task)."""

    model: str = field("arithmetic", help="a registered LLM adapter (arithmetic, countdown: the embedded models; flowrl.pipelines.registry) "
                                          "or else a transformers causal LM's hub id / local folder, loaded with from_pretrained by the causal_lm adapter")
    model_path: Optional[str] = field(None, help="weights folder handed to the registered adapter llm.model (None: the adapter's own, e.g. the shipped "
                                                 "embedded weights); must be null when llm.model is a hub id / folder")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="model dtype (bf16/fp16 on GPU)")
    backend: Literal["transformers", "vllm"] = field("transformers", help="sampler: transformers generate, or vLLM (GPU; sampler-vs-trainer IS correction applies)")
    chat_template: bool = field(False, help="wrap prompts with the tokenizer's chat template")
    dataset: str = field("arithmetic", help="a registered dataset kind (flowrl.train.llm_data.DATASETS): arithmetic (the embedded problems), "
                                            "reasoning_gym (a reasoning-gym task), jsonl (a JSON-lines file), hf (a Hugging Face `datasets` id or local path)")
    data_path: Optional[str] = field(None, help="jsonl: the JSON-lines file; hf: a hub id, a save_to_disk folder or a .jsonl/.json/.csv/.parquet file "
                                                "(relative paths from the working directory)")
    data_split: str = field("train", help="hf: the training split")
    data_options: dict[str, Any] = field(default_factory=dict, help="hf: datasets.load_dataset keywords (name, data_dir, revision, cache_dir, ...)")
    eval_data: Optional[str] = field(None, help="the evaluation rows: jsonl: a second JSONL file; hf: a split name or a local file "
                                                "(None: hold out eval_fraction of the training file)")
    eval_fraction: float = field(0.1, help="jsonl/hf without eval_data: the fraction of rows held out for evaluation (a fixed draw)")
    prompt_column: str = field("prompt", help="jsonl/hf: the column holding the prompt (a string, or a chat conversation with chat_template)")
    answer_column: str = field("answer", help="jsonl/hf: the column that reaches the rewards as meta['answer'] (math_verify's reference)")
    tests_column: str = field("tests", help="jsonl/hf: the column that reaches the rewards as meta['tests'] (code_tests' unit tests)")
    task: str = field("countdown", help="reasoning-gym task name (dataset=reasoning_gym)")
    task_options: dict[str, Any] = field(default_factory=dict, help="reasoning-gym task options (e.g. {min_numbers: 3, max_numbers: 3})")
    template: Optional[str] = field(None, help="prompt template: reasoning-gym: with {question} (None: the module's default); "
                                               "jsonl/hf: with {column} fields of each row (None: the prompt column as it is)")
    prompt_format: Literal["template", "compact"] = field("template", help="reasoning-gym prompts: the English question in `template`, or a compact rendering of the entry's metadata (countdown: '3 7 25 50=175:', for the embedded countdown model)")
    dataset_size: int = field(5000, help="training problems drawn once (train split) with data_seed; jsonl/hf: at most this many rows (the first)")
    data_seed: int = field(0, help="seed of the training problem pool")
    eval_size: int = field(200, help="held-out problems of the greedy evaluation (a fixed set, seed eval.seed; jsonl/hf: at most this many rows)")
    digits: int = field(3, help="arithmetic: operand digits")
    max_new_tokens: int = field(24, help="completion length limit (tokens)")
    temperature: float = field(1.0, help="sampling temperature of the rollouts (evaluation is greedy)")
    top_k: Optional[int] = field(None, help="top-k truncation of the sampler (None: off; adds the IS correction)")
    top_p: Optional[float] = field(None, help="top-p truncation of the sampler (None: off; adds the IS correction)")
    gen_batch: int = field(0, help="rows per generate call, each seeded from (seed, iteration, chunk) (0: the rank's rows in one call); "
                                   "R processes sample exactly what one does when it divides the rows per rank")
    rewards: dict[str, Any] = field(default_factory=dict, help="outcome rewards {name: {weight, type, options}}; a name or type is registered or a reference "
                                                              "'module:function' / 'file.py:function' to your own (TRL, verl or flowrl signature); "
                                                              "empty: the dataset's own (arithmetic | reasoning_gym)")
    correct_threshold: float = field(1.0, help="a sample is correct when its first reward's score is >= this (accuracy, gates, PRM labels)")
    process_reward: Optional[dict[str, Any]] = field(None, help="process reward {type: registered name or 'file.py:function', ...options} scoring each step -> step_reward "
                                                                "(e.g. {type: arithmetic_steps})")
    steps: Literal["newline", "regex", "chunk"] = field("newline", help="step segmentation of a completion")
    step_pattern: Optional[str] = field(None, help="regex that starts a step (steps=regex)")
    step_chunk: int = field(8, help="tokens per step (steps=chunk)")
    kl_kind: Literal["k1", "k2", "k3"] = field("k3", help="KL estimator (loss.kl_beta in the loss, kl_in_reward in the reward)")
    kl_in_reward: float = field(0.0, help="subtract this times the summed per-token KL to the reference from the outcome (0: off)")
    mask_truncated: bool = field(False, help="drop completions that hit max_new_tokens from the loss (DAPO); they still count in group statistics")
    overlong_cache: int = field(0, help="DAPO soft overlong penalty: ramp over the last this many tokens before max_new_tokens (0: off)")
    overlong_factor: float = field(1.0, help="DAPO soft overlong penalty at the limit")
    dynamic_sampling: bool = field(False, help="DAPO dynamic sampling: keep only groups with unequal rewards and refill to prompts_per_iter")
    max_refill_rounds: int = field(4, help="extra generation rounds of dynamic sampling before constant groups are kept (they get advantage 0)")
    shaping: Optional[str] = field(
        None, help="a registered shaper applied before the advantage (flowrl.train.llm_shaping.SHAPERS): prof (PROF filter), "
                   "posterior_gate (Posterior-GRPO gate), trust_weight (Trust-GRPO weight), accuracy_band (PRIME's prompt filter); None: off")
    shaping_params: dict[str, Any] = field(default_factory=dict, help="keyword parameters of the shaper (prof: keep, mode, lam, h_lambda; posterior_gate: coef; trust_weight: alpha, anneal_steps, low, high; accuracy_band: low, high)")
    is_correction: Literal["auto", "off", "always"] = field("auto", help="sampler-vs-trainer importance weights: auto (when the sampler's log-probs differ: vLLM, top-k/p), off, always")
    is_level: Literal["token", "sequence"] = field("token", help="importance weights per token or per sequence")
    is_mode: Literal["truncate", "mask"] = field("truncate", help="TIS (truncate at is_cmax) or MIS (mask outside [0, is_cmax])")
    is_cmax: float = field(2.0, help="C_max of the importance weights")
    prm_lr: float = field(1e-4, help="llm_prime: learning rate of the implicit PRM (a copy of the initial policy)")
    prm_beta: float = field(0.05, help="llm_prime: beta of the implicit reward beta * (log pi_phi - log pi_ref)")
    prm_update: Literal["before", "after"] = field("before", help="llm_prime: update the PRM before computing its rewards (double forward) or after")

    def __post_init__(self):
        check(self.dataset_size >= 1, f"dataset_size={self.dataset_size}: the training dataset is empty; it needs >= 1 problem")
        check(self.eval_size >= 1, f"eval_size={self.eval_size}: the evaluation set is empty; it needs >= 1 problem")
        check(self.digits >= 1, f"digits={self.digits}: must be >= 1")
        check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        check(finite(self.eval_fraction) and 0 < self.eval_fraction < 1, f"eval_fraction={self.eval_fraction}: must be in (0, 1)")
        if self.rewards or self.process_reward is not None:
            from flowrl.rewards.build import check_process_reward_spec, check_reward_spec

            if self.rewards:  # references to the user's code are read (not imported) here; registered names at build
                check_reward_spec(self.rewards, key="rewards")
            check_process_reward_spec(self.process_reward, key="process_reward")
        check(finite(self.temperature) and self.temperature > 0,
              f"temperature={self.temperature}: rollouts sample, so it must be finite and > 0 (evaluation is greedy)")
        check(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k}: must be >= 1 (or null: off)")
        check(self.top_p is None or (finite(self.top_p) and 0 < self.top_p <= 1), f"top_p={self.top_p}: must be in (0, 1] (or null: off)")
        check(self.gen_batch >= 0, f"gen_batch={self.gen_batch}: must be >= 0 (0: one generate call per rank)")
        check(finite(self.correct_threshold), f"correct_threshold={self.correct_threshold}: must be finite")
        check(self.step_chunk >= 1, f"step_chunk={self.step_chunk}: must be >= 1")
        check(self.steps != "regex" or bool(self.step_pattern), "steps=regex needs step_pattern (the regex that starts a step)")
        if self.step_pattern is not None:
            import re

            try:
                re.compile(self.step_pattern)
            except re.error as e:
                raise ValueError(f"step_pattern={self.step_pattern!r} is not a valid regex: {e}") from None
        check(finite(self.kl_in_reward) and self.kl_in_reward >= 0, f"kl_in_reward={self.kl_in_reward}: must be finite and >= 0 (0: off)")
        check(0 <= self.overlong_cache <= self.max_new_tokens,
              f"overlong_cache={self.overlong_cache}: must lie in [0, max_new_tokens={self.max_new_tokens}]")
        check(finite(self.overlong_factor) and self.overlong_factor >= 0, f"overlong_factor={self.overlong_factor}: must be finite and >= 0")
        check(self.max_refill_rounds >= 0, f"max_refill_rounds={self.max_refill_rounds}: must be >= 0")
        check(finite(self.is_cmax) and self.is_cmax > 0, f"is_cmax={self.is_cmax}: must be finite and > 0")
        check(finite(self.prm_lr) and self.prm_lr > 0, f"prm_lr={self.prm_lr}: must be finite and > 0")
        check(finite(self.prm_beta) and self.prm_beta > 0, f"prm_beta={self.prm_beta}: must be finite and > 0")
        if self.shaping is not None:
            from flowrl.train.llm_shaping import check_shaping

            check_shaping(self.shaping, self.shaping_params, key="shaping")
        else:
            check(not self.shaping_params, f"shaping_params={self.shaping_params} are given but shaping is null")


@dataclass
class TrainConfig:
    algorithm: str = field("flow_grpo", help="registered training algorithm (flowrl.train.algorithms.ALGORITHMS; "
                                             "`flowrl train --help-config` lists them): what the iteration does with a "
                                             "rollout (the estimator and loss are set below)")
    plugins: list[str] = field(default_factory=list, help="your own modules (dotted names) or .py files, imported before "
                               "the config is checked, so that the algorithms, estimators, losses, rewards and model "
                               "adapters they register can be named below (see docs/extending.md)")
    seed: int = field(0, help="seed of everything (rollout noise, prompt order, minibatches)")
    iterations: int = field(60, help="rollout-and-update iterations")
    prompts_per_iter: int = field(10, help="prompts per iteration (over all ranks)")
    group_size: int = field(16, help="samples per prompt (a GRPO group)")
    updates_per_rollout: int = field(1, help="passes over each rollout (mu)")
    minibatches: int = field(1, help="optimiser steps per pass (the rollout is split into this many minibatches)")
    threads: int = field(1, help="torch CPU threads (1 is fastest on small shared CPUs)")
    max_minutes: float = field(0.0, help="stop after this many minutes of training (0: no limit)")
    save_every: int = field(10, help="checkpoint every this many iterations (and at the end)")
    progress: bool = field(True, help="show progress bars")
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"], help="accelerate trackers (tensorboard, wandb, "
                                "or any accelerate knows); one whose package is missing is skipped with a warning")
    tracker_project: str = field("flowrl", help="tracker project (W&B project; TensorBoard's subfolder of the run directory)")
    run_name: Optional[str] = field(None, help="run name shown by the trackers (None: the run directory's name)")
    tracker_init: dict[str, dict[str, Any]] = field(default_factory=dict, help="extra init arguments per tracker, e.g. "
                                                    "{wandb: {entity: me, tags: [digits]}} (accelerate's init_kwargs)")
    mixed_precision: Literal["no", "bf16", "fp16"] = field("no", help="accelerate mixed precision (GPU only; 'no' on CPU)")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass (less memory, more compute)")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimiser")
    lora: LoraConfig = field(default_factory=LoraConfig, help="LoRA adapters")
    ema: EMAConfig = field(default_factory=EMAConfig, help="EMA of the trained weights")
    export: ExportConfig = field(default_factory=ExportConfig, help="what happens to the trained weights at the end")
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig, help="advantage estimator")
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig, help="policy loss")
    eval: EvalConfig = field(default_factory=EvalConfig, help="evaluation")
    flow: FlowConfig = field(default_factory=FlowConfig, help="flow-model rollouts")
    llm: LLMConfig = field(default_factory=LLMConfig, help="LLM rollouts (what the LLM algorithms read)")

    def __post_init__(self):
        validate_train_config(self)


def validate_train_config(cfg: "TrainConfig") -> None:
    """Ranges of the loop's settings, the registered names (algorithm, estimator, loss) with their parameters,
    and the algorithm's own cross-field checks. Runs when the config is read, before any model loads; every
    failure is a ValueError whose message names the key."""
    from flowrl.plugins import load_plugins

    load_plugins(cfg.plugins)  # first: they register names that the checks below look up
    for key in ("iterations", "prompts_per_iter", "group_size", "updates_per_rollout", "minibatches", "threads",
                "save_every"):
        value = getattr(cfg, key)
        check(value >= 1, f"{key}={value}: must be >= 1")
    check(finite(cfg.max_minutes) and cfg.max_minutes >= 0, f"max_minutes={cfg.max_minutes}: must be >= 0 (0: no limit)")
    check_trackers(cfg)
    from flowrl.core import ADVANTAGES, AGG_MODES, LOSSES, min_group_size
    from flowrl.core.registry import UnknownNameError, check_params
    from flowrl.train.algorithms import ALGORITHMS

    try:
        algorithm = ALGORITHMS[cfg.algorithm]
        estimator = ADVANTAGES[cfg.advantage.estimator]
        loss = LOSSES[cfg.loss.name]
    except UnknownNameError as e:
        raise ValueError(str(e)) from None
    from flowrl.train.optim import check_optimizer_name

    check_optimizer_name(cfg.optim.name, key="optim.name")  # after the plug-ins, which may register optimisers
    cfg.loss.resolve_defaults()  # after the plug-ins: a plug-in loss brings its own defaults
    check_params("advantage estimator", cfg.advantage.estimator, estimator, cfg.advantage.params, skip=1)
    validate_params = getattr(estimator, "validate_params", None)  # the estimator's own checks of the values
    if validate_params is not None:
        validate_params(**cfg.advantage.params)
    check_params("policy loss", cfg.loss.name, loss, {"agg": cfg.loss.agg, **cfg.loss.params}, skip=4)
    check(cfg.loss.agg in AGG_MODES, f"loss.agg={cfg.loss.agg!r}: valid: {list(AGG_MODES)}")
    check(finite(cfg.loss.kl_beta) and cfg.loss.kl_beta >= 0, f"loss.kl_beta={cfg.loss.kl_beta}: must be finite and >= 0")
    need = min_group_size(cfg.advantage.estimator)
    check(cfg.group_size >= need,
          f"group_size={cfg.group_size}: advantage estimator {cfg.advantage.estimator!r} compares the samples of a "
          f"group, so it needs group_size >= {need} (a group of one always gets advantage 0)")
    algorithm.validate_config(cfg)


def check_trackers(cfg: "TrainConfig") -> None:
    """Tracker names that accelerate knows (after plug-ins, which may register their own), a non-empty project
    and run name, and init arguments only for requested trackers."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = sorted(LOGGER_TYPE_TO_CLASS)
    for t in cfg.trackers:
        check(t in LOGGER_TYPE_TO_CLASS, f"trackers: {t!r} is not a tracker accelerate knows; valid: {known}")
    check(len(set(cfg.trackers)) == len(cfg.trackers), f"trackers={cfg.trackers}: a tracker is named twice")
    check(bool(cfg.tracker_project.strip()), "tracker_project: must be a non-empty name")
    check(cfg.run_name is None or bool(cfg.run_name.strip()), "run_name: must be a non-empty name (or null: the run directory's name)")
    for t, kw in cfg.tracker_init.items():
        check(t in cfg.trackers, f"tracker_init.{t}: {t!r} is not in trackers={cfg.trackers}; give init arguments "
                                 "only for requested trackers")
        check(isinstance(kw, dict), f"tracker_init.{t}: must be a mapping of init arguments; got {kw!r}")
