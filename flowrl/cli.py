"""The ``flowrl`` command. Subcommands register here; each lives in the module that does the work."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _version(args: argparse.Namespace) -> int:
    import torch

    print(f"flowrl {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from flowrl.config import ConfigError, describe, load
    from flowrl.train.config import TrainConfig

    if args.help_config:
        print("\n".join(describe(TrainConfig)))
        return 0
    if args.config is None:
        print("flowrl train: give a CONFIG file (e.g. configs/digits/flow_grpo.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load(TrainConfig, args.config, args.set)
    except ConfigError as e:
        print(f"flowrl train: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    from flowrl.train.loop import train

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    result = train(cfg, out, resume=args.resume)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float))
    print(f"done: {out}/report.md ({summary})")
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
    s.set_defaults(func=_train)
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
