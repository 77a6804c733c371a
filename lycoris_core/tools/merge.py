"""`merge`: bake adapters into a checkpoint, or merge several LoRAs into one LoRA.

    merge --base CKPT --adapter F[:strength] ... --out OUT [--dtype fp16|bf16|fp32] [--blocks SPEC]
    merge --adapter F[:strength] ... --out LORA --rank R

Baking streams the checkpoint tensor by tensor (memory-mapped): a patched tensor is read once,
turned into fp32, every adapter that targets it is merged in turn (in the order given, as chained
loaders patch it), then cast to the output dtype; all other tensors and the metadata are copied.
The output is written beside its final name and renamed into place; the input is never touched.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..adapter_file import AdapterFile, load_file
from ..blocks import parse_spec, scaled_strengths
from ..checkpoint_names import CheckpointNames, KeyTarget, parse_name
from ..errors import LycorisError, LycorisShapeError, plural
from ..io import DTYPES as IO_DTYPES
from ..io import TensorSource, write_safetensors, write_streamed
from ..native_names import swap_halves
from .cli import CommandError, add_output, check_output, progress
from .lowrank import RankRule, low_rank

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32 = torch.float32
MAX_LISTED = 10


def parse_adapter(text: str) -> tuple[str, float]:
    """`FILE[:strength]` -> (file, strength); a suffix that is no number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            value = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise CommandError(f"{text}: strength must be a finite number, not {tail!r}")
        return path, value
    return text, 1.0


@dataclass(frozen=True)
class Patch:
    """One adapter module merged into one checkpoint tensor."""

    name: str
    adapter: object
    strength: float
    target: KeyTarget


@dataclass
class BakePlan:
    """What goes where: patches per checkpoint key, and the modules that matched nothing."""

    weights: dict[str, list[Patch]] = field(default_factory=dict)
    biases: dict[str, list[Patch]] = field(default_factory=dict)
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # file -> module names
    zero: int = 0

    @property
    def modules(self) -> int:
        return sum(len(p) for p in self.weights.values())


def _narrowed(shape: tuple[int, ...], offset) -> tuple[int, ...]:
    if offset is None:
        return shape
    dim, start, length = offset
    return shape[:dim] + (length,) + shape[dim + 1:]


def plan_bake(src, files: Sequence[tuple[AdapterFile, float]], blocks=None) -> BakePlan:
    """Map every module of every file to its checkpoint key and check shapes; raise (naming file,
    module and key) before anything is written when a module does not fit."""
    names = CheckpointNames.from_shapes({k: src.shape(k) for k in src})
    spec = parse_spec(blocks) if blocks is not None else None
    plan = BakePlan()
    errors: list[str] = []
    for adapters, strength in files:
        found, missing = names.resolve_all(adapters)
        if missing:
            plan.unmatched[adapters.path] = missing
        keys = {n: t.key for n, t in found.items()}
        strengths = (scaled_strengths(found, spec, strength, keys) if spec is not None
                     else dict.fromkeys(found, strength))
        for name, target in found.items():
            adapter = adapters[name]
            if strengths[name] == 0:
                plan.zero += 1
                continue
            where = f"{adapters.path}: {name} -> {target.key}"
            dtype = src.dtype_name(target.key)
            if dtype.startswith("F8") or not dtype.startswith(("F", "BF")):
                errors.append(f"{where}: the checkpoint stores this weight as {dtype}; bake into a "
                              "float16/bfloat16/float32 checkpoint")
                continue
            try:
                adapter.check_target(_narrowed(src.shape(target.key), target.offset))
            except LycorisError as exc:
                errors.append(f"{where}: {exc.reason}")
                continue
            patch = Patch(name, adapter, strengths[name], target)
            plan.weights.setdefault(target.key, []).append(patch)
            if adapter.merge_bias(None, 1.0) is not None:
                if target.bias_key not in src:
                    errors.append(f"{where}: changes the bias but the checkpoint has no {target.bias_key}")
                    continue
                plan.biases.setdefault(target.bias_key, []).append(patch)
    if errors:
        shown = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise LycorisShapeError(f"{plural(len(errors), 'module')} do not fit this checkpoint, nothing "
                                f"was written:\n  {shown}{more}", file=src.path)
    if not plan.weights and not plan.zero:
        listed = ", ".join(f"{os.path.basename(f)} ({len(n)})" for f, n in plan.unmatched.items())
        raise LycorisError(f"no module of the adapters matches a weight of this checkpoint "
                           f"(made for another model?); unmatched: {listed}", file=src.path)
    return plan


def _apply(work: torch.Tensor, patch: Patch, store_dtype: torch.dtype) -> None:
    """Merge one module into the fp32 tensor `work` in place (its rows or swapped halves)."""
    target = patch.target
    view = work.narrow(*target.offset) if target.offset is not None else work
    if target.swap_halves:
        merged = patch.adapter.merge(swap_halves(view), patch.strength, store_dtype=store_dtype)
        view.copy_(swap_halves(merged))
    else:
        patch.adapter.merge(view, patch.strength, inplace=True, store_dtype=store_dtype)


def _apply_bias(work: torch.Tensor, patch: Patch) -> None:
    offset = patch.target.offset
    view = work.narrow(0, offset[1], offset[2]) if offset is not None and offset[0] == 0 else work
    new = patch.adapter.merge_bias(view, patch.strength)
    if new is not view:
        view.copy_(new)


def _out_dtype(src_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """--dtype applies to 16/32/64-bit floats; integers, bools and fp8 keep their dtype."""
    if dtype is None or not src_dtype.is_floating_point or src_dtype.itemsize < 2:
        return src_dtype
    return dtype


@dataclass
class BakeResult:
    """The file written, what was merged where, and how many tensors it holds."""

    path: str
    plan: BakePlan
    keys: int


def bake_checkpoint(base: str, files: Sequence[tuple[AdapterFile, float]], out: str, *,
                    dtype: torch.dtype | None = None, blocks=None, overwrite: bool = False,
                    wrap: Callable[[Iterable[str]], Iterable[str]] = iter) -> BakeResult:
    """Write `base` with every adapter merged (strength per file, times `blocks` per module) to
    `out`. Floats are cast to `dtype` when given, else each tensor keeps the checkpoint's dtype."""
    if os.path.exists(out) and os.path.samefile(base, out):
        raise LycorisError("is the checkpoint being read: write the result to a new file", file=out)
    src = TensorSource(base)
    plan = plan_bake(src, files, blocks)
    specs = {k: (_out_dtype(IO_DTYPES[src.dtype_name(k)][0], dtype), src.shape(k)) for k in src}

    def produce(key: str) -> torch.Tensor:
        tensor = src[key]
        store = specs[key][0]
        patches = plan.weights.get(key, [])
        bias_patches = plan.biases.get(key, [])
        if not patches and not bias_patches:
            return tensor.to(store)
        work = tensor.to(FP32, copy=True)
        with torch.no_grad():
            for patch in patches:
                _apply(work, patch, store)
            for patch in bias_patches:
                _apply_bias(work, patch)
        return work.to(store)

    metadata = dict(src.metadata)
    metadata["lycoris_baked"] = json.dumps(
        [{"file": os.path.basename(a.path), "strength": s} for a, s in files]
        + ([{"blocks": str(parse_spec(blocks))}] if blocks is not None else []))
    write_streamed(out, specs, produce, metadata, overwrite=overwrite, wrap=wrap)
    return BakeResult(out, plan, len(specs))


# ----- several LoRAs into one ---------------------------------------------------------------------

@dataclass(frozen=True)
class MergedModule:
    """One module of a merged LoRA: its name (from the first file that has it), factors and the
    relative Frobenius error of the rank-R approximation of the summed change."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    rel_error: float
    sources: int


def _summed_changes(files: Sequence[tuple[AdapterFile, float]], blocks=None) -> dict:
    """{module ref: (name, fp32 sum of strength x change, number of files)}; a module whose change
    needs the base weight (DoRA, OFT, (IA)^3, GLoRA, set_weight) or changes a bias is refused."""
    spec = parse_spec(blocks) if blocks is not None else None
    sums: dict = {}
    for adapters, strength in files:
        strengths = (scaled_strengths(adapters, spec, strength) if spec is not None
                     else dict.fromkeys(adapters, strength))
        for name, adapter in adapters.items():
            if adapter.depends_on_weight or adapter.target_shape is None:
                raise LycorisError(f"{adapter.algo}{' with DoRA' if adapter.dora_scale is not None else ''} "
                                   "changes the weight in a way that depends on the weight itself: merge it "
                                   "into a checkpoint with --base instead", file=adapters.path, key=name)
            if adapter.merge_bias(None, 1.0) is not None:
                raise LycorisError("changes the bias, which a LoRA cannot hold: merge it into a "
                                   "checkpoint with --base instead", file=adapters.path, key=name)
            ref = parse_name(name)
            zero = torch.zeros(adapter.target_shape, dtype=FP32)
            change = adapter.merge(zero, strengths[name], inplace=True)
            if ref in sums:
                first, total, count = sums[ref]
                if total.numel() != change.numel() or total.shape[0] != change.shape[0]:
                    raise LycorisShapeError(f"changes a weight of shape {list(change.shape)}, but "
                                            f"{first} in an earlier file changes {list(total.shape)}",
                                            file=adapters.path, key=name)
                total.add_(change.reshape(total.shape))
                sums[ref] = (first, total, count + 1)
            else:
                sums[ref] = (name, change, 1)
    return sums


def _lora_factors(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, relative error) of the best rank-`rank` approximation of a change (the shared
    truncated SVD); convs get down (r, in, kh, kw) and up (out, r, 1, 1)."""
    factors = low_rank(change.reshape(change.shape[0], -1), RankRule("fixed", rank))
    down, up = factors.down, factors.up
    if change.ndim > 2:
        down = down.reshape((factors.rank,) + tuple(change.shape[1:]))
        up = up.reshape(up.shape + (1,) * (change.ndim - 2))
    return down, up, factors.rel_error


def merge_loras(files: Sequence[tuple[AdapterFile, float]], rank: int, *, blocks=None,
                wrap: Callable[[Iterable], Iterable] = iter) -> list[MergedModule]:
    """Sum every module's change over the files (strength x block multiplier each) and factor the
    sum back to a LoRA of rank `rank`; modules present in only some files are fine."""
    if rank < 1:
        raise CommandError(f"--rank must be at least 1, not {rank}")
    sums = _summed_changes(files, blocks)
    out = []
    for name, total, count in wrap(list(sums.values())):
        down, up, error = _lora_factors(total, rank)
        out.append(MergedModule(name, down, up, error, count))
    return out


def run_lora_merge(args: argparse.Namespace, files: Sequence[tuple[AdapterFile, float]]) -> int:
    """`merge --adapter ... --rank R --out LORA`: write the merged LoRA and a per-module error table."""
    modules = merge_loras(files, args.rank, blocks=args.blocks, wrap=lambda items: progress(
        items, desc="svd", quiet=args.quiet))
    dtype = DTYPES.get(args.dtype) or _factor_dtype(files)
    tensors = {}
    for m in modules:
        r = m.down.shape[0]
        tensors[f"{m.name}.lora_down.weight"] = m.down.to(dtype).contiguous()
        tensors[f"{m.name}.lora_up.weight"] = m.up.to(dtype).contiguous()
        tensors[f"{m.name}.alpha"] = torch.tensor(float(r))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
                "ss_network_alpha": str(args.rank),
                "lycoris_merged": json.dumps([{"file": os.path.basename(a.path), "strength": s}
                                              for a, s in files])}
    write_safetensors(tensors, args.out, metadata, overwrite=args.force)
    worst = sorted(modules, key=lambda m: -m.rel_error)
    print(f"wrote {args.out}: {plural(len(modules), 'module')} at rank {args.rank}; relative error "
          f"of the summed change (Frobenius), worst first:")
    for m in worst[:MAX_LISTED]:
        print(f"  {m.rel_error:.3e}  {m.name} ({plural(m.sources, 'file')})")
    if len(worst) > MAX_LISTED:
        mean = sum(m.rel_error for m in worst) / len(worst)
        print(f"  ... {len(worst) - MAX_LISTED} more; mean {mean:.3e}")
    return 0


def _factor_dtype(files: Sequence[tuple[AdapterFile, float]]) -> torch.dtype:
    """The float dtype most of the input factors are stored in (fp16 in most files)."""
    names = Counter(d for adapters, _ in files for d in adapters.dtypes.values()
                    if d in ("F16", "BF16", "F32"))
    return IO_DTYPES[names.most_common(1)[0][0]][0] if names else FP32


# ----- command line ------------------------------------------------------------------------------

def add_command(commands) -> None:
    parser = commands.add_parser(
        "merge", help="bake adapters into a checkpoint, or merge LoRAs into one LoRA",
        description="With --base: bake any number of adapters (any algorithm, strengths, block "
                    "weights) into a checkpoint. Without --base and with --rank: sum LoRA-like "
                    "adapters into one LoRA of that rank (SVD).")
    parser.add_argument("--base", metavar="CKPT", help="checkpoint (.safetensors) to bake into")
    parser.add_argument("--adapter", action="append", required=True, metavar="FILE[:STRENGTH]",
                        help="an adapter file and its strength (default 1); repeat for several, "
                             "merged in the order given")
    add_output(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store float tensors in this dtype "
                        "(default: each tensor keeps the checkpoint's dtype)")
    parser.add_argument("--blocks", metavar="SPEC", help="block strengths, as the Block Weights node "
                        "takes them (IN04=0.5, OUT=0, a preset, an LBW vector)")
    parser.add_argument("--rank", type=int, help="without --base: rank of the merged LoRA")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run)


def _load_adapters(args) -> list[tuple[AdapterFile, float]]:
    files = []
    for text in args.adapter:
        path, strength = parse_adapter(text)
        files.append((load_file(path), strength))
    return files


def _run(args: argparse.Namespace) -> int:
    if args.blocks is not None:
        try:
            parse_spec(args.blocks)
        except ValueError as exc:
            raise CommandError(f"--blocks: {exc}") from None
    inputs = [parse_adapter(a)[0] for a in args.adapter] + ([args.base] if args.base else [])
    check_output(args.out, args.force, inputs)
    if args.base is None:
        if args.rank is None:
            raise CommandError("give --base CKPT to bake into a checkpoint, or --rank R to merge "
                               "LoRAs into one LoRA")
        return run_lora_merge(args, _load_adapters(args))
    if args.rank is not None:
        raise CommandError("--rank is for merging LoRAs into one LoRA; with --base the adapters are "
                           "baked into the checkpoint")
    files = _load_adapters(args)
    result = bake_checkpoint(
        args.base, files, args.out, dtype=DTYPES.get(args.dtype), blocks=args.blocks,
        overwrite=args.force,
        wrap=lambda keys: progress(keys, desc="bake", unit="tensor", quiet=args.quiet))
    _report(result, sys.stdout, sys.stderr)
    return 0


def _report(result: BakeResult, out, err) -> None:
    for path, names in result.plan.unmatched.items():
        shown = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names) - MAX_LISTED} more)"
                                                if len(names) > MAX_LISTED else "")
        print(f"warning: {path}: {plural(len(names), 'module')} match no weight of the checkpoint "
              f"and were left out: {shown}", file=err)
    zero = f", {result.plan.zero} at strength 0" if result.plan.zero else ""
    print(f"wrote {result.path}: {plural(result.plan.modules, 'module')} merged into "
          f"{plural(len(result.plan.weights), 'weight')}{zero}; {result.keys} tensors", file=out)
