"""`info [FILE] [--json] [--triggers N]`: the full report of an adapter file: inspect's report plus
the sha256 / AutoV1 / AutoV2 / AutoV3 hashes, kohya training arguments and trigger words."""
from __future__ import annotations

import argparse
import sys

from ..inspect import run_info
from .cli import progress


def add_command(commands) -> None:
    parser = commands.add_parser(
        "info", help="full report: inspect + hashes (sha256, AutoV2), training arguments, trigger words")
    parser.add_argument("file", nargs="?", help="adapter .safetensors file (default: the shipped "
                                                "example adapter)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--triggers", type=int, default=10, metavar="N",
                        help="list at most N trigger words (default 10)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar while hashing")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    def bar(chunks, total):
        return progress(chunks, total=total, desc="hashing", unit="MiB", quiet=args.quiet)

    return run_info(args.file, as_json=args.json, out=sys.stdout, err=sys.stderr,
                    triggers=max(0, args.triggers), hash_progress=bar)
