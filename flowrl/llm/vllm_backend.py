"""Optional vLLM generation backend, behind the same interface as :func:`flowrl.llm.generate.generate`.

Needs a GPU and ``pip install vllm`` (not a dependency of flowrl); vLLM is imported only when a
:class:`VLLMGenerator` is created, and a clear ``ImportError`` with the install command is raised
when it is missing. It is not exercised by the test suite (no GPU there); only that error path is.

How it is used (``load_causal_lm(path, backend="vllm")`` wires it into the adapter):

    gen = VLLMGenerator("Qwen/Qwen2.5-0.5B-Instruct", tokenizer=tok, gpu_memory_utilization=0.3)
    g = gen.generate(input_ids, attention_mask, max_new_tokens=256, temperature=1.0)
    old_logp = token_logprobs(policy, g.input_ids, g.attention_mask, g.completion_mask)  # trainer's view
    w, m = importance_weights(old_logp, g.sampler_logp, g.completion_mask, level="token", mode="truncate")

What the log-probs mean. The engine is created with ``logprobs_mode="processed_logprobs"`` (vLLM >=
0.10.2), so the log-prob vLLM reports for each sampled token (``SamplingParams(logprobs=0)``: the
sampled token only) is taken from the distribution it actually sampled from: after temperature and
top-k/top-p, i.e. ``log pi_S(y_t)`` in :mod:`flowrl.llm.generate`'s notation. (vLLM's default,
``raw_logprobs``, would ignore the temperature.) Because vLLM's kernels differ from the trainer's
forward pass, these numbers are *not* the trainer's: the returned :class:`Generation` carries them
in both ``logp`` and ``sampler_logp``; the trainer recomputes its own ``old_logp`` with
:func:`token_logprobs` and multiplies the per-token loss by
``flowrl.core.importance_weights(old_logp, sampler_logp, mask)`` (TIS / MIS). ``entropy`` is
None (vLLM returns no full distribution); compute it in the trainer's forward pass if needed.

Weights: after each policy update call :meth:`VLLMGenerator.load_weights` with the policy's
(merged, for LoRA) ``state_dict`` so the engine samples from the current policy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .generate import Generation, _check_prompts

INSTALL_HINT = (
    "the vLLM backend needs the `vllm` package and a CUDA GPU: `pip install vllm` "
    "(see https://docs.vllm.ai/en/latest/getting_started/installation/); "
    "or use backend='transformers', which needs neither"
)


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # pragma: no branch
        raise ImportError(INSTALL_HINT) from e
    return vllm


class VLLMGenerator:
    """A vLLM engine that returns :class:`Generation` objects for left-padded token prompts.

    model: a hub id or local path (the same one the trainer loads); tokenizer: the transformers
    tokenizer (for EOS / pad ids); dtype: "float32" | "bfloat16" | "float16"; other keyword arguments
    go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``, ``tensor_parallel_size``, ``seed``).
    """

    def __init__(self, model: str, *, tokenizer, dtype: str = "bfloat16", **llm_kwargs):
        vllm = _import_vllm()
        self._vllm = vllm
        self.tokenizer = tokenizer
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.llm = vllm.LLM(model=model, tokenizer=model, dtype=dtype, **llm_kwargs)
        eos = tokenizer.eos_token_id
        self.eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0])

    def generate(self, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> Generation:
        """Sample one completion per row of the left-padded prompts; see the module docstring."""
        _check_prompts(input_ids, attention_mask)
        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens}; must be >= 1")
        if temperature < 0:
            raise ValueError(f"generate: temperature={temperature}; must be >= 0 (0 = greedy)")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
        params = self._vllm.SamplingParams(
            n=1, temperature=float(temperature), top_k=(top_k if top_k is not None else -1),
            top_p=(top_p if top_p is not None else 1.0), max_tokens=max_new_tokens, logprobs=0,
            stop_token_ids=self.eos_ids, seed=seed, skip_special_tokens=False,
        )
        am = attention_mask.bool()
        prompts = [{"prompt_token_ids": row[m].tolist()} for row, m in zip(input_ids.cpu(), am.cpu())]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        B = input_ids.shape[0]
        T = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        logp = torch.zeros((B, T), dtype=torch.float32)
        mask = torch.zeros((B, T), dtype=torch.bool)
        truncated = torch.zeros(B, dtype=torch.bool)
        for b, o in enumerate(outputs):  # vLLM returns Python lists per request
            c = o.outputs[0]
            toks = list(c.token_ids)
            n = len(toks)
            ids[b, :n] = torch.tensor(toks, dtype=torch.long)
            # c.logprobs: one dict {token_id: Logprob} per generated token, holding the sampled one
            logp[b, :n] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, toks)], dtype=torch.float32)
            mask[b, :n] = True
            truncated[b] = c.finish_reason == "length"
        dev = input_ids.device
        logp = logp.to(dev)
        return Generation(
            prompt_ids=input_ids, prompt_mask=am, completion_ids=ids.to(dev), completion_mask=mask.to(dev),
            logp=logp, entropy=None, truncated=truncated.to(dev), sampler_logp=logp,
            temperature=1.0 if temperature == 0 else float(temperature),
        )

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Push the policy's weights into the engine (single-process engine).

        Uses the model runner of vLLM's in-process engine (``collective_rpc`` to every worker); the
        path differs across vLLM versions, so a failure here names the version in its error.
        """
        items = list(state_dict.items())

        def _load(worker):  # runs inside each vLLM worker
            worker.model_runner.model.load_weights(weights=items)

        try:
            self.llm.collective_rpc(_load)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(
                f"VLLMGenerator.load_weights failed on vLLM {getattr(self._vllm, '__version__', '?')}: {e}; "
                "weight sync uses LLM.collective_rpc and worker.model_runner.model.load_weights"
            ) from e
