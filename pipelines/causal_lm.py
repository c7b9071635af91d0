"""Adapter for any transformers causal LM: load, build prompts, generate with log-probs, recompute.

    pipe = load_causal_lm("Qwen/Qwen2.5-0.5B-Instruct", dtype=torch.bfloat16, device="cuda",
                          lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    gen = pipe.generate(["2+2=?"], max_new_tokens=64, temperature=1.0)      # flowrl.llm.Generation
    logp = pipe.logprobs(gen)                                              # teacher-forced, with grad
    texts = pipe.decode(gen)

The model and tokenizer are read with ``from_pretrained`` (a hub id or a local folder; offline runs
set ``HF_HUB_OFFLINE=1``). Padding is on the left for generation. ``backend="vllm"`` routes
generation through :mod:`flowrl.llm.vllm_backend` (optional, GPU only); the trainer's log-probs then
come from :meth:`CausalLMPipeline.logprobs` and the two are reconciled with
``flowrl.core.importance_weights``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from flowrl.core.dtypes import torch_dtype
from flowrl.llm.generate import Generation, generate, token_logprobs

from .registry import register_pipeline


@dataclass
class CausalLMPipeline:
    """A causal LM, its tokenizer and the generation/log-prob functions of ``flowrl.llm``.

    model: a transformers ``PreTrainedModel`` (possibly a peft ``PeftModel``); tokenizer: its
    tokenizer with ``padding_side="left"`` and a pad token; chat_template: wrap prompts with the
    tokenizer's chat template; vllm: a :class:`flowrl.llm.vllm_backend.VLLMGenerator` when the vLLM
    backend is in use.
    """

    model: Any
    tokenizer: Any
    chat_template: bool = False
    vllm: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompts
    def build_prompts(self, prompts: Sequence[str] | Sequence[Sequence[dict]]) -> tuple[Tensor, Tensor]:
        """Tokenize prompts, left-padded: ``(input_ids long [B, P], attention_mask long [B, P])``.

        ``prompts`` are strings, or chat conversations (lists of ``{"role", "content"}``) when the
        pipeline uses the chat template (a string is then wrapped as one user message). No special
        tokens are added beyond what the chat template writes.
        """
        if len(prompts) == 0:
            raise ValueError("build_prompts: no prompts given")
        if self.chat_template:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("build_prompts: chat_template=True but the tokenizer has no chat template")
            convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
            texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        else:
            bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
            if bad:
                raise ValueError(f"build_prompts: prompts must be strings without chat_template, got {bad[0]}")
            texts = list(prompts)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # --------------------------------------------------------------- generation
    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 num_samples: int = 1) -> Generation:
        """Sample ``num_samples`` completions per prompt (rows ``i * num_samples + j``).

        ``prompts``: strings / conversations (see :meth:`build_prompts`) or a pre-tokenized
        ``(input_ids, attention_mask)`` pair. The other arguments are those of
        :func:`flowrl.llm.generate.generate`.
        """
        if isinstance(prompts, tuple) and len(prompts) == 2 and isinstance(prompts[0], Tensor):
            ids, am = prompts
        else:
            ids, am = self.build_prompts(prompts)
        if num_samples < 1:
            raise ValueError(f"generate: num_samples={num_samples}; must be >= 1")
        if num_samples > 1:
            ids, am = ids.repeat_interleave(num_samples, 0), am.repeat_interleave(num_samples, 0)
        if self.vllm is not None:
            return self.vllm.generate(ids, am, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, generator=generator)
        was_training = self.model.training
        self.model.eval()
        try:
            return generate(self.model, ids, am, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_token_id=self.tokenizer.eos_token_id,
                            pad_token_id=self.tokenizer.pad_token_id, generator=generator)
        finally:
            self.model.train(was_training)

    def logprobs(self, gen: Generation, *, with_entropy: bool = False, model=None):
        """Teacher-forced log-probs of ``gen``'s completion tokens (float [B, T], with grad).

        Uses ``gen.temperature``; ``model`` overrides the pipeline's model (e.g. a frozen reference).
        """
        return token_logprobs(model if model is not None else self.model, gen.input_ids, gen.attention_mask,
                              gen.completion_mask, temperature=gen.temperature, with_entropy=with_entropy)

    def decode(self, gen: Generation, *, skip_special_tokens: bool = True) -> list[str]:
        """Completion texts (EOS and padding dropped)."""
        ids = torch.where(gen.completion_mask, gen.completion_ids, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    # --------------------------------------------------------------- training plumbing (flowrl.llm.LLMPipeline)
    @property
    def external_sampler(self) -> bool:
        """Whether vLLM samples (its log-probs then differ from the trainer's recompute)."""
        return self.vllm is not None

    def sync_sampler(self) -> None:
        """Copy the trained weights into the vLLM engine (a no-op without one). Under LoRA the adapters are
        merged into the base weights for the copy and unmerged after, and vLLM gets the base model's names."""
        if self.vllm is None:
            return
        if self.is_lora:
            self.model.merge_adapter()
            try:
                state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                         for k, v in self.model.state_dict().items() if "lora_" not in k}
                self.vllm.load_weights(state)
            finally:
                self.model.unmerge_adapter()
        else:
            self.vllm.load_weights(self.model.state_dict())

    @property
    def is_lora(self) -> bool:
        """Whether ``model`` is a peft model with adapters."""
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[Any]:
        """The model with its LoRA adapters disabled (the reference policy), inside a ``with`` block."""
        if not self.is_lora:
            raise ValueError("adapters_disabled: the model has no LoRA adapters (load it with lora=...)")
        with self.model.disable_adapter():
            yield self.model

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (non-reentrant, so frozen inputs under LoRA work)."""
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def export(self, out_dir: str | Path, state: Optional[dict] = None) -> None:
        """Save the adapters under ``out_dir/lora`` (LoRA) or the model (safetensors) and its tokenizer under
        ``out_dir/model``; both load back with ``from_pretrained``. ``state``: the model's whole state dict to
        write (gathered from an FSDP-sharded model); default the model's own."""
        out_dir = Path(out_dir)
        if self.is_lora:
            self.model.save_pretrained(str(out_dir / "lora"), state_dict=state)
        else:
            self.model.save_pretrained(str(out_dir / "model"), safe_serialization=True, state_dict=state)
            self.tokenizer.save_pretrained(str(out_dir / "model"))

    def load_export(self, out_dir: str | Path) -> None:
        """Load what :meth:`export` wrote into ``out_dir`` into this model (the adapters under LoRA, else every
        weight); a missing file is a FileNotFoundError naming it."""
        out_dir = Path(out_dir)
        if self.is_lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            f = out_dir / "lora" / "adapter_model.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"no LoRA export at {f}")
            result = set_peft_model_state_dict(self.model, load_file(str(f), device=str(self.device)))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"LoRA export {f} has weights this model lacks: {result.unexpected_keys[:5]}")
            return
        from transformers import AutoModelForCausalLM

        d = out_dir / "model"
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"no model export at {d} (config.json missing)")
        saved = AutoModelForCausalLM.from_pretrained(str(d), dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict())  # strict: the same architecture


@register_pipeline("causal_lm", family="llm")
def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    lora: Optional[dict] = None,
    chat_template: bool = False,
    backend: str = "transformers",
    vllm_kwargs: Optional[dict] = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> CausalLMPipeline:
    """Load a causal LM and its tokenizer with ``from_pretrained``; optionally wrap the model in LoRA.

    Registered as the ``causal_lm`` LLM adapter: the trainer loads any ``llm.model`` that is not a registered
    adapter's name (a hub id or a local folder) with it.

    lora: keyword arguments of ``peft.LoraConfig`` (e.g. ``{"r": 8, "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"]}``); ``task_type`` defaults to ``CAUSAL_LM``. The tokenizer
    is set to left padding; a missing pad token becomes the EOS token. backend: "transformers" or
    "vllm" (the latter loads a vLLM engine from the same path for generation only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if backend not in ("transformers", "vllm"):
        raise ValueError(f"load_causal_lm: backend={backend!r}; valid: 'transformers', 'vllm'")
    dt = torch_dtype(dtype, who="dtype")
    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dt, revision=revision, trust_remote_code=trust_remote_code
    ).to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        cfg = dict(lora)
        cfg.setdefault("task_type", "CAUSAL_LM")
        model = get_peft_model(model, LoraConfig(**cfg))
    vllm = None
    if backend == "vllm":
        from flowrl.llm.vllm_backend import VLLMGenerator

        vllm = VLLMGenerator(name_or_path, tokenizer=tok, dtype=str(dt).replace("torch.", ""),
                             **(vllm_kwargs or {}))
    return CausalLMPipeline(model=model, tokenizer=tok, chat_template=chat_template, vllm=vllm)
