"""Command line: `python -m lycoris_core <command> ...`; the commands live in `lycoris_core.tools`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .tools import COMMANDS
from .tools.cli import run_command


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command of `lycoris_core.tools.COMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m lycoris_core",
                                     description="LyCORIS adapter file tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".tools.{name}", __package__).add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return run_command(args.command, args.run, args)
    except BrokenPipeError:  # `| head`: the reader left; stay quiet like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
