"""Overhead of flowrl's rollout (SDE steps with log-probs) against the tool a user would otherwise run.

    .venv/bin/python scripts/bench_sampling.py [--repeats 7] [--threads 1]

1. tiny SD3 (real diffusers classes, random weights): ``flowrl.flow.sampler.rollout`` (flow_sde, log-probs, CFG,
   decode) against diffusers' own ``StableDiffusion3Pipeline.__call__`` on the same components: same steps, CFG scale,
   batch, seed, prompt encoding and VAE decode on both sides.
2. digits (the embedded model): the rollout against a bare loop of transformer calls with Euler steps (prompt
   encoding and decode included on both sides).

Runs alternate between the two sides; the table gives the median and the minimum wall time of each and the
ratio of the medians (the target is <= 1.10). One intra-op thread by default (a shared 2-core machine thrashes
with two); the thread count is printed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare(name: str, ours, theirs, repeats: int) -> dict:
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(ours))
        b.append(timed(theirs))
    row = {"case": name, "ours_med": statistics.median(a), "base_med": statistics.median(b), "ours_min": min(a),
           "base_min": min(b)}
    row["ratio_med"] = row["ours_med"] / row["base_med"]
    row["ratio_min"] = row["ours_min"] / row["base_min"]
    return row


def bench_sd3(repeats: int, steps: int, cfg: float, prompts: list[str], n: int) -> dict:
    from diffusers import StableDiffusion3Pipeline

    from flowrl.flow.sampler import rollout
    from flowrl.pipelines.sd3 import SD3Pipeline
    from flowrl.pipelines.tiny import build_tiny_sd3

    d = tempfile.mkdtemp(prefix="bench_sd3_")
    build_tiny_sd3(d)
    ours_p = SD3Pipeline.from_pretrained(d)
    ref = StableDiffusion3Pipeline.from_pretrained(d)
    ref.set_progress_bar_config(disable=True)
    # share the very same modules so that only the sampling code differs
    ref.transformer, ref.vae = ours_p.transformer, ours_p.vae
    ref.text_encoder, ref.text_encoder_2, ref.text_encoder_3 = (ours_p.clip[0][1], ours_p.clip[1][1], ours_p.t5[1])

    def ours():
        with torch.no_grad():
            t = rollout(ours_p, prompts, num_steps=steps, kind="flow_sde", noise_level=0.7, cfg_scale=cfg,
                        samples_per_prompt=n, seed=0)
        assert t.samples.shape[0] == len(prompts) * n and torch.isfinite(t.log_probs[:, :-1]).all()

    def theirs():
        out = ref(prompts, num_images_per_prompt=n, num_inference_steps=steps, guidance_scale=cfg,
                  generator=torch.Generator().manual_seed(0), output_type="pt", height=16, width=16).images
        assert out.shape[0] == len(prompts) * n

    return compare(f"tiny SD3, {steps} steps, CFG {cfg}, batch {len(prompts) * n}, 16x16 px", ours, theirs, repeats)


def bench_digits(repeats: int, steps: int, batch_per_digit: int) -> dict:
    from flowrl.flow.sampler import rollout
    from flowrl.pipelines.digits import digit_prompts, load_digits

    pipe = load_digits()
    prompts = digit_prompts(range(10))
    B = 10 * batch_per_digit

    def ours():
        t = rollout(pipe, prompts, num_steps=steps, kind="flow_sde", noise_level=0.7, samples_per_prompt=batch_per_digit,
                    seed=0)
        assert t.samples.shape == (B, 1, 8, 8)

    def bare():
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            c = pipe.encode_prompts(prompts)
            emb = c["prompt_embeds"].repeat_interleave(batch_per_digit, 0)
            pooled = c["pooled_prompt_embeds"].repeat_interleave(batch_per_digit, 0)
            x = torch.randn(B, 1, 8, 8, generator=g)
            pipe.scheduler.set_timesteps(steps)
            sig = pipe.scheduler.sigmas
            for k in range(steps):
                t = sig[k].expand(B) * 1000
                v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled,
                                     return_dict=False)[0]
                x = x + (sig[k + 1] - sig[k]) * v
            out = (x / 2 + 0.5).clamp(0, 1)
        assert out.shape == (B, 1, 8, 8)

    return compare(f"digits, {steps} steps, no CFG, batch {B} (flow_sde vs bare Euler loop)", ours, bare, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sd3-steps", type=int, default=10)
    ap.add_argument("--digits-steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_sd3(args.repeats, args.sd3_steps, 4.5, ["a photo of a cat", "a red dog on the mat"], 4),
            bench_digits(args.repeats, args.digits_steps, 16)]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.repeats} alternating repeats\n")
    print("| case | flowrl rollout median (min) s | baseline median (min) s | ratio median (min) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_med']:.4f} ({r['ours_min']:.4f}) | {r['base_med']:.4f} ({r['base_min']:.4f}) "
              f"| {r['ratio_med']:.3f} ({r['ratio_min']:.3f}) |")


if __name__ == "__main__":
    main()
