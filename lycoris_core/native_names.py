"""Diffusers module paths -> the original (native) layout, for families whose host key maps know
only the native names (Wan 2.x: diffusers/SimpleTuner files say `blocks.0.attn1.to_q`, ComfyUI's
model says `blocks.0.self_attn.q`).

Rules are data: one (pattern, replacement) list per family, on the normalised path (trainer prefix
removed, `_`-joined, lower case) that the key map indexes. The key map tries the candidates only after every direct lookup failed,
and a candidate counts only when the model has that path, so a rule never captures another
family's names.
"""
from __future__ import annotations

import re

_BLOCK = r"^blocks_(\d+)_"
RULES: dict[str, list[tuple[re.Pattern, str]]] = {
    "wan": [(re.compile(p), r) for p, r in (
        (_BLOCK + r"attn1_to_([qkv])$", r"blocks_\1_self_attn_\2"),
        (_BLOCK + r"attn1_to_out_0$", r"blocks_\1_self_attn_o"),
        (_BLOCK + r"attn1_norm_([qk])$", r"blocks_\1_self_attn_norm_\2"),
        (_BLOCK + r"attn2_to_([qkv])$", r"blocks_\1_cross_attn_\2"),
        (_BLOCK + r"attn2_to_out_0$", r"blocks_\1_cross_attn_o"),
        (_BLOCK + r"attn2_norm_([qk])$", r"blocks_\1_cross_attn_norm_\2"),
        (_BLOCK + r"attn2_add_k_proj$", r"blocks_\1_cross_attn_k_img"),
        (_BLOCK + r"attn2_add_v_proj$", r"blocks_\1_cross_attn_v_img"),
        (_BLOCK + r"attn2_norm_added_k$", r"blocks_\1_cross_attn_norm_k_img"),
        (_BLOCK + r"ffn_net_0_proj$", r"blocks_\1_ffn_0"),
        (_BLOCK + r"ffn_net_2$", r"blocks_\1_ffn_2"),
        (_BLOCK + r"norm2$", r"blocks_\1_norm3"),  # diffusers' cross-attention norm
        (r"^condition_embedder_text_embedder_linear_1$", "text_embedding_0"),
        (r"^condition_embedder_text_embedder_linear_2$", "text_embedding_2"),
        (r"^condition_embedder_time_embedder_linear_1$", "time_embedding_0"),
        (r"^condition_embedder_time_embedder_linear_2$", "time_embedding_2"),
        (r"^condition_embedder_time_proj$", "time_projection_1"),
        (r"^condition_embedder_image_embedder_norm1$", "img_emb_proj_0"),
        (r"^condition_embedder_image_embedder_ff_net_0_proj$", "img_emb_proj_1"),
        (r"^condition_embedder_image_embedder_ff_net_2$", "img_emb_proj_3"),
        (r"^condition_embedder_image_embedder_norm2$", "img_emb_proj_4"),
        (r"^proj_out$", "head_head"),
    )],
}


def native_candidates(path: str) -> list[str]:
    """Native spellings of a normalised diffusers module path (`blocks_0_attn1_to_q`, prefix
    removed, as `blocks.names.unet_path` gives), any family."""
    out = []
    for rules in RULES.values():
        for pattern, replacement in rules:
            native, hits = pattern.subn(replacement, path)
            if hits:
                out.append(native)
    return out
