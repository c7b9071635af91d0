"""Reward-guided sampling (Euphonium) on the embedded digits model: the same noise with and without guidance.

The noisy-digit classifier is the process reward r(x_t, sigma_t, c) = log p(d | x_t, sigma_t); its gradient is
added to the SDE drift (drift = lambda * Delta * grad r). Writes a side-by-side PNG (unguided | guided, one
row per digit) and prints the judge's and the reward classifier's accuracy of each.

    .venv/bin/python scripts/guided_sampling.py [--scale 1.0] [--n 8] [--out guided.png]
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="guidance scale lambda")
    p.add_argument("--window", type=int, nargs=2, default=None, metavar=("START", "STOP"), help="guided steps [start, stop)")
    p.add_argument("--n", type=int, default=8, help="samples per digit")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="guided.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from torchvision.utils import make_grid, save_image

    from flowrl.flow.guidance import Guidance
    from flowrl.pipelines.digits import load_digits, sample_digits, score_digits
    from flowrl.rewards import build_process_reward

    pipe = load_digits()
    digits = torch.arange(10).repeat_interleave(args.n)
    guidance = Guidance(build_process_reward("digits_noisy"), scale=args.scale,
                        window=tuple(args.window) if args.window else None)
    plain = sample_digits(pipe, digits, num_steps=args.steps, seed=args.seed)
    guided = sample_digits(pipe, digits, num_steps=args.steps, seed=args.seed, guidance=guidance)
    for name, imgs in (("unguided", plain), ("guided", guided)):
        s = score_digits(imgs, digits)
        print(f"{name:>9}: judge accuracy {s['accuracy']:.1%}, reward-classifier accuracy {s['reward_accuracy']:.1%}, "
              f"realism {s['realism']:.3f}")
    left, right = (make_grid(x, nrow=args.n, padding=1, pad_value=0.5) for x in (plain, guided))
    grid = torch.cat([left, torch.ones(3, left.shape[1], 4), right], dim=2)
    save_image(grid, args.out)
    print(f"wrote {args.out} (left: unguided, right: guided with lambda = {args.scale})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
