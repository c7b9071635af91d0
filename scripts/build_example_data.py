"""Write the shipped arithmetic example set: ``data/arith_math.jsonl`` (training) and ``data/arith_math_eval.jsonl``
(held-out), rows ``{"prompt": "Q:347+985\\n", "answer": "1332"}`` in the embedded arithmetic model's own prompt
format, with the sum as the reference answer (what ``math_verify`` and ``examples/trl_reward.py`` check).

The training rows are ``make_problems(2000, split="train", seed=0)``, the evaluation rows
``make_problems(200, split="heldout", seed=1234)``: the held-out problems of ``configs/arith/grpo.yaml``'s
evaluation (eval.seed 1234), so the accuracies of the JSONL configs compare with it.

    python scripts/build_example_data.py
"""
from __future__ import annotations

import json
from pathlib import Path

from flowrl.pipelines.arithmetic import make_problems, prompt_text

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, pairs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for a, b in pairs:
            f.write(json.dumps({"prompt": prompt_text(a, b), "answer": str(a + b)}) + "\n")


if __name__ == "__main__":
    (ROOT / "data").mkdir(exist_ok=True)
    write(ROOT / "data" / "arith_math.jsonl", make_problems(2000, split="train", seed=0))
    write(ROOT / "data" / "arith_math_eval.jsonl", make_problems(200, split="heldout", seed=1234))
