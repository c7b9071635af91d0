"""flowrl.llm: token trajectories for LLMs.

- :mod:`flowrl.llm.generate`: batched, left-padded sampling through transformers with per-token
  log-probs and entropies (:func:`generate` -> :class:`Generation`), and the teacher-forced recompute
  :func:`token_logprobs` that matches them (ratio 1 at unchanged weights).
- :mod:`flowrl.llm.steps`: reasoning-step segmentation (newline, regex, fixed chunks) that fills
  ``TrajectoryBatch.step``.
- :mod:`flowrl.llm.rollout`: :class:`TokenRollout`, the typed rows of one rollout (tokens, log-probs, rewards,
  texts) with ``cat`` (re-padding) and ``select``.
- :mod:`flowrl.llm.pipeline`: :class:`LLMPipeline`, the protocol every LLM adapter implements.
- :mod:`flowrl.llm.vllm_backend`: optional vLLM sampler (GPU; imported only when asked for).
"""
from .generate import Generation, generate, stop_mask, token_logprobs
from .pipeline import LLMPipeline
from .rollout import TokenRollout
from .steps import chunk_steps, newline_steps, regex_steps, segment_steps, step_texts

__all__ = [
    "Generation", "generate", "stop_mask", "token_logprobs", "LLMPipeline", "TokenRollout",
    "chunk_steps", "newline_steps", "regex_steps", "segment_steps", "step_texts",
]
