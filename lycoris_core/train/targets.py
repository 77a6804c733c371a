"""Which layers of a torch module tree get an adapter: LyCORIS-style presets plus regex include/exclude.

A preset names block classes (every Linear/Conv inside an instance is a target) and module paths
(the named module itself is a target). Class names cover both diffusers/transformers models (the
names LyCORIS's presets use) and ComfyUI's own LDM/DiT classes, so one preset means the same thing
on either tree. Targets carry kohya-style names (`lora_unet_<path with _>`, `lora_te_...`) so saved
files are readable by other tools; a caller that knows better names (e.g. a host's key map) passes
them per root.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import LycorisError
from ..layer import is_rms_norm

# blocks whose every Linear/Conv is trained by the "transformer" presets (attn-mlp and friends)
TRANSFORMER_BLOCKS = frozenset({
    # diffusers / LyCORIS names
    "Transformer2DModel", "HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock",
    "SingleDiTBlock", "MMDoubleStreamBlock", "MMSingleStreamBlock", "WanAttentionBlock",
    "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock", "JointTransformerBlock",
    "FinalLayer", "QwenImageTransformerBlock",
    # ComfyUI names (LDM UNets, MMDiT, Flux/Hunyuan, HiDream, Wan variants)
    "SpatialTransformer", "SpatialVideoTransformer", "JointBlock", "LastLayer",
    "HiDreamImageBlock", "VaceWanAttentionBlock", "WanAttentionBlockAudio",
})
# convolutional blocks of UNets (diffusers names, then ComfyUI/LDM names)
CONV_BLOCKS = frozenset({"ResnetBlock2D", "Downsample2D", "Upsample2D",
                         "ResBlock", "VideoResBlock", "Downsample", "Upsample"})
# attention modules only (kohya, diffusers, ComfyUI and DiT names)
ATTENTION = frozenset({"CrossAttention", "SelfAttention", "Attention", "MemoryEfficientCrossAttention",
                       "WanSelfAttention", "WanT2VCrossAttention", "WanI2VCrossAttention"})
TE_BLOCKS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "MT5Block", "T5Block",
                       "BertLayer", "Gemma2Attention", "Gemma2FlashAttention2",
                       "Gemma2SdpaAttention", "Gemma2MLP"})
TE_ATTENTION = frozenset({"CLIPAttention", "CLIPSdpaAttention", "BertAttention", "T5Attention",
                          "MT5LayerSelfAttention", "T5LayerSelfAttention", "Gemma2Attention",
                          "Gemma2FlashAttention2", "Gemma2SdpaAttention"})
# UNet layers outside any block that the full presets train (diffusers names, then LDM names)
UNET_IO = ("conv_in", "conv_out", "input_blocks.0.0", "out.2")
UNET_TIME = ("time_embedding.linear_1", "time_embedding.linear_2", "time_embed.0", "time_embed.2")

ROLES = ("unet", "te")
KINDS = ("linear", "conv", "norm")


@dataclass(frozen=True)
class Preset:
    """Block classes and module paths to train, per role ("unet" for the denoiser, "te" for text
    encoders), and whether convolutions with a kernel larger than 1x1 are trained."""

    name: str
    classes: Mapping[str, frozenset[str]]
    names: Mapping[str, tuple[str, ...]]
    conv: bool
    description: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("full", {"unet": TRANSFORMER_BLOCKS | CONV_BLOCKS, "te": TE_BLOCKS},
           {"unet": UNET_IO + UNET_TIME}, True,
           "transformer and conv blocks, conv_in/out, time embedding; text encoders' attention and MLP"),
    Preset("attn-mlp", {"unet": TRANSFORMER_BLOCKS, "te": TE_BLOCKS}, {}, False,
           "transformer blocks (attention, MLP, projections) and text encoders (kohya's preset)"),
    Preset("attn-only", {"unet": ATTENTION, "te": TE_ATTENTION}, {}, False,
           "attention layers only"),
    Preset("unet-transformer-only", {"unet": TRANSFORMER_BLOCKS}, {}, False,
           "transformer blocks of the denoiser, no text encoder"),
    Preset("unet-convblock-only", {"unet": CONV_BLOCKS}, {"unet": UNET_IO}, True,
           "resnet/down/upsample blocks and conv_in/out of the denoiser"),
    Preset("custom", {}, {}, True, "nothing by itself: only what the include regex selects"),
)}


def kohya_name(prefix: str, path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}_{path}".replace(".", "_") if path else prefix


@dataclass
class Root:
    """One module tree to search: the denoiser (role "unet") or a text encoder (role "te").

    `names` gives a module's saved name from its dotted path (a mapping or a function returning
    None when it has no better name); the default is `kohya_name(prefix, path)`.
    """

    module: nn.Module
    prefix: str = "lora_unet"
    role: str = "unet"
    names: Mapping[str, str] | Callable[[str], str | None] | None = None

    def name_of(self, path: str) -> str:
        found = None
        if callable(self.names):
            found = self.names(path)
        elif self.names is not None:
            found = self.names.get(path)
        return found or kohya_name(self.prefix, path)


@dataclass
class Target:
    """One layer to adapt: its saved name, dotted path inside its root, the module and its kind."""

    name: str
    path: str
    module: nn.Module
    role: str
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = layer_kind(self.module) or ""

    @property
    def kernel_is_spatial(self) -> bool:
        """A conv with a kernel larger than 1 (these take conv rank/alpha)."""
        return self.kind == "conv" and any(k > 1 for k in self.module.weight.shape[2:])


def layer_kind(module: nn.Module) -> str | None:
    """"linear", "conv" or "norm" for layers an adapter can wrap; None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return "conv"
    norms = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or is_rms_norm(module)
    if norms and getattr(module, "weight", None) is not None:
        return "norm"
    return None


def compile_patterns(text: str | Iterable[str] | None) -> list[re.Pattern]:
    """Regexes from one pattern per line (or an iterable); blank lines are ignored."""
    if not text:
        return []
    lines = text.splitlines() if isinstance(text, str) else list(text)
    out = []
    for line in (s.strip() for s in lines):
        if not line:
            continue
        try:
            out.append(re.compile(line))
        except re.error as exc:
            raise LycorisError(f"invalid regex {line!r}: {exc}") from exc
    return out


def _matches(patterns: list[re.Pattern], target: Target) -> bool:
    return any(p.search(target.name) or p.search(target.path) for p in patterns)


def _in_preset(path: str, ancestors: tuple[str, ...], role: str, preset: Preset) -> bool:
    names = preset.names.get(role, ())
    if any(re.fullmatch(re.escape(n), path) for n in names):
        return True
    classes = preset.classes.get(role, frozenset())
    return any(c in classes for c in ancestors)


def _walk(module: nn.Module, path: str = "", ancestors: tuple[str, ...] = ()):
    """(path, module, class names of the module and every ancestor) for every module, depth first."""
    here = ancestors + (type(module).__name__,)
    yield path, module, here
    for child_name, child in module.named_children():
        yield from _walk(child, f"{path}.{child_name}" if path else child_name, here)


def select_targets(roots: Iterable[Root] | Root, preset: str | Preset = "full", *,
                   include: str | Iterable[str] | None = None,
                   exclude: str | Iterable[str] | None = None,
                   kinds: Iterable[str] = ("linear", "conv"), conv: bool = True) -> list[Target]:
    """The layers to adapt, in module order.

    A layer is a target when it is of one of `kinds` and either the preset selects it (inside one
    of its block classes, or named by it) or an `include` regex matches its saved name or dotted
    path; an `exclude` match always removes it. Convs with a spatial kernel are skipped when `conv`
    is False, or when the preset turns convolutions off and no include regex picked them (1x1
    convs count as linear, as in LyCORIS).
    Patterns use `re.search`; several patterns may be given one per line.
    """
    if isinstance(roots, Root):
        roots = [roots]
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise LycorisError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        preset = PRESETS[preset]
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown layer kind {kind!r} (known: {', '.join(KINDS)})")
    inc, exc = compile_patterns(include), compile_patterns(exclude)
    out: list[Target] = []
    seen: dict[str, str] = {}
    for root in roots:
        if root.role not in ROLES:
            raise ValueError(f"unknown role {root.role!r} (known: {', '.join(ROLES)})")
        for path, module, ancestors in _walk(root.module):
            kind = layer_kind(module)
            if kind not in kinds or not path:
                continue
            target = Target(root.name_of(path), path, module, root.role)
            by_preset = _in_preset(path, ancestors, root.role, preset)
            by_regex = bool(inc) and _matches(inc, target)
            if not (by_preset or by_regex) or (exc and _matches(exc, target)):
                continue
            if target.kernel_is_spatial and not (conv and (preset.conv or by_regex)):
                continue
            if target.name in seen:
                raise LycorisError(f"two layers get the saved name {target.name!r}: {seen[target.name]} "
                                   f"and {path}; give the root explicit names")
            seen[target.name] = path
            out.append(target)
    return out
