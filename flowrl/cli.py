"""The ``flowrl`` command. Subcommands register here; each lives in the module that does the work."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _version(args: argparse.Namespace) -> int:
    import torch

    print(f"flowrl {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="RL for flow-matching models and LLMs on one core.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("version", help="print the flowrl, torch and python versions")
    s.set_defaults(func=_version)
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
