"""Command line: `python -m lycoris_core inspect [FILE] [--json]`."""
from __future__ import annotations

import argparse
import os
import sys

from .inspect import run


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m lycoris_core",
                                     description="LyCORIS adapter file tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="report algorithms, ranks, alphas, dtypes, model parts, metadata, problems")
    inspect.add_argument("file", nargs="?", help="adapter .safetensors file (default: the shipped "
                                                 "example adapter)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        return run(args.file, as_json=args.json, out=sys.stdout, err=sys.stderr)
    except BrokenPipeError:  # `| head`: the reader left; stay quiet like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
