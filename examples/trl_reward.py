"""A reward function in TRL's signature, outside the flowrl package: name it in a config as
``examples/trl_reward.py:exact_answer`` (see configs/arith/trl_reward.yaml).

TRL calls ``reward_func(prompts=..., completions=..., **columns)`` with the dataset's extra columns as keyword
arguments (here ``answer``) and reads back one float per completion; flowrl calls it the same way, unchanged.
"""
import re

# the answer line of the embedded arithmetic model's completions: "...\nA:1332"
ANSWER_LINE = re.compile(r"^A:(-?\d+)$", re.MULTILINE)


def exact_answer(prompts, completions, answer, **kwargs):
    """1.0 when the first answer line ``A:<n>`` of the completion equals the row's ``answer``, else 0.0."""
    scores = []
    for completion, gold in zip(completions, answer):
        m = ANSWER_LINE.search(completion)
        scores.append(1.0 if m is not None and m.group(1) == str(gold).strip() else 0.0)
    return scores
