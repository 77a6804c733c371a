"""Module names and model keys -> block ids, by rules on the (normalised) module path.

Every name is first normalised: lower case, the trainer's prefix stripped (`lora_unet_`,
`lycoris_`, `lora_transformer_`, `diffusion_model.`, `unet.`, `transformer.`, …), dots turned
into underscores, so kohya-flattened file names, peft/diffusers dotted names and host model keys
all read the same (`down_blocks_1_attentions_0_…`, `input_blocks_4_1_…`, `double_blocks_3_…`).
Then, in this order:

1. text encoders -> `BASE`, or `T5` for T5-family encoders;
2. the SD UNet (LDM and diffusers paths, §3.2 table) -> `IN00`…`IN11`, `M00`, `OUT00`…`OUT11`;
   its modules outside every block (time/label embedding, final norm/conv) -> `OTHER`;
3. DiT input embedders (`img_in`, `txt_in`, `x_embedder`, …) -> `IN`, final layer -> `OUT`;
4. the first numbered container of the path -> `<code><NN>`: the code is the initials of the
   container name without the generic words blocks/block/layers/layer (`blocks.7` -> `B07`,
   `double_blocks.3` -> `D03`, `single_blocks` -> `S`, `joint_blocks` -> `J`,
   `transformer_blocks` -> `T`, `double_stream_blocks` -> `DS`, `noise_refiner` -> `NR`,
   `layers` -> `L`). A container name is at most three words ending in blocks/block/layers/layer/
   refiner; an architecture may rename containers (`aliases`: diffusers Flux
   `transformer_blocks` -> `D`);
5. anything else -> `OTHER`.

Blocks are shown in groups (`block_group`): the text encoders, the SD UNet's in/mid/out, a DiT's
input embedders with `IN` and final layer with `OUT`, one group per container code (double,
single, joint, or the code itself), and `OTHER`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

BASE = "BASE"
T5 = "T5"
IN = "IN"
OUT = "OUT"
OTHER = "OTHER"

_UNET_PREFIXES = ("lora_unet_", "lora_prior_unet_", "lora_transformer_", "lycoris_", "oft_unet_",
                  "base_model.model.", "model.", "diffusion_model.", "diffusion_model_", "unet.",
                  "transformer.")
_TE_PREFIX = re.compile(
    r"^(?:lora_te\d*_|lora_prior_te_|text_encoders?(?:_\d)?[._]|te\d?\."
    r"|(?:clip_[lgh]|t5\w*|umt5\w*|mt5\w*|byt5\w*|llama\w*|qwen\w*|gemma\w*|cond_stage_model"
    r"|conditioner)[._])")
_TE_INSIDE = re.compile(r"text_model_encoder_layers|transformer_resblocks|encoder_block_\d+_layer")
_T5_NAME = re.compile(r"^(?:u?m?t5\w*|byt5\w*)[._]|encoder_block_\d+_layer|selfattention|"
                      r"densereludense|encdecattention")


def _sd_in(i: int) -> str:
    return f"IN{i:02d}"


def _sd_out(i: int) -> str:
    return f"OUT{i:02d}"


# (pattern on the normalised path, block id from the match) for the SD1.x/2.x/SDXL UNet
SD_RULES: tuple[tuple[re.Pattern, Callable[[re.Match], str]], ...] = (
    (re.compile(r"^input_blocks_(\d+)(?:_|$)"), lambda m: _sd_in(int(m[1]))),
    (re.compile(r"^middle_block(?:_|$)"), lambda m: "M00"),
    (re.compile(r"^output_blocks_(\d+)(?:_|$)"), lambda m: _sd_out(int(m[1]))),
    (re.compile(r"^conv_in(?:_|$)"), lambda m: "IN00"),
    (re.compile(r"^down_blocks_(\d+)_(?:resnets|attentions)_(\d+)(?:_|$)"),
     lambda m: _sd_in(1 + 3 * int(m[1]) + int(m[2]))),
    (re.compile(r"^down_blocks_(\d+)_downsamplers_\d+(?:_|$)"), lambda m: _sd_in(3 + 3 * int(m[1]))),
    (re.compile(r"^mid_block(?:_|$)"), lambda m: "M00"),
    (re.compile(r"^up_blocks_(\d+)_(?:resnets|attentions)_(\d+)(?:_|$)"),
     lambda m: _sd_out(3 * int(m[1]) + int(m[2]))),
    (re.compile(r"^up_blocks_(\d+)_upsamplers_\d+(?:_|$)"), lambda m: _sd_out(3 * int(m[1]) + 2)),
)
# SD UNet modules outside every block (LBW leaves them at 1 too)
SD_OUTSIDE = re.compile(r"^(?:time_embed|time_embedding|label_emb|add_embedding|out|conv_out"
                        r"|conv_norm_out)(?:_|$)")
DIT_IN = re.compile(r"^(?:img_in|txt_in|time_in|vector_in|guidance_in|x_embedder|context_embedder"
                    r"|time_text_embed|pos_embed|t_embedder|y_embedder)(?:_|$)")
DIT_OUT = re.compile(r"^(?:final_layer|norm_out|proj_out)(?:_|$)")
CONTAINER_WORDS = frozenset({"blocks", "block", "layers", "layer", "refiner"})
GENERIC_WORDS = frozenset({"blocks", "block", "layers", "layer"})
MAX_CONTAINER_WORDS = 3


def is_text_encoder(name: str) -> bool:
    """Whether a (lower-case) file module name or model key belongs to a text encoder."""
    return bool(_TE_PREFIX.match(name) or _TE_INSIDE.search(name.replace(".", "_")))


def unet_path(name: str) -> str:
    """Lower-case path of a diffusion-model module with its trainer/host prefix removed, `_`-joined."""
    path = name.lower()
    stripped = True
    while stripped:
        stripped = False
        for prefix in _UNET_PREFIXES:
            if path.startswith(prefix):
                path = path[len(prefix):].lstrip("._")
                stripped = True
    return path.replace(".", "_")


def block_id(code: str, index: int) -> str:
    """The canonical id of block `index` of family `code`: two digits at least (`D7` -> `D07`)."""
    return f"{code}{index:02d}"


def container_code(words: list[str]) -> str | None:
    """Initials of a container name without the generic words (`double_stream_blocks` -> `DS`)."""
    kept = [w for w in words if w not in GENERIC_WORDS] or words[-1:]
    code = "".join(w[0] for w in kept if w[:1].isalpha()).upper()
    return code or None


def container_block(path: str, aliases: Mapping[str, str] | None = None) -> str | None:
    """`<code><NN>` for the first numbered container of a normalised path, else None."""
    tokens = [t for t in path.split("_") if t]
    for i, tok in enumerate(tokens):
        if tok.isascii() and tok.isdigit():
            break
    else:
        return None
    words = tokens[:i]
    if not words or len(words) > MAX_CONTAINER_WORDS or words[-1] not in CONTAINER_WORDS:
        return None
    code = (aliases or {}).get("_".join(words)) or container_code(words)
    return block_id(code, int(tokens[i])) if code else None


def sd_block(path: str) -> str | None:
    """The SD UNet block of a normalised path (`OTHER` outside the blocks), None if not SD."""
    for pattern, make in SD_RULES:
        m = pattern.match(path)
        if m:
            return make(m)
    return OTHER if SD_OUTSIDE.match(path) else None


def classify(name: str, aliases: Mapping[str, str] | None = None) -> str:
    """The block id of one file module name or model key (see the module docstring)."""
    raw = name.lower()
    if is_text_encoder(raw):
        return T5 if _T5_NAME.search(raw) else BASE
    path = unet_path(raw)
    block = sd_block(path)
    if block is not None:
        return block
    if DIT_IN.match(path):
        return IN
    if DIT_OUT.match(path):
        return OUT
    return container_block(path, aliases) or OTHER


def is_known_name(name: str) -> bool:
    """Whether a module name reads as part of a model: a text encoder, a trainer/host prefix
    (`lora_unet_`, `transformer.`, …) or a path a block rule knows; `my_layer` does not."""
    raw = name.lower()
    path = unet_path(raw)
    return (is_text_encoder(raw) or path != raw.replace(".", "_") or classify(raw) != OTHER
            or bool(SD_OUTSIDE.match(path)))


_ID = re.compile(r"^([A-Z]+)(\d+)$")
_FIXED_RANK = {BASE: 0, T5: 1, IN: 2, OUT: 20, OTHER: 30}
_FAMILY_RANK = {"IN": 3, "M": 4, "OUT": 5, "D": 6, "S": 7, "J": 8}


def split_id(block: str) -> tuple[str, int | None]:
    """(`code`, index) of a block id; index None for the unnumbered ids (BASE, IN, OTHER…)."""
    m = _ID.match(block)
    if m and block != T5:
        return m[1], int(m[2])
    return block, None


def block_sort_key(block: str) -> tuple:
    """Canonical order: BASE, T5, IN, IN00…, M00…, OUT00…, D…, S…, J…, other codes A-Z, OUT, OTHER."""
    if block in _FIXED_RANK:
        return (_FIXED_RANK[block], "", 0)
    code, index = split_id(block)
    return (_FAMILY_RANK.get(code, 9), code, index if index is not None else -1)


# group id -> title; a container code without an entry gets "<CODE> blocks"
GROUP_TITLES = {
    "te": "Text encoder", "in": "Input blocks (IN)", "mid": "Middle block (M)",
    "out": "Output blocks (OUT)", "double": "Double-stream blocks (D)",
    "single": "Single-stream blocks (S)", "joint": "Joint blocks (J)",
    "other": "Outside every block (OTHER)",
}
_CODE_GROUPS = {"IN": "in", "M": "mid", "OUT": "out", "D": "double", "S": "single", "J": "joint"}


def block_group(block: str) -> str:
    """The group of a block id: te, in, mid, out, double, single, joint, other, or its code."""
    if block in (BASE, T5):
        return "te"
    if block == OTHER:
        return "other"
    code, _ = split_id(block)
    return _CODE_GROUPS.get(code, code.lower())


def group_title(group: str) -> str:
    """The title shown for a `block_group` id."""
    return GROUP_TITLES.get(group, f"{group.upper()} blocks")
