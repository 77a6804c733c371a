"""`inspect [FILE] [--json]`: what an adapter file holds (see `lycoris_core.inspect`)."""
from __future__ import annotations

import argparse
import sys

from ..inspect import run


def add_command(commands) -> None:
    parser = commands.add_parser(
        "inspect", help="report algorithms, ranks, alphas, dtypes, model parts, metadata, problems")
    parser.add_argument("file", nargs="?", help="adapter .safetensors file (default: the shipped "
                                                "example adapter)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    return run(args.file, as_json=args.json, out=sys.stdout, err=sys.stderr)
