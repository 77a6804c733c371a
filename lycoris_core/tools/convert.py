"""`convert IN --to kohya|comfy|diffusers|peft --out F`: an adapter's key names in another tool's style.

Tensors are copied as stored; only names change (and, for LoRA/DoRA between the kohya and the PEFT
families, the suffixes, the DoRA magnitude's shape and where alpha lives):

- kohya: `lora_unet_<path>` / `lora_te_`, `lora_te1_`, `lora_te2_` (flattened), `lora_down`/
  `lora_up`/`alpha`; the UNet keeps the layout it had (diffusers or LDM paths), diffusers DiT paths
  take `lora_transformer_` as OneTrainer and SimpleTuner write them;
- comfy: ComfyUI's own names, `diffusion_model.<native path>` and
  `text_encoders.clip_l.transformer.<path>`; diffusers DiT names are read with one family's rules
  (`native_names.FAMILIES`, `--family` where names alone do not tell), LoRAs on the q/k/v(/mlp)
  pieces of one fused native weight become one LoRA on it, and changes the native layout stores
  with swapped halves (final norms) get their up rows swapped;
- diffusers: what `save_lora_weights` writes: `unet.<diffusers path>` / `transformer.<path>` /
  `text_encoder(_2).<path>`, `lora_A`/`lora_B`/`lora_magnitude_vector`, alphas in the
  `lora_adapter_metadata` config (per part, with rank and alpha patterns);
- peft: one model part as `get_peft_model_state_dict` gives it (no part prefix), its config in
  `lora_adapter_metadata` unprefixed.

Other algorithms keep their LyCORIS tensor names under the new module names (kohya/comfy only).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..adapter_file import load_file
from ..blocks import detect_arch
from ..blocks.names import is_text_encoder, unet_path
from ..checkpoint_names import SD1_LAYOUT, SDXL_LAYOUT, UNET, ModuleRef, SDLayout, parse_name
from ..errors import LycorisError, plural
from ..keys import is_peft_magnitude
from ..io import TensorSource, write_safetensors
from ..native_names import FAMILIES, Rename, native_candidates, piece_offset
from .cli import add_output, check_output, progress

STYLES = ("kohya", "comfy", "diffusers", "peft")
PEFT_STYLES = ("diffusers", "peft")
MAX_LISTED = 10

# words of module paths that contain "_" (so a flattened kohya name can be given its dots back);
# the spelling here is the one written (a few native names are not lower case)
_WORDS = """
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection proj_in
proj_out transformer_blocks to_q to_k to_v to_out time_embed label_emb down_blocks up_blocks mid_block
conv_in conv_out conv_norm_out conv_shortcut time_emb_proj time_embedding linear_1 linear_2
add_embedding class_embedding text_model self_attn q_proj k_proj v_proj out_proj layer_norm1
layer_norm2 final_layer_norm token_embedding position_embedding text_projection
double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod img_in txt_in time_in
vector_in guidance_in in_layer out_layer final_layer adaLN_modulation query_norm key_norm
single_transformer_blocks add_q_proj add_k_proj add_v_proj to_add_out norm1_context ff_context
proj_mlp norm_out time_text_embed timestep_embedder guidance_embedder text_embedder context_embedder
x_embedder norm_q norm_k norm_added_q norm_added_k joint_blocks x_block context_block t_embedder
y_embedder pos_embed self_attn cross_attn norm_k_img k_img v_img text_embedding time_embedding
time_projection img_emb condition_embedder time_proj
double_stream_modulation_img double_stream_modulation_txt single_stream_modulation
to_qkv_mlp_proj linear_in linear_out feed_forward attention_norm1 attention_norm2
ffn_norm1 ffn_norm2 noise_refiner context_refiner cap_embedder
distilled_guidance_layer in_proj
"""
WORDS = {w.lower(): w for w in _WORDS.split() if "_" in w}
_MAX_WORD = max(w.count("_") for w in WORDS) + 1
# diffusers-layout DiT paths (their trainers name them `transformer.` / `lora_transformer_`)
_DIFFUSERS_DIT_NAME = re.compile(r"^(?:transformer\.|lora_transformer_)")


def dotted(path: str) -> str:
    """A flattened path with its dots back: the longest known word at each place, else one token
    (`input_blocks_1_1_transformer_blocks_0_attn1_to_out_0` -> `input_blocks.1.1.…attn1.to_out.0`)."""
    tokens = path.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for n in range(min(_MAX_WORD, len(tokens) - i), 1, -1):
            word = WORDS.get("_".join(tokens[i:i + n]).lower())
            if word is not None:
                parts.append(word)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


class ConvertError(LycorisError):
    """A module that has no name or layout in the asked style."""


@dataclass(frozen=True)
class Module:
    """One module of the input: its name, where it points, its algorithm and tensors by suffix."""

    name: str
    ref: ModuleRef
    diffusers_dit: bool  # a DiT path in diffusers layout (not the model's native one)
    adapter: object
    keys: Mapping[str, str]  # canonical suffix -> file key


def _layout(names) -> SDLayout:
    return SDXL_LAYOUT if detect_arch(names).name == "sdxl" else SD1_LAYOUT


def _unet_name(module: Module, style: str, layout: SDLayout) -> tuple[str, str]:
    """(part prefix, path in the style) of a diffusion-model module."""
    ldm = module.ref.path
    diffusers = layout.to_diffusers(ldm)
    if style == "kohya":
        return ("lora_transformer_" if module.diffusers_dit else "lora_unet_"), _flat_tail(module.name)
    if style == "comfy":
        return "diffusion_model.", dotted(ldm)  # diffusers DiT modules go through `comfy_dit_plan`
    if diffusers is not None:
        return "unet.", dotted(diffusers)
    if module.diffusers_dit:
        return "transformer.", dotted(ldm)
    raise ConvertError("native DiT names have no diffusers spelling here: convert to kohya or "
                       "comfy instead", file=module.adapter.file, key=module.name)


_TE_PREFIX = {"kohya": {"te1": "lora_te1_", "te2": "lora_te2_"},
              "comfy": {"te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer."},
              "diffusers": {"te1": "text_encoder.", "te2": "text_encoder_2."},
              "peft": {"te1": "text_encoder.", "te2": "text_encoder_2."}}


def module_name(module: Module, style: str, layout: SDLayout, one_text_encoder: bool) -> tuple[str, str]:
    """(part, new module name); the part is `unet`/`transformer`/`te1`/`te2` (PEFT config groups)."""
    if module.ref.part == UNET:
        prefix, path = _unet_name(module, style, layout)
        return (prefix.rstrip(".") if style in PEFT_STYLES else UNET), prefix + path
    part = module.ref.part
    if style == "kohya":
        prefix = "lora_te_" if one_text_encoder and part == "te1" else _TE_PREFIX[style][part]
        return part, prefix + module.ref.path
    return _TE_PREFIX[style][part].rstrip("."), _TE_PREFIX[style][part] + dotted(module.ref.path)


# ----- tensors per style ------------------------------------------------------------------------

KOHYA_LORA = {"lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight",
              "lora_mid.weight": "lora_mid.weight", "alpha": "alpha", "dora_scale": "dora_scale"}
PEFT_LORA = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
             "dora_scale": "lora_magnitude_vector"}


def _magnitude_is_peft(module: Module) -> bool:
    """Whether the DoRA magnitude is stored as PEFT stores it: always the output axis, (out,) for
    Linear and (1, out, 1, 1) for Conv (the shape alone reads as the input axis when in == out)."""
    return is_peft_magnitude(module.keys.get("dora_scale"))


def _module_tensors(module: Module, src, style: str) -> dict[str, torch.Tensor]:
    """suffix -> tensor of one module in the asked style."""
    adapter = module.adapter
    tensors = {suffix: src[key] for suffix, key in module.keys.items()}
    ndim = tensors["lora_down.weight"].ndim if "lora_down.weight" in tensors else 2
    peft_magnitude = _magnitude_is_peft(module)
    if style not in PEFT_STYLES:
        out = dict(tensors)
        if adapter.algo == "lora" and "alpha" not in out and adapter.alpha is not None:
            out["alpha"] = torch.tensor(float(adapter.alpha))  # a PEFT file's alpha, from its config
        if peft_magnitude:  # the LyCORIS layout of an output-axis magnitude: (out, 1, ...)
            out["dora_scale"] = out["dora_scale"].reshape((-1,) + (1,) * (ndim - 1))
        return out
    if adapter.algo != "lora":
        raise ConvertError(f"{adapter.algo} has no PEFT/diffusers layout: convert to kohya or comfy "
                           "instead", file=adapter.file, key=module.name)
    extra = sorted(set(tensors) - set(PEFT_LORA) - {"alpha"})
    if extra:
        raise ConvertError(f"keys {', '.join(extra)} have no PEFT layout (Tucker LoRA): convert to "
                           "kohya or comfy instead", file=adapter.file, key=module.name)
    if adapter.dora_scale is not None and adapter.dora_axis != "out" and not peft_magnitude:
        raise ConvertError("DoRA along the input axis has no PEFT layout (PEFT normalises output "
                           "rows): convert to kohya or comfy instead", file=adapter.file, key=module.name)
    out = {PEFT_LORA[s]: t for s, t in tensors.items() if s != "alpha"}
    if "lora_magnitude_vector" in out:
        flat = out["lora_magnitude_vector"].reshape(-1)
        out["lora_magnitude_vector"] = flat if ndim == 2 else flat.reshape((1, -1) + (1,) * (ndim - 2))
    return out


def _peft_config(modules: list[tuple[str, str, object]], dora: bool) -> dict:
    """The LoraConfig fields of one part: most common rank/alpha, patterns for the others."""
    ranks = {path: a.rank for path, _, a in modules}
    alphas = {path: (a.alpha if a.alpha not in (None, 0) else a.rank) for path, _, a in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "use_dora": dora,
            "rank_pattern": {p: v for p, v in ranks.items() if v != r},
            "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha}}


def convert_file(path: str, style: str, out: str, *, overwrite: bool = False, quiet: bool = True,
                 err=None, family: str | None = None) -> dict:
    """Write `path` renamed to `style` at `out`; returns {"modules": n, "left_out": [...]}.
    `family` (a key of `native_names.FAMILIES`) names the model of diffusers DiT names for comfy
    style; by default it is the one family whose rules read every such module. Warnings go to
    `err` (default: the sys.stderr of the moment)."""
    err = err or sys.stderr
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    src = TensorSource(path)
    adapters = load_file(src.path)
    layout = _layout(adapters)
    modules = [Module(n, parse_name(n, layout), bool(_DIFFUSERS_DIT_NAME.match(n)) or _diffusers_dit(n),
                      a, adapters.module_keys[n]) for n, a in adapters.items()]
    parts = {m.ref.part for m in modules}
    one_te = "te2" not in parts
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    peft_parts: dict[str, list] = {}
    errors: list[str] = []
    if style == "comfy":
        planned, errors = comfy_dit_plan([m for m in modules if m.diffusers_dit], src, family, path)
        for new, (sources, module_sd) in planned.items():
            names[new] = sources[0].name
            tensors.update({f"{new}.{suffix}": t for suffix, t in module_sd.items()})
        modules = [m for m in modules if not m.diffusers_dit]
    for module in progress(modules, desc="convert", quiet=quiet):
        try:
            part, new = module_name(module, style, layout, one_te)
            module_sd = _module_tensors(module, src, style)
        except ConvertError as exc:
            errors.append(str(exc))
            continue
        if new in names:
            errors.append(f"{path}: {module.name} and {names[new]} both become {new}")
            continue
        names[new] = module.name
        local = new[len(part) + 1:] if style in PEFT_STYLES else new
        if style == "peft":
            new = local
        peft_parts.setdefault(part, []).append((local, module.name, module.adapter))
        tensors.update({f"{new}.{suffix}": t for suffix, t in module_sd.items()})
    if errors:
        shown = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise LycorisError(f"{plural(len(errors), 'module')} cannot be written as {style}, nothing "
                           f"was written:\n  {shown}{more}", file=path)
    metadata = {k: v for k, v in adapters.metadata.items() if k != "lora_adapter_metadata"}
    if style in PEFT_STYLES:
        if style == "peft" and len(peft_parts) > 1:
            raise LycorisError(f"holds {len(peft_parts)} model parts ({', '.join(sorted(peft_parts))}); "
                               "a peft state dict holds one: use --to diffusers", file=path)
        config = {}
        for part, items in peft_parts.items():
            dora = any(a.dora_scale is not None for _, _, a in items)
            fields = _peft_config(items, dora)
            config.update(fields if style == "peft" else {f"{part}.{k}": v for k, v in fields.items()})
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    left_out = [p.key or "" for p in adapters.problems if p.level == "error"]
    unknown = sorted(set(src) - {k for m in modules for k in m.keys.values()})
    for key in unknown:
        print(f"warning: {path}: {key}: not part of any module, left out", file=err)
    write_safetensors(tensors, out, metadata, overwrite=overwrite)
    return {"modules": len(names), "left_out": left_out + unknown}


# ----- diffusers DiT names -> ComfyUI's native ones ----------------------------------------------

def _candidates(module: Module, family: str) -> list[Rename]:
    if not FAMILIES[family]:  # the family's native names are diffusers' own (Qwen-Image)
        return [Rename(module.ref.path)]
    return native_candidates(module.ref.path, family)


def dit_family(modules: list[Module], path: str) -> str:
    """The one family whose rules read every diffusers DiT module of a file (families that read
    them all alike count as one)."""
    readings = {}
    for family in FAMILIES:
        if FAMILIES[family] and all(native_candidates(m.ref.path, family) for m in modules):
            readings[family] = [tuple(native_candidates(m.ref.path, family)) for m in modules]
    distinct = {tuple(r) for r in readings.values()}
    if len(distinct) == 1:
        return next(iter(readings))
    if not readings:
        best = max((f for f in FAMILIES if FAMILIES[f]),
                   key=lambda f: sum(bool(native_candidates(m.ref.path, f)) for m in modules))
        unread = [m.name for m in modules if not native_candidates(m.ref.path, best)]
        raise LycorisError(f"no model family's diffusers names cover this file ({len(unread)} modules "
                           f"unknown to {best}, e.g. {unread[0]}): name it with --family (qwen_image "
                           "keeps diffusers' names), or convert to kohya or diffusers", file=path)
    raise LycorisError(f"these diffusers DiT names read as several families ({', '.join(readings)}): "
                       "name one with --family", file=path)


def _lora_factors(module: Module, src) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up * alpha/rank) of a plain 2-D LoRA, else ConvertError."""
    adapter = module.adapter
    extra = sorted(set(module.keys) - {"lora_down.weight", "lora_up.weight", "alpha"})
    if adapter.algo != "lora" or extra or src[module.keys["lora_down.weight"]].ndim != 2:
        what = adapter.algo if adapter.algo != "lora" else "this LoRA (" + (", ".join(extra) or "conv") + ")"
        raise ConvertError(f"{what} on a piece of a fused or reordered native weight has no ComfyUI "
                           "name: convert to kohya or diffusers instead", file=adapter.file, key=module.name)
    down, up = src[module.keys["lora_down.weight"]], src[module.keys["lora_up.weight"]]
    return down, (up.float() * adapter.scale).to(up.dtype)


def _shape(module: Module) -> tuple[int, int] | None:
    """(out, in) of the weight a module changes, as its factors tell."""
    shape = getattr(module.adapter, "target_shape", None)
    return tuple(shape[:2]) if shape else None


def _fused(native: str, layout: str, pieces: dict[int, Module], src, path: str) -> dict[str, torch.Tensor]:
    """One LoRA on the fused weight from LoRAs on its pieces: the downs stacked, the ups placed
    block-diagonally on their rows (each with its own alpha/rank folded in), alpha = total rank,
    so the fused change is exactly the pieces' changes side by side."""
    factors = {i: _lora_factors(m, src) for i, m in pieces.items()}
    cols = next(iter(factors.values()))[0].shape[1]
    sizes = {i: up.shape[0] for i, (_, up) in factors.items()}
    count = 3 if layout == "qkv" else 4
    sizes.setdefault(0, cols)
    for i in (1, 2):  # k and v are as wide as each other (and as q under qkv_mlp)
        sizes.setdefault(i, sizes.get(3 - i, cols if layout == "qkv_mlp" else None))
    if any(sizes.get(i) is None for i in range(count)):
        names = ", ".join(m.name for m in pieces.values())
        raise ConvertError(f"{names} cover part of {native} and the width of the rest is unknown "
                           "without the model: convert to kohya or diffusers instead", file=path,
                           key=next(iter(pieces.values())).name)
    starts = [sum(sizes[j] for j in range(i)) for i in range(count + 1)]
    order = sorted(factors)
    down = torch.cat([factors[i][0] for i in order])
    up = torch.zeros(starts[-1], down.shape[0], dtype=factors[order[0]][1].dtype)
    col = 0
    for i in order:
        piece_up = factors[i][1]
        up[starts[i]:starts[i] + piece_up.shape[0], col:col + piece_up.shape[1]] = piece_up
        col += piece_up.shape[1]
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up, "alpha": torch.tensor(float(down.shape[0]))}


def _swapped(module: Module, src) -> dict[str, torch.Tensor]:
    """A LoRA whose change is stored with its output halves exchanged: its up rows swapped."""
    down, up = _lora_factors(module, src)
    first, second = up.chunk(2, dim=0)
    return {"lora_down.weight": down, "lora_up.weight": torch.cat((second, first)),
            "alpha": torch.tensor(float(down.shape[0]))}


def comfy_dit_plan(modules: list[Module], src, family: str | None, path: str):
    """({ComfyUI name: (source modules, tensors)}, errors) for a file's diffusers DiT modules:
    plain renames keep their tensors, pieces of one fused weight become one LoRA on it, changes
    stored with swapped halves have their up rows swapped."""
    if not modules:
        return {}, []
    family = family or dit_family(modules, path)
    plan, errors = {}, []
    fused: dict[tuple[str, str], dict[int, Module]] = {}
    for module in modules:
        shape = _shape(module)
        renames = [r for r in _candidates(module, family)  # SD3's adaLN: by its rows, so known ones
                   if not (r.layout or "").startswith("adaln")
                   or (shape is not None and piece_offset(r.layout, 0, shape) is not None)]
        if not renames:
            errors.append(f"{path}: {module.name}: no {family} native name")
            continue
        rename = renames[0]
        new = "diffusion_model." + dotted(rename.path)
        if new in plan:
            errors.append(f"{path}: {module.name} and {plan[new][0][0].name} both become {new}")
            continue
        try:
            if rename.layout in ("qkv", "qkv_mlp"):
                fused.setdefault((new, rename.layout), {})[rename.index] = module
            elif rename.swap_halves:
                plan[new] = ([module], _swapped(module, src))
            else:
                plan[new] = ([module], _module_tensors(module, src, "comfy"))
        except ConvertError as exc:
            errors.append(str(exc))
    for (new, layout), pieces in fused.items():
        try:
            plan[new] = (list(pieces.values()), _fused(new, layout, pieces, src, path))
        except ConvertError as exc:
            errors.append(str(exc))
    return plan, errors


def _flat_tail(name: str) -> str:
    """The module path of a diffusion-model name, prefix removed and `_`-joined, in its own case
    (host key maps are case-sensitive: Flux's `final_layer_adaLN_modulation_1`)."""
    path = unet_path(name)
    return name[len(name) - len(path):].replace(".", "_")


def _diffusers_dit(name: str) -> bool:
    """A DiT module path in diffusers layout (`transformer_blocks.0.attn.to_q` under any prefix)."""
    path = unet_path(name)
    return not is_text_encoder(name.lower()) and SD1_LAYOUT.to_diffusers(path) is None and \
        SD1_LAYOUT.to_ldm(path) is None and bool(re.match(r"^(?:single_)?transformer_blocks_\d", path))


# ----- command line ------------------------------------------------------------------------------

def add_command(commands) -> None:
    parser = commands.add_parser(
        "convert", help="rename an adapter's keys to kohya, comfy, diffusers or peft style",
        description="Rename an adapter file's keys to another tool's style; tensors are copied "
                    "as stored. LoRA and DoRA convert between every style; other algorithms keep "
                    "their LyCORIS tensor names (kohya and comfy styles only).")
    parser.add_argument("file", help="adapter .safetensors file")
    parser.add_argument("--to", required=True, choices=STYLES, help="the style to write")
    add_output(parser)
    parser.add_argument("--family", choices=sorted(FAMILIES),
                        help="the model of a file's diffusers DiT names, for --to comfy (default: "
                             "the one family whose names cover the file)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, [args.file])
    result = convert_file(args.file, args.to, args.out, overwrite=args.force, quiet=args.quiet,
                          family=args.family)
    left = f"; {plural(len(result['left_out']), 'key')} left out" if result["left_out"] else ""
    print(f"wrote {args.out}: {plural(result['modules'], 'module')} in {args.to} style{left}")
    return 0
