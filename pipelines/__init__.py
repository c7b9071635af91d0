"""Model adapters (import flowrl.pipelines): every flow model behind the one ``FlowPipeline`` protocol.

- ``SD3Pipeline``: Stable Diffusion 3 / 3.5 (and the pixel-space digits model)
- ``FluxPipeline``: FLUX.1 (packed latents, guidance embedding)
- ``WanPipeline``: Wan2.1 text-to-video
- ``load_digits`` and the digits reward models / judge: the embedded task
"""
from flowrl.pipelines.flux import FluxPipeline
from flowrl.pipelines.sd3 import SD3Pipeline
from flowrl.pipelines.wan import WanPipeline
from flowrl.pipelines.digits import (DigitClassifier, KNNJudge, NoisyDigitClassifier, digit_prompts, digits_build_info,
                                     digits_process_reward,
                                     digits_split, evaluate_digits, load_digit_classifier, load_digit_judge, load_digits,
                                     load_noisy_digit_classifier, parse_digits, sample_digits, score_digits)

__all__ = ["SD3Pipeline", "FluxPipeline", "WanPipeline", "digits_process_reward", "load_digits", "load_digit_classifier", "load_noisy_digit_classifier", "load_digit_judge",
           "DigitClassifier", "NoisyDigitClassifier", "KNNJudge", "digit_prompts", "parse_digits", "digits_split",
           "evaluate_digits", "sample_digits", "score_digits", "digits_build_info"]
