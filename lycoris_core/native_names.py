"""Diffusers module paths -> the original (native) layout, for families whose host key maps miss
diffusers names (Wan, HunyuanVideo, Lumina 2, Flux.2, Chroma's approximator): diffusers/SimpleTuner
files say `blocks.0.attn1.to_q`, ComfyUI's Wan says `blocks.0.self_attn.q`. Likewise XLabs' Flux
processor names, and the module paths of text encoders as trainers write them.

Rules are data, on the normalised path (trainer prefix removed, `_`-joined, lower case) that the key
map indexes. A rule may name a piece of a fused native weight (diffusers' separate q, k, v are rows
of one qkv weight) and whether the change is stored with its two halves swapped (diffusers' final
norms hold (scale, shift), the native layout (shift, scale)). The key map tries the candidates only
after every direct lookup failed, and a candidate counts only when the model has that path, so a
rule never captures another family's names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rename:
    """A native spelling of a diffusers path, and the piece of that weight it is, if any."""

    path: str
    # "qkv" (q, k, v rows), "qkv_mlp" (q, k, v, mlp rows); "adaln_pair" / "adaln_chunks": the
    # whole weight, only when it makes two chunks (shift, scale) / when it makes more
    layout: str | None = None
    index: int = 0  # which piece of the layout
    swap_halves: bool = False


def _rules(*rows) -> list[tuple[re.Pattern, str, str | None, int, bool]]:
    """Compiled rules from rows (pattern, native[, layout, index[, swap_halves]])."""
    defaults = (None, 0, False)
    return [(re.compile(pattern), native, *rest, *defaults[len(rest):]) for pattern, native, *rest in rows]


def _qkv(prefix: str, native: str, names=("to_q", "to_k", "to_v")) -> list[tuple]:
    """Rules sending `<prefix><name>` (q, k, v in order) to pieces of one fused qkv weight."""
    return [(prefix + name + "$", native, "qkv", i) for i, name in enumerate(names)]


_WAN = r"^blocks_(\d+)_"
_DOUBLE = r"^transformer_blocks_(\d+)_"
_SINGLE = r"^single_transformer_blocks_(\d+)_"
_HV_REFINER = r"^context_embedder_token_refiner_refiner_blocks_(\d+)_"
_LUMINA = r"^(layers|noise_refiner|context_refiner)_(\d+)_"
RULES: dict[str, list[tuple[re.Pattern, str, str | None, int, bool]]] = {
    "wan": _rules(
        (_WAN + r"attn1_to_([qkv])$", r"blocks_\1_self_attn_\2"),
        (_WAN + r"attn1_to_out_0$", r"blocks_\1_self_attn_o"),
        (_WAN + r"attn1_norm_([qk])$", r"blocks_\1_self_attn_norm_\2"),
        (_WAN + r"attn2_to_([qkv])$", r"blocks_\1_cross_attn_\2"),
        (_WAN + r"attn2_to_out_0$", r"blocks_\1_cross_attn_o"),
        (_WAN + r"attn2_norm_([qk])$", r"blocks_\1_cross_attn_norm_\2"),
        (_WAN + r"attn2_add_k_proj$", r"blocks_\1_cross_attn_k_img"),
        (_WAN + r"attn2_add_v_proj$", r"blocks_\1_cross_attn_v_img"),
        (_WAN + r"attn2_norm_added_k$", r"blocks_\1_cross_attn_norm_k_img"),
        (_WAN + r"ffn_net_0_proj$", r"blocks_\1_ffn_0"),
        (_WAN + r"ffn_net_2$", r"blocks_\1_ffn_2"),
        (_WAN + r"norm2$", r"blocks_\1_norm3"),  # diffusers' cross-attention norm
        (r"^condition_embedder_text_embedder_linear_([12])$", "text_embedding_LIN\\1"),
        (r"^condition_embedder_time_embedder_linear_([12])$", "time_embedding_LIN\\1"),
        (r"^condition_embedder_time_proj$", "time_projection_1"),
        (r"^condition_embedder_image_embedder_norm1$", "img_emb_proj_0"),
        (r"^condition_embedder_image_embedder_ff_net_0_proj$", "img_emb_proj_1"),
        (r"^condition_embedder_image_embedder_ff_net_2$", "img_emb_proj_3"),
        (r"^condition_embedder_image_embedder_norm2$", "img_emb_proj_4"),
        (r"^proj_out$", "head_head"),
    ),
    # the double/single-stream blocks Flux.1 introduced; Chroma, HunyuanVideo and Flux.2 keep them
    # and diffusers names them alike (q/k/v rows of one qkv; a single block's q, k, v, mlp rows of
    # linear1). Attention q/k norms (`attn.norm_q` -> `img_attn.norm.query_norm.scale`) are not
    # here: they are no `.weight` the name index holds.
    "flux_blocks": _rules(
        *_qkv(_DOUBLE + "attn_", r"double_blocks_\1_img_attn_qkv"),
        *_qkv(_DOUBLE + "attn_", r"double_blocks_\1_txt_attn_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
        (_DOUBLE + r"attn_to_out_0$", r"double_blocks_\1_img_attn_proj"),
        (_DOUBLE + r"attn_to_add_out$", r"double_blocks_\1_txt_attn_proj"),
        (_DOUBLE + r"ff_net_0_proj$", r"double_blocks_\1_img_mlp_0"),
        (_DOUBLE + r"ff_net_2$", r"double_blocks_\1_img_mlp_2"),
        (_DOUBLE + r"ff_context_net_0_proj$", r"double_blocks_\1_txt_mlp_0"),
        (_DOUBLE + r"ff_context_net_2$", r"double_blocks_\1_txt_mlp_2"),
        (_DOUBLE + r"norm1_linear$", r"double_blocks_\1_img_mod_lin"),
        (_DOUBLE + r"norm1_context_linear$", r"double_blocks_\1_txt_mod_lin"),
        *[(_SINGLE + name + "$", r"single_blocks_\1_linear1", "qkv_mlp", i)
          for i, name in enumerate(("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp"))],
        (_SINGLE + r"proj_out$", r"single_blocks_\1_linear2"),
        (_SINGLE + r"norm_linear$", r"single_blocks_\1_modulation_lin"),
        (r"^time_text_embed_timestep_embedder_linear_([12])$", r"time_in_LAYER\1"),
        (r"^time_text_embed_guidance_embedder_linear_([12])$", r"guidance_in_LAYER\1"),
        (r"^time_text_embed_text_embedder_linear_([12])$", r"vector_in_LAYER\1"),
        (r"^norm_out_linear$", "final_layer_adaln_modulation_1", None, 0, True),
        (r"^proj_out$", "final_layer_linear"),
    ),
    # Flux.1 and Chroma: plain linear embedders (HunyuanVideo's are a patch conv and a refiner)
    "flux": _rules(
        (r"^x_embedder$", "img_in"),
        (r"^context_embedder$", "txt_in"),
    ),
    "hunyuan_video": _rules(
        *_qkv(_HV_REFINER + "attn_", r"txt_in_individual_token_refiner_blocks_\1_self_attn_qkv"),
        (_HV_REFINER + r"attn_to_out_0$", r"txt_in_individual_token_refiner_blocks_\1_self_attn_proj"),
        (_HV_REFINER + r"ff_net_0_proj$", r"txt_in_individual_token_refiner_blocks_\1_mlp_0"),
        (_HV_REFINER + r"ff_net_2$", r"txt_in_individual_token_refiner_blocks_\1_mlp_2"),
        (_HV_REFINER + r"norm_out_linear$", r"txt_in_individual_token_refiner_blocks_\1_adaln_modulation_1"),
        (r"^context_embedder_proj_in$", "txt_in_input_embedder"),
        (r"^context_embedder_time_text_embed_timestep_embedder_linear_([12])$", r"txt_in_t_embedder_LAYER\1"),
        (r"^context_embedder_time_text_embed_text_embedder_linear_([12])$", r"txt_in_c_embedder_LAYER\1"),
    ),
    # SD3/SD3.5 MMDiT: each `transformer_blocks.N` is `joint_blocks.N`, image stream `x_block`,
    # text stream `context_block`; SD3.5's second image attention `attn2`. The last block's text
    # stream is pre-only: its adaLN makes (scale, shift) in diffusers, (shift, scale) natively,
    # where the other blocks' make six chunks in one order: told apart by the weight's rows.
    "sd3": _rules(
        *_qkv(_DOUBLE + "attn_", r"joint_blocks_\1_x_block_attn_qkv"),
        *_qkv(_DOUBLE + "attn_", r"joint_blocks_\1_context_block_attn_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
        *_qkv(_DOUBLE + "attn2_", r"joint_blocks_\1_x_block_attn2_qkv"),
        (_DOUBLE + r"attn_to_out_0$", r"joint_blocks_\1_x_block_attn_proj"),
        (_DOUBLE + r"attn2_to_out_0$", r"joint_blocks_\1_x_block_attn2_proj"),
        (_DOUBLE + r"attn_to_add_out$", r"joint_blocks_\1_context_block_attn_proj"),
        (_DOUBLE + r"ff_net_0_proj$", r"joint_blocks_\1_x_block_mlp_fc1"),
        (_DOUBLE + r"ff_net_2$", r"joint_blocks_\1_x_block_mlp_fc2"),
        (_DOUBLE + r"ff_context_net_0_proj$", r"joint_blocks_\1_context_block_mlp_fc1"),
        (_DOUBLE + r"ff_context_net_2$", r"joint_blocks_\1_context_block_mlp_fc2"),
        (_DOUBLE + r"norm1_linear$", r"joint_blocks_\1_x_block_adaln_modulation_1"),
        *[(_DOUBLE + r"norm1_context_linear$", r"joint_blocks_\1_context_block_adaln_modulation_1", layout, 0, swap)
          for layout, swap in (("adaln_chunks", False), ("adaln_pair", True))],
        (r"^pos_embed_proj$", "x_embedder_proj"),
        (r"^context_embedder$", "context_embedder"),
        (r"^time_text_embed_timestep_embedder_linear_([12])$", r"t_embedder_mlp_LIN\1"),
        (r"^time_text_embed_text_embedder_linear_([12])$", r"y_embedder_mlp_LIN\1"),
        (r"^norm_out_linear$", "final_layer_adaln_modulation_1", None, 0, True),
        (r"^proj_out$", "final_layer_linear"),
    ),
    "lumina2": _rules(
        *_qkv(_LUMINA + "attn_", r"\1_\2_attention_qkv"),
        (_LUMINA + r"attn_to_out_0$", r"\1_\2_attention_out"),
        (_LUMINA + r"feed_forward_linear_([123])$", r"\1_\2_feed_forward_w\3"),
        (_LUMINA + r"norm1_linear$", r"\1_\2_adaln_modulation_1"),
        (r"^time_caption_embed_timestep_embedder_linear_1$", "t_embedder_mlp_0"),
        (r"^time_caption_embed_timestep_embedder_linear_2$", "t_embedder_mlp_2"),
        (r"^time_caption_embed_caption_embedder_1$", "cap_embedder_1"),
        (r"^norm_out_linear_1$", "final_layer_adaln_modulation_1"),
        (r"^norm_out_linear_2$", "final_layer_linear"),
    ),
    "flux2": _rules(
        (r"^(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)_linear$", r"\1_lin"),
        (r"^single_transformer_blocks_(\d+)_attn_to_qkv_mlp_proj$", r"single_blocks_\1_linear1"),
        (r"^single_transformer_blocks_(\d+)_attn_to_out$", r"single_blocks_\1_linear2"),
        (r"^time_guidance_embed_guidance_embedder_linear_([12])$", r"guidance_in_LAYER\1"),
        (r"^time_guidance_embed_timestep_embedder_linear_([12])$", r"time_in_LAYER\1"),
        (r"^transformer_blocks_(\d+)_ff_linear_in$", r"double_blocks_\1_img_mlp_0"),
        (r"^transformer_blocks_(\d+)_ff_linear_out$", r"double_blocks_\1_img_mlp_2"),
        (r"^transformer_blocks_(\d+)_ff_context_linear_in$", r"double_blocks_\1_txt_mlp_0"),
        (r"^transformer_blocks_(\d+)_ff_context_linear_out$", r"double_blocks_\1_txt_mlp_2"),
    ),
    # XLabs (x-flux) LoRA processors on Flux: `double_blocks.0.processor.qkv_lora1` is the image
    # stream's qkv, `...2` the text stream's; a single block's `qkv_lora` is the qkv rows of linear1
    # (the host names that piece `linear1_qkv`), its `proj_lora` all of linear2. A single block's
    # `qkv_lora.down.weight` reads as the old glued diffusers suffix, so module `processor.qkv`.
    "xlabs_flux": _rules(
        (r"^double_blocks_(\d+)_processor_qkv_lora1$", r"double_blocks_\1_img_attn_qkv"),
        (r"^double_blocks_(\d+)_processor_qkv_lora2$", r"double_blocks_\1_txt_attn_qkv"),
        (r"^double_blocks_(\d+)_processor_proj_lora1$", r"double_blocks_\1_img_attn_proj"),
        (r"^double_blocks_(\d+)_processor_proj_lora2$", r"double_blocks_\1_txt_attn_proj"),
        (r"^single_blocks_(\d+)_processor_qkv(?:_lora)?$", r"single_blocks_\1_linear1_qkv"),
        (r"^single_blocks_(\d+)_processor_proj(?:_lora)?$", r"single_blocks_\1_linear2"),
    ),
    "chroma": _rules(
        (r"^distilled_guidance_layer_layers_(\d+)_linear_1$", r"distilled_guidance_layer_layers_\1_in_layer"),
        (r"^distilled_guidance_layer_layers_(\d+)_linear_2$", r"distilled_guidance_layer_layers_\1_out_layer"),
        (r"^distilled_guidance_layer_(in_proj|out_proj)$", r"distilled_guidance_layer_\1"),  # same in both
    ),
}
# the rule groups each family's diffusers files are read with (diffusers paths alone do not tell
# Flux from SD3: `transformer_blocks.0.attn.to_q` is in both); Qwen-Image's native names are
# diffusers' own, so it needs none
FAMILIES: dict[str, tuple[str, ...]] = {
    "flux": ("flux_blocks", "flux"), "chroma": ("flux_blocks", "flux", "chroma"),
    "flux2": ("flux_blocks", "flux2"), "hunyuan_video": ("flux_blocks", "hunyuan_video"),
    "sd3": ("sd3",), "wan": ("wan",), "lumina2": ("lumina2",), "xlabs_flux": ("xlabs_flux",),
    "qwen_image": (),
}
# numbered diffusers linears -> the native names of two-layer MLPs
_SPELLED = {"LIN1": "0", "LIN2": "2", "LAYER1": "in_layer", "LAYER2": "out_layer"}
_SPELLED_RE = re.compile("|".join(_SPELLED))


def native_candidates(path: str, family: str | None = None) -> list[Rename]:
    """Native spellings of a normalised diffusers module path (`blocks_0_attn1_to_q`, prefix
    removed, as `blocks.names.unet_path` gives), of one family of FAMILIES or of any."""
    out = []
    groups = RULES if family is None else FAMILIES[family]
    for group in groups:
        rules = RULES[group]
        for pattern, replacement, layout, index, swap in rules:
            native, hits = pattern.subn(replacement, path)
            if hits:
                native = _SPELLED_RE.sub(lambda m: _SPELLED[m.group(0)], native)
                out.append(Rename(native.lower(), layout, index, swap))
    return out


def piece_offset(layout: str, index: int, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(dim, start, length) of piece `index` of a fused weight of `shape`, or None if it does not
    divide that way. q is as wide as the input (hidden = heads x head width); k and v share the
    rest of the qkv rows equally (fewer key/value heads allowed); the mlp rows follow q, k, v."""
    rows, cols = shape[0], shape[1]
    if layout in ("adaln_pair", "adaln_chunks"):
        return (0, 0, rows) if (rows == 2 * cols) == (layout == "adaln_pair") else None
    if layout == "qkv":
        kv, odd = divmod(rows - cols, 2)
        sizes = [cols, kv, kv] if kv > 0 and not odd else None
    elif layout == "qkv_mlp":
        sizes = [cols, cols, cols, rows - 3 * cols] if rows > 3 * cols else None
    else:
        raise ValueError(f"unknown fused layout {layout!r}")
    if sizes is None:
        return None
    return 0, sum(sizes[:index]), sizes[index]


# trainer prefixes in front of a text encoder's own module path: PEFT's saved adapters
# (`base_model.model.`), kohya sd-scripts (`lora_te_`, `lora_te1_`), diffusers parts, ComfyUI's own
_TE_FILE_PREFIX = re.compile(r"^(?:base_model\.model\.|lora_te\d*_|text_encoders?(?:_\d)?\.)")
# roots of an LLM's decoder stack that tools keep or drop: transformers' `model.` of a *ForCausalLM /
# *ForConditionalGeneration, `language_model.` of a vision-language model (Qwen2.5-VL), the host's `model.`
_TE_ROOTS = re.compile(r"^(?:model_|language_model_)+")
_HOST_TE_ROOT = re.compile(r"^[^.]+\.transformer\.")


def text_encoder_path(name: str) -> str | None:
    """The normalised module path of a text-encoder file name (`lora_te_layers_0_self_attn_q_proj`,
    `base_model.model.model.language_model.layers.0.mlp.up_proj` -> `layers_0_...`), or None when
    the name has no text-encoder prefix."""
    prefix = _TE_FILE_PREFIX.match(name)
    if prefix is None:
        return None
    return _TE_ROOTS.sub("", name[prefix.end():].replace(".", "_").lower())


def host_text_encoder_path(key: str) -> str | None:
    """The same normalised path of a host text-encoder weight (`gemma2_2b.transformer.model.layers.0.
    self_attn.q_proj.weight` -> `layers_0_self_attn_q_proj`), or None for other keys."""
    root = _HOST_TE_ROOT.match(key)
    if root is None or not key.endswith(".weight"):
        return None
    return _TE_ROOTS.sub("", key[root.end():-len(".weight")].replace(".", "_").lower())


def swap_halves(change: torch.Tensor) -> torch.Tensor:
    """The change with its two output halves exchanged ((scale, shift) -> (shift, scale))."""
    first, second = change.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)
