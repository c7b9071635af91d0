"""The embedded countdown model: a tiny character-level causal LM for reasoning-gym's countdown task.

Countdown (reasoning-gym, ``reasoning_gym.create_dataset("countdown", ...)``): reach the target with ``+ - * /``
using each given number once. The model reads the compact prompt of
:func:`flowrl.rewards.reasoning_gym_tasks.compact_prompt` and writes the expression alone, then EOS:

    prompt      ``7 2 5=17:``          (the entry's metadata numbers, space-separated, ``=`` target, ``:``)
    completion  ``5*2+7``              (scored as is by reasoning-gym's own ``score_answer``: no tag needed)

Its alphabet (``CHARS``, 19 characters) covers exactly these prompts and answers. The shipped weights
(``countdown_weights/``: 1,052,544 parameters, 4.2 MB) are built by ``python scripts/build_countdown.py`` on the
task options ``TASK_OPTIONS`` (3 numbers in 1..10, target 1..100) with systematically noisy targets (a "buggy
student" writes ``+`` for ``*``; its docstring gives the run), so that greedy decoding solves 25.5% of the
trainer's 200 held-out puzzles: headroom for RL. The trainer loads them with ``llm.model: countdown`` and
``llm.prompt_format: compact`` (``configs/countdown/tiny_grpo.yaml``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .arithmetic import SPECIALS, char_llama_config, char_tokenizer, load_embedded_lm
from .registry import register_pipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "countdown_weights"

# digits and operators of the answers; space, '=' and ':' of the compact prompt
CHARS = "0123456789+-*/() =:"
# the reasoning-gym countdown options the shipped model was trained on (and configs/countdown/tiny_grpo.yaml uses)
TASK_OPTIONS = {"min_numbers": 3, "max_numbers": 3, "min_value": 1, "max_value": 10, "min_target": 1,
                "max_target": 100}
MAX_LENGTH = 64


def build_tokenizer():
    """The countdown model's character tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then ``CHARS``)."""
    return char_tokenizer(CHARS, model_max_length=MAX_LENGTH)


def model_config(vocab_size: int = len(SPECIALS) + len(CHARS)):
    """The Llama config of the embedded countdown model: hidden 128, 4 layers, 4 heads, MLP 512, tied embeddings."""
    return char_llama_config(vocab_size, max_positions=MAX_LENGTH)


@register_pipeline("countdown", family="llm")
def load_countdown(path: Optional[str | Path] = None, **kwargs):
    """Load the shipped countdown model as a :class:`flowrl.pipelines.causal_lm.CausalLMPipeline`.

    Registered as the ``countdown`` LLM adapter (``llm.model: countdown``; ``llm.model_path`` is ``path``).

    ``path`` defaults to the weights inside the installed package; ``kwargs`` go to
    :func:`flowrl.pipelines.causal_lm.load_causal_lm` (dtype, device, lora, ...).
    """
    return load_embedded_lm("countdown", WEIGHTS_DIR if path is None else path, "scripts/build_countdown.py", **kwargs)
