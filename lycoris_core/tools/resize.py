"""`resize IN --out F (--rank R | --sv-*)`: change the rank of a LoRA/LoCon/DoRA file by SVD.

Each LoRA/LoCon module's change `scale * up @ (mid) @ down` is re-factored from its factors (QR
of both, SVD of the small core: never the dense weight), so every singular value is exact and
the kept rank is the best approximation there is (Eckart-Young). LoHa and LoKr modules are
converted to LoRA through their dense change (one out x in matrix at a time). DoRA keeps its
`dora_scale` (the magnitudes), so only the direction's change is approximated. Other algorithms change W in ways a LoRA cannot hold: refused, or copied unchanged
with --keep-unsupported.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable

import torch

from ..adapter_file import load_file
from ..algos import Adapter
from ..algos.lora import LoRA
from ..errors import LycorisError
from ..io import DTYPES as FILE_DTYPES
from ..save import save_file, standard_metadata
from .cli import CommandError, add_output, check_output, progress
from .extract import (DTYPES, ModuleRow, ToolResult, add_common_options, add_rank_options,
                      device_from, print_report, rank_rules, report_lines)
from .lowrank import Factors, RankRule, Solver, exact_range, low_rank, low_rank_factored

FP32 = torch.float32


def _lora_factors(adapter: LoRA, rule: RankRule, device) -> Factors:
    p = adapter.prepare(device, FP32)  # up_mat carries alpha/rank and the scalar; mid is folded
    return low_rank_factored(p["up_mat"], p["down_mat"], rule)


def _dense_factors(adapter: Adapter, rule: RankRule, device) -> Factors:
    shape = adapter.target_shape
    if shape is None:
        raise LycorisError(f"{adapter.algo} module does not tell its weight shape; cannot convert",
                           file=adapter.file, key=adapter.name)
    p = adapter.prepare(device, FP32)
    zero = torch.zeros(shape, device=device, dtype=FP32)  # the change does not read W
    diff = adapter.diff(zero, None, p).reshape(shape[0], -1)
    factors = exact_range(diff)  # LoHa/LoKr changes are of low rank: factor them exactly first
    if factors is not None:
        return low_rank_factored(*factors, rule)
    return low_rank(diff, rule, Solver())


# algorithm -> how its change becomes LoRA factors (a registry: add an entry to convert more)
RESIZERS: dict[str, Callable[[Adapter, RankRule, torch.device], Factors]] = {
    "lora": _lora_factors,
    "loha": _dense_factors,
    "lokr": _dense_factors,
}


def _new_module(adapter: Adapter, factors: Factors, out_name: str) -> LoRA:
    """A LoRA/LoCon (alpha = rank, scale 1) with the adapter's layout and its dora_scale."""
    shape = adapter.target_shape
    r = factors.rank
    up, down = factors.up.cpu(), factors.down.cpu()
    if shape is not None and len(shape) > 2:
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(r))}
    if adapter.dora_scale is not None:
        tensors["dora_scale"] = adapter.dora_scale.detach().cpu()
    return LoRA.load(tensors, name=adapter.name, file=out_name)


def _is_conv_kernel(adapter: Adapter) -> bool:
    shape = adapter.target_shape
    return shape is not None and len(shape) > 2 and math.prod(shape[2:]) > 1


def resize(source, *, rule: RankRule, conv_rule: RankRule | None = None,
           device: str | torch.device = "cpu", keep_unsupported: bool = False,
           out_name: str = "<output>",
           iterate: Callable[[Iterable, int], Iterable] = lambda items, total: items):
    """(the source AdapterFile, the new modules with their report) for every module of `source`
    (an AdapterFile, a file path or a state dict). `iterate(items, total)` wraps the loop."""
    started = time.perf_counter()
    adapters = source if hasattr(source, "adapters") else load_file(source)
    conv_rule = conv_rule or rule
    result = ToolResult({}, [])
    names = list(adapters)
    for name in iterate(names, len(names)):
        adapter = adapters[name]
        resizer = RESIZERS.get(adapter.algo)
        if resizer is None:
            if not keep_unsupported:
                raise LycorisError(
                    f"{adapter.algo} module cannot be expressed as a LoRA (its change depends on the "
                    f"base weight or is not a matrix); resizable: {', '.join(RESIZERS)} (+DoRA). "
                    "Pass --keep-unsupported to copy such modules unchanged", file=adapters.path,
                    key=name)
            result.adapters[name] = adapter
            result.skipped[f"{adapter.algo}, copied unchanged"] += 1
            continue
        with torch.no_grad():
            factors = resizer(adapter, conv_rule if _is_conv_kernel(adapter) else rule, device)
        new = _new_module(adapter, factors, out_name)
        result.adapters[name] = new
        shape = adapter.target_shape or (new.up.shape[0], new.down.shape[1])
        note = f"{adapter.algo} rank {adapter.rank}" + (" (tucker)" if getattr(adapter, "mid", None)
                                                        is not None else "")
        note += " +dora" if adapter.dora_scale is not None else ""
        result.rows.append(ModuleRow(name, tuple(shape), factors.rank, factors.kept,
                                     factors.rel_error, note))
    result.seconds = time.perf_counter() - started
    return adapters, result


def file_dtype(adapters) -> torch.dtype:
    """The most common float dtype of the file's tensors (alpha excluded)."""
    counts = Counter(d for k, d in adapters.dtypes.items() if not k.endswith("alpha"))
    for name, _ in counts.most_common():
        dtype = FILE_DTYPES[name][0] if name in FILE_DTYPES else None
        if dtype is not None and dtype.is_floating_point and dtype.itemsize > 1:
            return dtype
    return FP32


def resized_metadata(adapters, new: dict, rule: RankRule, source_name: str) -> dict[str, str]:
    """The source file's metadata with the network fields of the resized modules (kohya's
    "Dynamic" dim and alpha for a per-module rule, as its resize script writes them)."""
    meta = dict(adapters.metadata)
    meta.update(standard_metadata(new, extra={
        "ss_training_comment": f"resized from {source_name} ({rule.describe()})"}))
    if rule.method != "fixed":
        meta["ss_network_dim"] = meta["ss_network_alpha"] = "Dynamic"
    return meta


def add_command(commands) -> None:
    parser = commands.add_parser(
        "resize", help="change the rank of a LoRA/LoCon/DoRA file by SVD (LoHa/LoKr become LoRA)",
        description="Re-factor every module's change at a new rank (fixed, or per module by an "
                    "--sv-* rule) and report the relative Frobenius error per module.")
    parser.add_argument("file", metavar="IN", help="adapter .safetensors file")
    add_output(parser)
    add_rank_options(parser, default_rank=None)
    parser.add_argument("--keep-unsupported", action="store_true",
                        help="copy modules of other algorithms (OFT, (IA)^3, GLoRA, full, norm) "
                             "unchanged instead of refusing the file")
    add_common_options(parser, "the input file's")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, inputs=(args.file,))
    rule, conv_rule = rank_rules(args)
    device = device_from(args)
    adapters, result = resize(
        args.file, rule=rule, conv_rule=conv_rule, device=device,
        keep_unsupported=args.keep_unsupported, out_name=args.out,
        iterate=lambda items, total: progress(items, total=total, desc="resize", quiet=args.quiet))
    print_report(report_lines(result.rows, result.skipped, what="resized",
                              skip_unit="module"), args.quiet)
    if not result.adapters:
        raise CommandError(f"{args.file}: no module to resize")
    meta = resized_metadata(adapters, result.adapters, rule, os.path.basename(args.file))
    dtype = DTYPES[args.dtype] if args.dtype else file_dtype(adapters)
    save_file(result.adapters, args.out, meta, dtype=dtype, overwrite=args.force)
    print(f"wrote {args.out} ({len(result.adapters)} modules, {result.seconds:.1f} s)",
          file=sys.stderr if args.quiet else sys.stdout)
    return 0
