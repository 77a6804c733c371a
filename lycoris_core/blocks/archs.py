"""Architectures as data: block lists, LBW vector layouts, detection markers, container aliases."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .names import OTHER, block_sort_key, classify, is_text_encoder, sd_block, unet_path


def _ids(code: str, numbers: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"{code}{i:02d}" for i in numbers)


@dataclass(frozen=True)
class Arch:
    """One model family: what its blocks are called and how LBW vectors list them.

    `blocks`: the full block list in canonical order, as spec names (empty when open-ended);
    `layouts`: LBW vector length -> the spec name of each slot (`BASE` = every text encoder);
    `markers`: patterns on normalised diffusion-model paths that vote for this family;
    `aliases`: container name -> block code, for names the generic rule would code differently.
    """

    name: str
    title: str
    blocks: tuple[str, ...] = ()
    layouts: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    markers: tuple[re.Pattern, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    def claims(self, path: str) -> bool:
        """Whether one normalised path carries one of this family's markers."""
        return any(m.search(path) for m in self.markers)


_SD_LAYOUT_17 = ("BASE",) + _ids("IN", (1, 2, 4, 5, 7, 8)) + ("M00",) + _ids("OUT", range(3, 12))
_SD_LAYOUT_26 = ("BASE",) + _ids("IN", range(12)) + ("M00",) + _ids("OUT", range(12))
_XL_LAYOUT_12 = ("BASE",) + _ids("IN", (4, 5, 7, 8)) + ("M00",) + _ids("OUT", range(6))
_XL_LAYOUT_20 = ("BASE",) + _ids("IN", range(9)) + ("M00",) + _ids("OUT", range(9))
_FLUX_LAYOUT_61 = ("CLIP", "T5", "IN") + _ids("D", range(19)) + _ids("S", range(38)) + ("OUT",)
_SD_PARENTS = r"(?:input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)"

SD1 = Arch(
    "sd1", "SD1.x/2.x UNet", blocks=_SD_LAYOUT_26,
    layouts={17: _SD_LAYOUT_17, 26: _SD_LAYOUT_26},
    markers=(re.compile(r"^(?:input|output)_blocks_(?:9|1[01])_"),
             re.compile(r"^(?:down|up)_blocks_3_"),
             re.compile(r"^down_blocks_0_attentions_"),
             re.compile(r"^input_blocks_[12]_1_")))
SDXL = Arch(
    "sdxl", "SDXL UNet", blocks=_XL_LAYOUT_20,
    layouts={12: _XL_LAYOUT_12, 20: _XL_LAYOUT_20},
    markers=(re.compile(r"^(?:label_emb|add_embedding)(?:_|$)"),
             re.compile(rf"^{_SD_PARENTS}_.*_transformer_blocks_[1-9]"),
             re.compile(r"^up_blocks_0_attentions_"),
             re.compile(r"^output_blocks_[0-2]_1_transformer_blocks_")))
FLUX = Arch(
    "flux", "Flux-style double/single-stream DiT (Flux, Chroma, HunyuanVideo)",
    blocks=_FLUX_LAYOUT_61, layouts={61: _FLUX_LAYOUT_61},
    markers=(re.compile(r"^(?:double_blocks|single_blocks|single_transformer_blocks)_\d"),
             re.compile(r"^(?:guidance_in|vector_in)(?:_|$)")),
    aliases={"transformer_blocks": "D", "single_transformer_blocks": "S"})
SD3 = Arch("sd3", "SD3 MMDiT (joint blocks J00…)", markers=(re.compile(r"^joint_blocks_\d"),))
AUTO = Arch("auto", "blocks derived from numbered containers")

ARCHS: dict[str, Arch] = {a.name: a for a in (SD1, SDXL, FLUX, SD3, AUTO)}
# LBW vector length -> (arch, slots); every standard length belongs to exactly one arch
LAYOUTS: dict[int, tuple[Arch, tuple[str, ...]]] = {
    n: (a, slots) for a in ARCHS.values() for n, slots in a.layouts.items()}


def get_arch(arch: str | Arch | None) -> Arch | None:
    """An Arch from its name (or itself); None stays None; an unknown name raises ValueError."""
    if arch is None or isinstance(arch, Arch):
        return arch
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHS)}") from None


def _name(key) -> str:
    """A model key given as ComfyUI does, possibly `(key, offset)`, as a string."""
    return key[0] if isinstance(key, tuple) else key


def detect_arch(names: Iterable[str]) -> Arch:
    """The family whose markers the most diffusion-model names carry; SD1 for unmarked SD names,
    AUTO when nothing is recognised."""
    paths = [unet_path(n) for n in map(_name, names) if not is_text_encoder(n.lower())]
    best, best_score = AUTO, 0
    for arch in ARCHS.values():
        score = sum(1 for p in paths if arch.claims(p))
        if score > best_score:
            best, best_score = arch, score
    if best_score == 0 and any(sd_block(p) not in (None, OTHER) for p in paths):
        return SD1
    return best


def block_of(module_name: str, model_key: str | tuple | None = None,
             arch: str | Arch | None = None) -> str:
    """The block id of one module: from the host model key when given, else from the file name.

    `arch` (a name or Arch, usually `detect_arch` of the whole file) only matters for file names
    in diffusers layout whose containers a family renames (diffusers Flux -> D/S).
    """
    if model_key is not None:
        return classify(_name(model_key))
    found = get_arch(arch)
    return classify(module_name, found.aliases if found else None)


def module_names(adapters: Mapping[str, object] | Iterable[str]) -> list[str]:
    """The module names of an AdapterFile / {name: Adapter} mapping, or the names themselves."""
    return list(adapters.keys() if isinstance(adapters, Mapping) else adapters)


def module_blocks(adapters: Mapping[str, object] | Iterable[str],
                  model_keys: Mapping[str, str | tuple] | None = None,
                  arch: str | Arch | None = None) -> dict[str, str]:
    """{module name: block id} for a whole file; the arch is detected from its names if not given."""
    names = module_names(adapters)
    found = get_arch(arch) or detect_arch(names)
    keys = model_keys or {}
    return {n: block_of(n, keys.get(n), found) for n in names}


def blocks_present(adapters: Mapping[str, object] | Iterable[str],
                   model_keys: Mapping[str, str | tuple] | None = None,
                   arch: str | Arch | None = None) -> list[str]:
    """The blocks a file touches, in canonical order (a block the file lacks is not listed)."""
    return sorted(set(module_blocks(adapters, model_keys, arch).values()), key=block_sort_key)
