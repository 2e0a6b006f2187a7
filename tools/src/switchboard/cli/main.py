"""The `switchboard` command: one entry point, one subcommand per tool.

Each tool module exposes `add_parser(subparsers)`, which adds its subcommand and
sets `func` (a callable taking the parsed namespace and returning an exit code).
Modules are imported only when their subcommand runs, so `switchboard generate`
never pays for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module that defines it (module.add_parser(subparsers)).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("switchboard.cli.stack", "start all four services locally and wait until healthy"),
    "generate": ("switchboard.cli.client", "send a prompt to the gateway and stream the answer"),
    "experts": ("switchboard.experts.cli", "build, locate and sample the demo expert models"),
    "bench": ("switchboard.bench.cli", "replay request traces against Switchboard or an OpenAI-compatible server"),
    "router": ("switchboard.routing.cli", "build the router gate's data, train and evaluate it"),
    "scheduler": ("switchboard.simulation.cli", "evaluate placement policies in the cluster simulator"),
    "rollout": ("switchboard.cli.rollout", "start, inspect, pause, resume and abort model-revision rollouts"),
    "backup": ("switchboard.backup.cli_backup", "save the gate, policies, tenants file and price table into one archive"),
    "restore": ("switchboard.backup.cli_restore", "restore the gate, policies, tenants file and price table from a backup"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The top-level parser, with the chosen subcommand's own parser attached."""
    parser = argparse.ArgumentParser(prog="switchboard", description="Switchboard command line.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module_name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
