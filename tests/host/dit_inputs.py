"""Latents and CONDITIONING for the tiny models of tests/host/dit.py, shaped as the host's nodes give them.

A latent has the channels and dimensionality the host's latent format says (`latent_channels`,
`latent_dimensions`: video families get [B, C, T, H, W]), unless the tiny model is narrower than
the host's format. A conditioning is the host's list `[[cross_attn, {"pooled_output": ...}]]`
with the text width the tiny model embeds and, where the model takes a vector input, a pooled
output of that width (HiDream also gets its Llama hidden states); the host's `extra_conds` adds what the family needs from there (Flux
guidance, Lumina's token count, SDXL's size embeddings).
"""
from __future__ import annotations

import torch

from . import dit

TOKENS = 6
WAN_TEXT_DIM = 4096  # the host's WanModel `text_dim` default (the tiny Wan keeps it)
SDXL_SIZE_EMBEDS = 6 * 256  # SDXL's `y` = pooled text + six 256-wide size embeddings
NARROWER = {"flux2": 32}  # tiny models narrower than the host's latent format (Flux.2: 128)
# the config key holding the text width each family embeds, first match wins
CONTEXT_KEYS = ("context_in_dim", "joint_attention_dim", "cap_feat_dim", "context_dim")
MASKED = ("lumina2", "z_image")  # families whose text encoder (Gemma/Qwen3) hands over a mask


def latent_shape(family: str, model, batch: int = 1, size: int = 8, frames: int = 1) -> tuple[int, ...]:
    """[B, C, H, W] or [B, C, T, H, W] for `model` (a ModelPatcher of the tiny `family`)."""
    fmt = model.model.latent_format
    channels = NARROWER.get(family, fmt.latent_channels)
    dims = getattr(fmt, "latent_dimensions", 2)
    return (batch, channels) + ((frames,) if dims == 3 else ()) + (size, size)


def latents(family: str, model, batch: int = 1, seed: int = 0) -> dict:
    """A LATENT of `batch` seeded random images (as a VAE encoder's output would be)."""
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(latent_shape(family, model, batch), generator=g)}


def context_width(family: str) -> int:
    """The text-embedding width the tiny `family` model takes."""
    config = dit.FAMILIES[family].config
    for key in CONTEXT_KEYS:
        if key in config:
            return config[key]
    if "caption_channels" in config:  # HiDream: T5 width first, then the Llama width
        return config["caption_channels"][0]
    embedder = config.get("context_embedder_config")
    if embedder is not None:
        return embedder["params"]["in_features"]
    return WAN_TEXT_DIM


def pooled_width(family: str) -> int | None:
    """The pooled-text width of the tiny `family` model's vector input (None: it has none)."""
    config = dit.FAMILIES[family].config
    if config.get("vec_in_dim") is not None:
        return config["vec_in_dim"]
    if "text_emb_dim" in config:  # HiDream's pooled CLIP-L + CLIP-G
        return config["text_emb_dim"]
    adm = config.get("adm_in_channels")
    if adm is None:
        return None
    return adm - SDXL_SIZE_EMBEDS if config.get("num_classes") == "sequential" else adm


def conditioning(family: str, seed: int = 0, tokens: int = TOKENS) -> list:
    """A CONDITIONING list as a text encoder node returns it, for the tiny `family` model."""
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn(1, tokens, context_width(family), generator=g)
    pooled = pooled_width(family)
    extra = {"pooled_output": None if pooled is None else torch.randn(1, pooled, generator=g)}
    if family in MASKED:
        extra["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    config = dit.FAMILIES[family].config
    if "llama_layers" in config:
        # HiDream: the hidden states of every Llama layer, [B, layers, tokens, width]; the model
        # reads the layers its config lists
        layers = max(config["llama_layers"]) + 1
        extra["conditioning_llama3"] = torch.randn(1, layers, tokens, config["caption_channels"][1], generator=g)
    return [[cross, extra]]
