"""Adapter module names in every trainer's style <-> a checkpoint's state-dict keys, host-agnostic.

A module name is read as a `ModuleRef`: the model part it belongs to (`unet` for the diffusion
model, `te1`/`te2` for the text encoders) and its path inside that part, normalised (lower case,
`_`-joined, trainer prefix removed) and in the part's native layout:

- SD1.x/2.x/SDXL UNets: diffusers paths (`down_blocks_0_attentions_0_proj_in`) are rewritten to the
  original LDM layout (`input_blocks_1_1_proj_in`) by the rules of `SDLayout`;
- DiTs: native names pass as they are; diffusers names of the families in `native_names` become
  their native spelling, possibly a piece of a fused weight;
- text encoders: kohya `lora_te_`/`lora_te1_`/`lora_te2_`, diffusers/PEFT `text_encoder(_2).`,
  ComfyUI `text_encoders.clip_l.transformer.` all read as the Hugging Face CLIP path
  (`text_model_encoder_layers_0_mlp_fc1`).

`CheckpointNames` indexes a checkpoint's keys the same way (single-file SD checkpoints, bare UNet or
DiT files, OpenCLIP text encoders whose q/k/v are rows of one `in_proj_weight`) and resolves a
module name to a `KeyTarget`: the key, the rows it patches and whether the change is stored with its
halves swapped.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .blocks.names import is_text_encoder, unet_path
from .native_names import native_candidates, piece_offset

UNET = "unet"
TEXT_ENCODERS = ("te1", "te2")


@dataclass(frozen=True)
class ModuleRef:
    """Where a module name points, whatever its style: model part and normalised native path."""

    part: str
    path: str


@dataclass(frozen=True)
class KeyTarget:
    """The checkpoint tensor a module patches: key, optional (dim, start, length), swapped halves."""

    key: str
    offset: tuple[int, int, int] | None = None
    swap_halves: bool = False

    @property
    def bias_key(self) -> str:
        """The key of the same layer's bias."""
        if self.key.endswith("in_proj_weight"):
            return self.key[: -len("weight")] + "bias"
        return self.key[: -len("weight")] + "bias" if self.key.endswith(".weight") else self.key + ".bias"


# ----- SD UNet: diffusers <-> LDM ------------------------------------------------------------------

# diffusers resnet sub-layer -> LDM sub-layer
RESNET_NAMES = {"norm1": "in_layers_0", "conv1": "in_layers_2", "time_emb_proj": "emb_layers_1",
                "norm2": "out_layers_0", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}
# top-level diffusers layers -> LDM (both directions are one-to-one)
TOP_NAMES = {"conv_in": "input_blocks_0_0", "time_embedding_linear_1": "time_embed_0",
             "time_embedding_linear_2": "time_embed_2", "add_embedding_linear_1": "label_emb_0_0",
             "add_embedding_linear_2": "label_emb_0_2", "conv_norm_out": "out_0", "conv_out": "out_2"}
# diffusers names that read as an LDM layer too (class-conditioned UNets), one way only
TOP_ALIASES = {**TOP_NAMES, "class_embedding_linear_1": "label_emb_0_0",
               "class_embedding_linear_2": "label_emb_0_2"}
_TOP_RE = re.compile(r"^(" + "|".join(sorted(TOP_ALIASES, key=len, reverse=True)) + r")(?:_(.*))?$")
_TOP_LDM_RE = re.compile(r"^(" + "|".join(sorted(TOP_NAMES.values(), key=len, reverse=True)) + r")(?:_(.*))?$")
_RESNET_RE = re.compile(r"^(" + "|".join(sorted(RESNET_NAMES, key=len, reverse=True)) + r")(?:_(.*))?$")
_LDM_RESNET_RE = re.compile(r"^(" + "|".join(sorted(RESNET_NAMES.values(), key=len, reverse=True))
                            + r")(?:_(.*))?$")
_DIFFUSERS_SD = re.compile(r"^(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_(.+)$")
_DIFFUSERS_MID = re.compile(r"^mid_block_(resnets|attentions)_(\d+)_(.+)$")
_LDM_SD = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_LDM_MID = re.compile(r"^middle_block_(\d+)_(.+)$")


def _join(*parts: str | None) -> str:
    return "_".join(p for p in parts if p)


@dataclass(frozen=True)
class SDLayout:
    """What the diffusers <-> LDM index arithmetic needs: resnets per level, and which up levels
    (diffusers numbering) hold attentions (their upsampler is then the third sub-layer)."""

    res_blocks: int = 2
    up_attention: frozenset = frozenset({1, 2, 3})

    def to_ldm(self, path: str) -> str | None:
        """The LDM path of a diffusers UNet path, None when it is not one."""
        m = _TOP_RE.match(path)
        if m:
            return _join(TOP_ALIASES[m[1]], m[2])
        n = self.res_blocks + 1
        m = _DIFFUSERS_SD.match(path)
        if m:
            side, level, kind, index, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "downsamplers":
                return f"input_blocks_{n * (level + 1)}_0_op" + rest[len("conv"):] if rest.startswith("conv") else None
            if kind == "upsamplers":
                sub = 2 if level in self.up_attention else 1
                return f"output_blocks_{n * level + self.res_blocks}_{sub}_{rest}"
            block = 1 + n * level + index if side == "down_blocks" else n * level + index
            prefix = "input_blocks" if side == "down_blocks" else "output_blocks"
            return f"{prefix}_{block}_" + (f"0_{self._resnet(rest)}" if kind == "resnets" else f"1_{rest}")
        m = _DIFFUSERS_MID.match(path)
        if m:
            kind, index, rest = m[1], int(m[2]), m[3]
            return f"middle_block_{2 * index}_{self._resnet(rest)}" if kind == "resnets" else f"middle_block_1_{rest}"
        return None

    @staticmethod
    def _resnet(rest: str) -> str:
        m = _RESNET_RE.match(rest)
        return _join(RESNET_NAMES[m[1]], m[2]) if m else rest

    def to_diffusers(self, path: str) -> str | None:
        """The diffusers path of an LDM UNet path, None when it is not one."""
        m = _TOP_LDM_RE.match(path)
        if m:
            return _join({v: k for k, v in TOP_NAMES.items()}[m[1]], m[2])
        n = self.res_blocks + 1
        m = _LDM_SD.match(path)
        if m:
            side, block, sub, rest = m[1], int(m[2]), int(m[3]), m[4]
            if side == "input_blocks":
                level, index = divmod(block - 1, n)
                if rest == "op" or rest.startswith("op_"):
                    return f"down_blocks_{block // n - 1}_downsamplers_0_conv" + rest[2:]
                where = f"down_blocks_{level}"
            else:
                level, index = divmod(block, n)
                if rest == "conv" or rest.startswith("conv_"):
                    return f"up_blocks_{level}_upsamplers_0_{rest}"
                where = f"up_blocks_{level}"
            if sub == 0:
                return f"{where}_resnets_{index}_{self._diffusers_resnet(rest)}"
            return f"{where}_attentions_{index}_{rest}"
        m = _LDM_MID.match(path)
        if m:
            sub, rest = int(m[1]), m[2]
            if sub == 1:
                return f"mid_block_attentions_0_{rest}"
            return f"mid_block_resnets_{sub // 2}_{self._diffusers_resnet(rest)}"
        return None

    @staticmethod
    def _diffusers_resnet(rest: str) -> str:
        m = _LDM_RESNET_RE.match(rest)
        return _join({v: k for k, v in RESNET_NAMES.items()}[m[1]], m[2]) if m else rest


SD1_LAYOUT = SDLayout()
SDXL_LAYOUT = SDLayout(2, frozenset({0, 1}))


# ----- module names -> ModuleRef -----------------------------------------------------------------

# (pattern on the raw name, text encoder part or None to read it from the first group)
_TE_STYLES: tuple[tuple[re.Pattern, str | None], ...] = (
    (re.compile(r"^lora_te([12])_(.+)$"), None),
    (re.compile(r"^lora_te_(.+)$"), "te1"),
    (re.compile(r"^text_encoder_([12])\.(.+)$"), None),
    (re.compile(r"^text_encoder\.(.+)$"), "te1"),
    (re.compile(r"^(?:text_encoders\.)?clip_[lh]\.transformer\.(.+)$"), "te1"),
    (re.compile(r"^(?:text_encoders\.)?clip_g\.transformer\.(.+)$"), "te2"),
)
# transformers 5 saves CLIPTextModel without its `text_model` level
_WITHOUT_TEXT_MODEL = re.compile(r"^(?:encoder|embeddings|final_layer_norm)(?:_|$)")


# old diffusers attention processors: `attn1.processor.to_q`, `attn1.processor.to_out` (no `.0`)
_OLD_PROCESSOR = re.compile(r"_processor_(to_[qkv]|to_out)(?:_0)?$")


def _te_path(rest: str) -> str:
    path = rest.lower().replace(".", "_")
    return "text_model_" + path if _WITHOUT_TEXT_MODEL.match(path) else path


def parse_name(name: str, layout: SDLayout = SD1_LAYOUT) -> ModuleRef:
    """The part and native path a module name of any style points to."""
    for pattern, part in _TE_STYLES:
        m = pattern.match(name)
        if m:
            return ModuleRef(part or f"te{m[1]}", _te_path(m[m.lastindex]))
    path = _OLD_PROCESSOR.sub(lambda m: "_to_out_0" if m[1] == "to_out" else f"_{m[1]}", unet_path(name))
    return ModuleRef(UNET, layout.to_ldm(path) or path)


# ----- checkpoint keys ---------------------------------------------------------------------------

# key prefix -> (part, OpenCLIP layout); longest first. Keys under no prefix are the UNet/DiT when
# the file has no `model.diffusion_model.` keys (a bare diffusion-model file)
CHECKPOINT_PREFIXES: tuple[tuple[str, str, bool], ...] = (
    ("model.diffusion_model.", UNET, False),
    ("cond_stage_model.transformer.", "te1", False),
    ("cond_stage_model.model.", "te1", True),
    ("conditioner.embedders.0.transformer.", "te1", False),
    ("conditioner.embedders.0.model.", "te1", True),  # SD2 in the sgm layout, SDXL refiner
    ("conditioner.embedders.1.model.", "te2", True),
    ("text_encoders.clip_l.transformer.", "te1", False),
    ("text_encoders.clip_g.transformer.", "te2", False),
)
NOT_PATCHED_PREFIXES = ("first_stage_model.", "vae.", "conditioner.", "cond_stage_model.",
                        "text_encoders.", "model_ema.")
# OpenCLIP text-encoder layers -> Hugging Face CLIP paths (q/k/v are thirds of in_proj rows)
_OPENCLIP = re.compile(r"^transformer_resblocks_(\d+)_(attn_in_proj|attn_out_proj|mlp_c_fc|mlp_c_proj|ln_1|ln_2)$")
_OPENCLIP_HF = {"attn_out_proj": "self_attn_out_proj", "mlp_c_fc": "mlp_fc1", "mlp_c_proj": "mlp_fc2",
                "ln_1": "layer_norm1", "ln_2": "layer_norm2"}
_OPENCLIP_TOP = {"ln_final": "text_model_final_layer_norm"}


def _weight_path(key: str) -> str | None:
    """The module path of a weight key (`….weight`, OpenCLIP `…in_proj_weight`), else None."""
    if key.endswith(".in_proj_weight"):
        return key[: -len("_weight")]
    if key.endswith(".weight"):
        return key[: -len(".weight")]
    return None


@dataclass
class CheckpointNames:
    """Index of a checkpoint's weight keys by (part, normalised native path)."""

    shapes: Mapping[str, tuple[int, ...]]
    index: dict[tuple[str, str], KeyTarget] = field(default_factory=dict)
    layout: SDLayout = SD1_LAYOUT

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "CheckpointNames":
        """Index every weight key of a state dict given as {key: shape}."""
        self = cls(dict(shapes))
        bare = not any(k.startswith(("model.diffusion_model.", "diffusion_model.")) for k in shapes)
        for key in shapes:
            module = _weight_path(key)
            if module is None:
                continue
            for prefix, part, openclip in CHECKPOINT_PREFIXES:
                if module.startswith(prefix):
                    rest = module[len(prefix):]
                    if openclip:
                        self._add_openclip(key, rest.lower().replace(".", "_"), part)
                    else:
                        self._add(part, unet_path(rest) if part == UNET else _te_path(rest), KeyTarget(key))
                    break
            else:
                if module.startswith("diffusion_model.") or (bare and not module.startswith(NOT_PATCHED_PREFIXES)):
                    self._add(UNET, unet_path(module), KeyTarget(key))
        self.layout = self._sd_layout()
        return self

    def _add(self, part: str, path: str, target: KeyTarget) -> None:
        self.index.setdefault((part, path), target)

    def _add_openclip(self, key: str, path: str, part: str) -> None:
        if path in _OPENCLIP_TOP:
            self._add(part, _OPENCLIP_TOP[path], KeyTarget(key))
            return
        m = _OPENCLIP.match(path)
        if m is None:
            return
        layer, name = m[1], m[2]
        base = f"text_model_encoder_layers_{layer}_"
        if name == "attn_in_proj":
            width = self.shapes[key][0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                self._add(part, f"{base}self_attn_{proj}", KeyTarget(key, (0, i * width, width)))
        else:
            self._add(part, base + _OPENCLIP_HF[name], KeyTarget(key))

    def _sd_layout(self) -> SDLayout:
        """Resnets per level and up levels with attention, read off an SD UNet's own keys."""
        paths = [p for part, p in self.index if part == UNET]
        ops = sorted(int(m[1]) for p in paths if (m := re.match(r"^input_blocks_(\d+)_0_op$", p)))
        if not ops:
            return SD1_LAYOUT
        n = ops[0]
        ups = {int(m[1]) // n: int(m[2]) for p in paths if (m := re.match(r"^output_blocks_(\d+)_(\d)_conv$", p))}
        return SDLayout(n - 1, frozenset(level for level, sub in ups.items() if sub == 2))

    def resolve(self, name: str) -> KeyTarget | None:
        """The checkpoint tensor a module name patches, or None when the checkpoint has none."""
        ref = parse_name(name, self.layout)
        hit = self.index.get((ref.part, ref.path))
        if hit is not None or ref.part != UNET or is_text_encoder(name.lower()):
            return hit
        for rename in native_candidates(ref.path):
            native = self.index.get((UNET, rename.path))
            if native is None or native.offset is not None:
                continue
            offset = None
            if rename.layout is not None:
                offset = piece_offset(rename.layout, rename.index, tuple(self.shapes[native.key]))
                if offset is None:
                    continue
            return KeyTarget(native.key, offset, rename.swap_halves)
        return None

    def resolve_all(self, names: Iterable[str]) -> tuple[dict[str, KeyTarget], list[str]]:
        """({name: target}, [names that match no key])."""
        found, missing = {}, []
        for name in names:
            target = self.resolve(name)
            if target is None:
                missing.append(name)
            else:
                found[name] = target
        return found, missing
