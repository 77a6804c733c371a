"""What every command shares: error messages that name the file, output paths that are never
overwritten without --force, and tqdm progress bars on stderr."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

from ..errors import LycorisError

T = TypeVar("T")


class CommandError(Exception):
    """A failure the user can fix (bad argument, existing output file): printed, exit code 1."""


def add_output(parser: argparse.ArgumentParser, *, required: bool = True, help: str = "") -> None:
    """`--out FILE` and `--force` (replace FILE if it exists)."""
    parser.add_argument("--out", required=required, metavar="FILE",
                        help=help or "the .safetensors file to write (never overwritten without --force)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def check_output(path: str, force: bool, inputs: Iterable[str] = ()) -> None:
    """Refuse an output that exists (unless `force`) or that is one of the inputs, before any work."""
    for src in inputs:
        if src and os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path):
            raise CommandError(f"{path}: is also an input file; write the result to a new file")
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a folder, expected a .safetensors file path")
    if os.path.lexists(path) and not force:
        raise CommandError(f"{path}: file exists; pass --force to replace it")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "module",
             quiet: bool = False) -> Iterable[T]:
    """tqdm over `items` on stderr (shown only on a terminal or when asked), else the items."""
    if quiet:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a stripped install still works, just silently
        return items
    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None)


def run_command(name: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command; turn the errors users can act on into one line on stderr and exit code 1."""
    try:
        return func(args)
    except CommandError as exc:
        print(f"lycoris_core {name}: error: {exc}", file=sys.stderr)
    except LycorisError as exc:
        print(f"lycoris_core {name}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    except FileExistsError as exc:
        print(f"lycoris_core {name}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lycoris_core {name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
    return 1
