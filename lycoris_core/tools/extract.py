"""`extract --base A --tuned B --out F`: a LoRA/LoCon file from the difference of two checkpoints.

The checkpoints are read memory-mapped, one weight pair at a time; each changed Linear/Conv
weight becomes `tuned - base ≈ up @ down` by truncated SVD in fp32 on the chosen device. Module
names are kohya's (`lora_unet_<path>`, `lora_te_<path>`), which our loader and ComfyUI core both
map from the checkpoint's own key paths. OpenCLIP text encoders (SD2's, SDXL's second) are named
as kohya and ComfyUI name them, in the Hugging Face CLIP layout: their fused `attn.in_proj_weight`
becomes three modules, q, k and v, one per third of its rows.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..algos.lora import LoRA
from ..errors import LycorisError, LycorisShapeError, plural
from ..io import DictSource, TensorSource
from ..save import save_file, standard_metadata
from .cli import CommandError, add_output, check_output, progress
from .lowrank import RankRule, Solver, low_rank

# checkpoint key prefix -> kohya module prefix (first match wins; a key with none is a bare
# diffusion-model key, as DiT checkpoints store them)
PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "lora_unet_"),
    ("diffusion_model.", "lora_unet_"),
    ("cond_stage_model.transformer.", "lora_te_"),  # SD1.x CLIP-L
    ("conditioner.embedders.0.transformer.", "lora_te1_"),  # SDXL CLIP-L
    ("text_encoders.clip_l.transformer.", "lora_te1_"),
    ("text_encoders.clip_g.transformer.", "lora_te2_"),
)
# parts of a checkpoint an adapter does not patch
NOT_EXTRACTED: tuple[tuple[str, str], ...] = (
    ("first_stage_model.", "VAE"),
    ("vae.", "VAE"),
    ("model_ema.", "EMA copy"),
)
# 2-d weights of lookup tables (CLIP, T5, BERT, GPT-style text encoders): not Linear layers, no
# loader patches them as LoRA
_EMBEDDING = re.compile(r"(^|\.)(token_embedding|position_embedding|word_embeddings|"
                        r"position_embeddings|token_type_embeddings|embed_tokens|wte|wpe|shared)"
                        r"\.weight$")

# OpenCLIP text-encoder prefix -> kohya prefix: SD2 (ldm and sgm layouts) and the SDXL refiner
# hold one, named `lora_te_`; SDXL base holds it second, beside CLIP-L, as `lora_te2_`
OPENCLIP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("cond_stage_model.model.", "lora_te_"),
    ("conditioner.embedders.0.model.", "lora_te_"),
    ("conditioner.embedders.1.model.", "lora_te2_"),
)
# OpenCLIP layer weight -> Hugging Face CLIP module(s) of `text_model.encoder.layers.N.`; a fused
# weight lists one module per equal block of rows, in row order
OPENCLIP_LAYERS: dict[str, tuple[str, ...]] = {
    "attn.in_proj_weight": ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"),
    "attn.out_proj.weight": ("self_attn_out_proj",),
    "mlp.c_fc.weight": ("mlp_fc1",),
    "mlp.c_proj.weight": ("mlp_fc2",),
}
_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Piece:
    """One module extracted from a checkpoint weight: its kohya name, and which of `of` equal
    blocks of the weight's rows it takes (`of` 1: the whole weight)."""

    name: str
    block: int = 0
    of: int = 1


def _openclip_pieces(path: str, kohya: str) -> tuple[tuple[Piece, ...], str | None]:
    m = _OPENCLIP_LAYER.match(path)
    modules = OPENCLIP_LAYERS.get(m[2]) if m else None
    if modules is None:
        return (), "OpenCLIP bias, norm, embedding or projection (no LoRA module)"
    base = f"{kohya}text_model_encoder_layers_{m[1]}_"
    return tuple(Piece(base + module, i, len(modules)) for i, module in enumerate(modules)), None


def module_pieces(key: str) -> tuple[tuple[Piece, ...], str | None]:
    """(the modules a checkpoint key is extracted as, None), or ((), why it is not extracted)."""
    for prefix, kohya in OPENCLIP_PREFIXES:
        if key.startswith(prefix):
            return _openclip_pieces(key[len(prefix):], kohya)
    name, why = _plain_name(key)
    return ((Piece(name),) if name else ()), why


def module_name(key: str) -> tuple[str | None, str | None]:
    """(kohya module name, None) for a checkpoint weight one module takes whole, or (None, why not)."""
    pieces, why = module_pieces(key)
    if len(pieces) > 1:
        return None, f"fused weight: {len(pieces)} modules ({', '.join(p.name for p in pieces)})"
    return (pieces[0].name, None) if pieces else (None, why)


def _plain_name(key: str) -> tuple[str | None, str | None]:
    for prefix, why in NOT_EXTRACTED:
        if key.startswith(prefix):
            return None, why
    if not key.endswith(".weight"):
        return None, "not a weight (bias, buffer, or other parameter)"
    if _EMBEDDING.search(key):
        return None, "embedding table (not a Linear layer)"
    path = key[:-len(".weight")]
    prefix = "lora_unet_"
    for start, kohya in PREFIXES:
        if path.startswith(start):
            path, prefix = path[len(start):], kohya
            break
    return prefix + path.replace(".", "_"), None


@dataclass
class ModuleRow:
    """One extracted (or resized) module for the report."""

    name: str
    shape: tuple[int, ...]
    rank: int
    kept: float  # fraction of ||ΔW||_F the adapter keeps
    rel_error: float  # ||ΔW - ΔW_r||_F / ||ΔW||_F
    note: str = ""


@dataclass
class ToolResult:
    """New modules and their report rows (extract and resize)."""

    adapters: dict[str, LoRA]
    rows: list[ModuleRow]
    skipped: Counter = field(default_factory=Counter)  # reason -> tensors
    seconds: float = 0.0


def _open(source: str | Mapping[str, torch.Tensor]):
    return TensorSource(source) if isinstance(source, (str, os.PathLike)) else DictSource(source)


def _is_conv_kernel(shape: tuple[int, ...]) -> bool:
    return len(shape) > 2 and math.prod(shape[2:]) > 1


def _lora(name: str, factors, shape: tuple[int, ...], alpha: float | None, file: str) -> LoRA:
    """A LoRA/LoCon module holding `factors` for a weight of `shape` with alpha (scale folded)."""
    r = factors.rank
    up, down = factors.up, factors.down
    if alpha is not None:  # the file's scale alpha/r multiplies up @ down on load
        up = up * (r / alpha)
    if len(shape) > 2:
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    return LoRA.load({"lora_up.weight": up.cpu(), "lora_down.weight": down.cpu(),
                      "alpha": torch.tensor(float(alpha if alpha is not None else r))},
                     name=name, file=file)


def extract(base: str | Mapping[str, torch.Tensor], tuned: str | Mapping[str, torch.Tensor], *,
            rule: RankRule, conv_rule: RankRule | None = None, algo: str = "lora",
            solver: Solver = Solver(), device: str | torch.device = "cpu",
            alpha: float | None = None, out_name: str = "<output>",
            iterate: Callable[[Iterable, int], Iterable] = lambda items, total: items) -> ToolResult:
    """LoRA modules approximating `tuned - base` for every changed Linear/Conv weight.

    `algo` "lora" takes Linear and 1x1 conv weights, "locon" also larger conv kernels (ranked by
    `conv_rule`, default `rule`). `iterate(items, total)` wraps the loop (a progress bar).
    Weights only in one checkpoint, unchanged, 1-d, not float, or not layer weights are skipped
    and counted by reason; a weight whose shapes differ raises LycorisShapeError naming both files.
    """
    if algo not in ("lora", "locon"):
        raise ValueError(f"algo must be 'lora' or 'locon', found {algo!r}")
    started = time.perf_counter()
    a, b = _open(base), _open(tuned)
    conv_rule = conv_rule or rule
    result = ToolResult({}, [])
    skip = result.skipped
    base_keys = set(a.keys())
    keys = list(b.keys())
    for key in iterate(keys, len(keys)):
        pieces, why = module_pieces(key)
        if not pieces:
            skip[why] += 1
            continue
        if key not in base_keys:
            skip[f"only in {os.path.basename(b.path)}"] += 1
            continue
        shape = tuple(b.shape(key))
        if tuple(a.shape(key)) != shape:
            raise LycorisShapeError(f"shape {list(shape)} here but {list(a.shape(key))} in "
                                    f"{a.path}: checkpoints of different models?", file=b.path,
                                    key=key)
        if len(shape) < 2 or math.prod(shape) == 0:
            skip["1-d (norm scale or bias-like)"] += 1
            continue
        if _is_conv_kernel(shape) and algo == "lora":
            skip["conv kernel larger than 1x1 (use --algo locon)"] += 1
            continue
        tb, ta = b[key], a[key]
        if not (ta.is_floating_point() and tb.is_floating_point()):
            skip["not a float tensor"] += 1
            continue
        if ta.dtype == tb.dtype and torch.equal(ta, tb):
            skip["unchanged"] += 1
            continue
        diff = tb.to(device=device, dtype=torch.float32) - ta.to(device=device, dtype=torch.float32)
        del ta, tb
        if not bool(torch.isfinite(diff).all()):
            raise LycorisError(f"difference from {a.path} has NaN or Inf values", file=b.path,
                               key=key)
        if not bool(diff.any()):  # equal values stored in different dtypes
            skip["unchanged"] += 1
            continue
        if shape[0] % pieces[0].of:
            raise LycorisShapeError(f"{shape[0]} rows do not split into {pieces[0].of} equal "
                                    f"modules ({', '.join(p.name for p in pieces)})", file=b.path,
                                    key=key)
        rows = shape[0] // pieces[0].of
        for piece in pieces:
            part = diff[piece.block * rows:(piece.block + 1) * rows]
            if not bool(part.any()):
                skip["unchanged block of a fused weight (one of q, k, v)"] += 1
                continue
            part_shape = (rows, *shape[1:])
            factors = low_rank(part.reshape(rows, -1),
                               conv_rule if _is_conv_kernel(shape) else rule, solver)
            result.adapters[piece.name] = _lora(piece.name, factors, part_shape, alpha, out_name)
            result.rows.append(ModuleRow(piece.name, part_shape, factors.rank, factors.kept,
                                         factors.rel_error))
    result.seconds = time.perf_counter() - started
    return result


def extracted_metadata(adapters: dict[str, LoRA], *, algo: str, rule: RankRule, conv_rule: RankRule,
                       solver: Solver, base_name: str, tuned_name: str) -> dict[str, str]:
    """kohya `ss_*` metadata of an extracted file, with the rule and solver in the network args."""
    network_args = {"extract_rule": rule.describe(), "extract_solver": solver.name}
    if algo == "locon" and conv_rule != rule:
        network_args["extract_conv_rule"] = conv_rule.describe()
    comment = f"extracted from {tuned_name} - {base_name} ({rule.describe()}, {solver.name})"
    return standard_metadata(adapters, algo=algo, network_args=network_args,
                             extra={"ss_training_comment": comment})


def report_lines(rows: list[ModuleRow], skipped: Counter, *, what: str,
                 skip_unit: str = "tensor") -> tuple[list[str], list[str]]:
    """(the per-module table, the summary lines with the counts of what was skipped, by reason)."""
    skips = [f"{plural(n, skip_unit)} skipped: {why}" for why, n in sorted(skipped.items())]
    if not rows:
        return [], [f"no module {what}"] + skips
    width = max(len(r.name) for r in rows)
    table = [f"{'module':<{width}}  {'shape':<20} {'rank':>5} {'kept':>8} {'rel.err':>9}  note"]
    for r in rows:
        table.append(f"{r.name:<{width}}  {'x'.join(map(str, r.shape)):<20} {r.rank:>5} "
                     f"{r.kept:>8.2%} {r.rel_error:>9.2e}  {r.note}".rstrip())
    errors = [r.rel_error for r in rows]
    summary = (f"{len(rows)} modules {what}; ranks {min(r.rank for r in rows)}-"
               f"{max(r.rank for r in rows)}; rel.err mean {sum(errors) / len(errors):.3e}, "
               f"max {max(errors):.3e}")
    return table, [summary] + skips


def add_rank_options(parser: argparse.ArgumentParser, *, default_rank: int | None) -> None:
    """--rank | --sv-ratio | --sv-fro | --sv-cumulative | --sv-threshold, --max-rank, --conv-rank."""
    group = parser.add_mutually_exclusive_group(required=default_rank is None)
    group.add_argument("--rank", type=int, metavar="R", help="fixed rank"
                       + (f" (default {default_rank})" if default_rank else ""))
    group.add_argument("--sv-ratio", type=float, metavar="X",
                       help="keep singular values above s_max / X (X >= 1; lycoris-lora ratio 1/X)")
    group.add_argument("--sv-fro", type=float, metavar="X",
                       help="smallest rank keeping at least X (0..1) of each module's Frobenius norm")
    group.add_argument("--sv-cumulative", type=float, metavar="X",
                       help="smallest rank whose singular values sum to at least X (0..1) of the total")
    group.add_argument("--sv-threshold", type=float, metavar="X",
                       help="keep singular values above X (lycoris-lora threshold)")
    parser.add_argument("--max-rank", type=int, metavar="R", help="rank cap for the --sv-* rules")
    parser.add_argument("--conv-rank", type=int, metavar="R",
                        help="rank of conv layers with a kernel larger than 1x1 (fixed rule: their "
                             "rank; --sv-* rules: their cap); default: as for Linear layers")


def rank_rules(args: argparse.Namespace, default_rank: int | None = None) -> tuple[RankRule, RankRule]:
    """(Linear rule, conv-kernel rule) from the options of `add_rank_options`."""
    try:
        for method in ("sv_ratio", "sv_fro", "sv_cumulative", "sv_threshold"):
            value = getattr(args, method)
            if value is not None:
                rule = RankRule(method, value, args.max_rank)
                conv_cap = args.conv_rank or args.max_rank
                return rule, RankRule(method, value, conv_cap)
        rank = args.rank if args.rank is not None else default_rank
        rule = RankRule("fixed", rank)
        return rule, RankRule("fixed", args.conv_rank) if args.conv_rank else rule
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def add_common_options(parser: argparse.ArgumentParser, dtype_default: str) -> None:
    """--device, --dtype, --quiet."""
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help=f"dtype of the saved factors (default: {dtype_default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no per-module table")


def add_solver_options(parser: argparse.ArgumentParser) -> None:
    """--randomized, --oversample, --power-iters."""
    parser.add_argument("--randomized", action="store_true",
                        help="randomized low-rank SVD (range finder with power iterations): much "
                             "faster on large layers; the report gives the exact error reached")
    parser.add_argument("--oversample", type=int, default=8, metavar="N",
                        help="extra sketch directions for --randomized (default 8)")
    parser.add_argument("--power-iters", type=int, default=2, metavar="N",
                        help="power iterations for --randomized (default 2)")


def solver_from(args: argparse.Namespace) -> Solver:
    if args.oversample < 1 or args.power_iters < 0:
        raise CommandError("--oversample must be at least 1 and --power-iters at least 0")
    return Solver(args.randomized, args.oversample, args.power_iters)


def device_from(args: argparse.Namespace) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise CommandError(f"--device {name}: not usable here ({exc})") from None
    return device


def print_report(report: tuple[list[str], list[str]], quiet: bool) -> None:
    """The table (unless `quiet`) and the summary on stdout."""
    table, summary = report
    for line in summary if quiet else table + summary:
        print(line)


def add_command(commands) -> None:
    parser = commands.add_parser(
        "extract", help="an adapter from the difference of two checkpoints (truncated SVD)",
        description="Extract a LoRA/LoCon from tuned - base, module by module (Linear and Conv "
                    "weights, read memory-mapped one at a time), with a per-module report of the "
                    "Frobenius norm kept and the relative error.")
    parser.add_argument("--base", required=True, metavar="FILE", help="base checkpoint (.safetensors)")
    parser.add_argument("--tuned", required=True, metavar="FILE", help="tuned checkpoint (.safetensors)")
    add_output(parser)
    parser.add_argument("--algo", choices=("lora", "locon"), default="lora",
                        help="lora: Linear and 1x1 conv layers; locon: also larger conv kernels")
    add_rank_options(parser, default_rank=None)
    parser.add_argument("--alpha", type=float, default=None,
                        help="alpha stored per module (default: the module's rank, scale 1)")
    add_solver_options(parser)
    add_common_options(parser, "fp16")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, inputs=(args.base, args.tuned))
    rule, conv_rule = rank_rules(args)
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        raise CommandError(f"--alpha must be a positive number, found {args.alpha:g}")
    solver, device = solver_from(args), device_from(args)
    result = extract(args.base, args.tuned, rule=rule, conv_rule=conv_rule, algo=args.algo,
                     solver=solver, device=device, alpha=args.alpha, out_name=args.out,
                     iterate=lambda items, total: progress(items, total=total, desc="extract",
                                                           unit="tensor", quiet=args.quiet))
    print_report(report_lines(result.rows, result.skipped, what="extracted"), args.quiet)
    if not result.adapters:
        raise CommandError(f"{args.tuned}: no weight differs from {args.base}; nothing to write")
    meta = extracted_metadata(result.adapters, algo=args.algo, rule=rule, conv_rule=conv_rule,
                              solver=solver, base_name=os.path.basename(args.base),
                              tuned_name=os.path.basename(args.tuned))
    save_file(result.adapters, args.out, meta, dtype=DTYPES[args.dtype or "fp16"],
              overwrite=args.force)
    print(f"wrote {args.out} ({len(result.adapters)} modules, {result.seconds:.1f} s, "
          f"{solver.name} SVD on {device})", file=sys.stderr if args.quiet else sys.stdout)
    return 0
