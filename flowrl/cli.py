"""The ``flowrl`` command. Subcommands register here; each lives in the module that does the work."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def _version(args: argparse.Namespace) -> int:
    import torch

    print(f"flowrl {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
    return 0


def _registries() -> list[str]:
    """One line per plug-in kind: the names a config may use."""
    from flowrl.core import ADVANTAGES, LOSSES
    from flowrl.pipelines.registry import pipeline_names
    from flowrl.rewards import PROCESS_REWARDS, REWARDS
    from flowrl.train.algorithms import ALGORITHMS

    return [f"algorithm: {', '.join(ALGORITHMS.names())}",
            f"advantage.estimator: {', '.join(sorted(ADVANTAGES))}",
            f"loss.name: {', '.join(sorted(LOSSES))}",
            f"flow.model: {', '.join(pipeline_names('flow'))}",
            f"llm.model: {', '.join(pipeline_names('llm'))}, or a transformers causal LM (hub id or local directory)",
            f"rewards: {', '.join(sorted(REWARDS))}",
            f"process rewards: {', '.join(sorted(PROCESS_REWARDS))}"]


def _train(args: argparse.Namespace) -> int:
    from flowrl.config import ConfigError, describe, load
    from flowrl.train.config import TrainConfig

    if args.help_config:
        print("\n".join(describe(TrainConfig)))
        print("\nregistered names:\n  " + "\n  ".join(_registries()))
        return 0
    if args.config is None:
        print("flowrl train: give a CONFIG file (e.g. configs/digits/flow_grpo.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load(TrainConfig, args.config, args.set)
    except ConfigError as e:
        print(f"flowrl train: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # checks and a memory estimate, no weights loaded (flowrl.train.preflight)
        from flowrl.train.preflight import run_preflight

        rc, failures = run_preflight(cfg, args.config)
        for f in failures:
            print(f"flowrl train --dry-run: {f}", file=sys.stderr)
        return rc
    from pathlib import Path

    from flowrl.rewards import MissingWeightsError
    from flowrl.train.algorithms import ALGORITHMS
    from flowrl.train.checkpoint import CheckpointError
    from flowrl.train.flow_data import PromptDataError
    from flowrl.train.loop import TrainingDiverged, train

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    try:  # the algorithm's registered factory builds the task; the loop only runs it
        result = train(cfg, out, resume=args.resume, build_task=ALGORITHMS[cfg.algorithm].build_task)
    except (CheckpointError, TrainingDiverged, MissingWeightsError, PromptDataError) as e:  # the user's to fix: one line
        print(f"flowrl train: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float))
        print(f"done: {out}/report.md ({summary})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flowrl.train.load_run import load_run

    cfg, task = load_run(args.run)
    if args.num_per_prompt:
        cfg.eval.num_per_prompt = args.num_per_prompt
    out = Path(args.run)
    metrics = task.evaluate(0, out / "eval")  # its grid goes to <run>/eval/samples/
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from torchvision.utils import save_image

    from flowrl.flow.sampler import sample

    if args.run:
        from flowrl.train.load_run import load_run

        cfg, task = load_run(args.run)
        pipe = task.pipe
    else:
        from flowrl.pipelines.registry import load_pipeline

        pipe = load_pipeline(args.model, args.model_path, family="flow",
                             device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32)
    from flowrl.flow.pipeline import PromptDefaults

    prompts = args.prompt or (pipe.default_prompts() if isinstance(pipe, PromptDefaults) else None)
    if not prompts:
        print("flowrl sample: give --prompt (repeatable; this model has no default prompts)", file=sys.stderr)
        return 2
    guidance = None
    if args.guidance_scale:
        from flowrl.flow.guidance import Guidance
        from flowrl.rewards import build_process_reward

        guidance = Guidance(build_process_reward(args.process_reward), scale=args.guidance_scale)
    imgs = sample(pipe, prompts, num_steps=args.steps, kind=args.kind, noise_level=args.noise_level,
                  cfg_scale=args.cfg_scale, samples_per_prompt=args.n, seed=args.seed, guidance=guidance)
    if imgs.dim() == 5:
        imgs = imgs[:, imgs.shape[1] // 2]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image(imgs.float().cpu(), args.out, nrow=args.n, padding=1, pad_value=0.5)
    print(f"wrote {args.out} ({len(prompts)} prompts x {args.n} samples)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="RL for flow-matching models and LLMs on one core.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("version", help="print the flowrl, torch and python versions")
    s.set_defaults(func=_version)
    s = sub.add_parser("train", help="train a model with a config (flow: configs/digits/*.yaml)")
    s.add_argument("config", nargs="?", help="YAML config file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    s.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    s.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")
    s.add_argument("--dry-run", action="store_true", help="check the config, data, rewards and model availability and "
                   "print the memory per rank, without loading weights; exit 2 with a sentence per failure")
    s.set_defaults(func=_train)
    s = sub.add_parser("eval", help="evaluate a finished run (its config and trained weights) on its fixed evaluation set")
    s.add_argument("run", help="run directory written by flowrl train")
    s.add_argument("--num-per-prompt", type=int, default=0, help="samples per evaluation prompt (default: the run's)")
    s.set_defaults(func=_eval)
    s = sub.add_parser("sample", help="sample images (a PNG grid) from a model or a trained run")
    s.add_argument("--run", default=None, help="a run directory (its model and trained weights)")
    s.add_argument("--model", default="digits", help="a registered flow model adapter (without --run; default digits)")
    s.add_argument("--model-path", default=None, help="hub id or local directory (without --run)")
    s.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; digits: all ten by default)")
    s.add_argument("-n", type=int, default=8, help="samples per prompt")
    s.add_argument("--steps", type=int, default=6, help="denoising steps")
    s.add_argument("--kind", default="ode", help="ode | flow_sde | dance_sde | cps")
    s.add_argument("--noise-level", type=float, default=0.7)
    s.add_argument("--cfg-scale", type=float, default=None)
    s.add_argument("--guidance-scale", type=float, default=0.0, help="process-reward gradient guidance (Euphonium); 0 = off")
    s.add_argument("--process-reward", default="digits_noisy", help="registered process reward used by --guidance-scale")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png", help="PNG grid to write")
    s.set_defaults(func=_sample)
    s = sub.add_parser("serve-reward", help="serve rewards over HTTP for trainers in other processes (flowrl.rewards.server)")
    s.add_argument("config", help="YAML: {rewards: {name: {weight, type, options}}, host, port, workers, name, limits}")
    s.add_argument("--host", default=None, help="bind address (default: the config's, else 127.0.0.1; others need a token)")
    s.add_argument("--port", type=int, default=None, help="port (default: the config's, else 8765; 0 = any free port)")
    s.add_argument("--token-env", default=None, help="name of the environment variable holding the bearer token")
    s.set_defaults(func=lambda a: __import__("flowrl.rewards.server", fromlist=["cli"]).cli(a))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
