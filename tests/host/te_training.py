"""Tiny models and shared LyCORIS Train runs for the text-encoder training tests
(test_host_train_te.py, test_host_train_resume.py): an SD1.5-layout UNet at the tiny CLIP's width,
the tiny SDXL and Flux with text widths fitted to the tiny encoders, and the node's outputs by name."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from host import dit
from host.helpers import pack_module
from host.text_encoders import CLIP_CONFIG, flux_clip, sdxl_clip

LATE_BLOCK = "up_blocks_1_attentions_1"  # the tiny SD1.5 UNet's last transformer
CAPTION = "a photo of a cat"
STEPS = 4
SD15_TINY = dit.Family(
    "sd15_tiny", "comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel",
    {"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
     "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
     "num_heads": 2, "num_head_channels": -1, "context_dim": CLIP_CONFIG["hidden_size"],
     "use_linear_in_transformer": False, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
     "adm_in_channels": None, "use_checkpoint": False, "use_temporal_attention": False,
     "use_temporal_resblock": False},
    "SD15", config_class="SD15")
# the text widths of the tiny encoders: SDXL's cross-attention is CLIP-L + CLIP-G (64 + 96), its
# vector the projected CLIP-G pooled output (96) + six 256-wide size embeddings; Flux's vector is
# CLIP-L's pooled output (64)
FAMILY_FOR_CLIPS = {
    "sdxl": {"context_dim": 160, "adm_in_channels": 96 + 6 * 256},
    "flux": {"vec_in_dim": 64},
}
# SDXL reads CLIP-L's penultimate layer and no pooled output from it: its last layer gets no gradient
UNUSED_LAYER = {"sdxl": f"lora_te1_text_model_encoder_layers_{CLIP_CONFIG['num_hidden_layers'] - 1}_"}
TE_PREFIXES = {"sd15": {"lora_te_"}, "sdxl": {"lora_te1_", "lora_te2_"}, "flux": {"lora_te1_", "lora_te3_"}}

_HOSTS: dict = {}
_RUNS: dict = {}


def sd1_clip(seed: int = 0):
    """A host CLIP object holding SD1.x's lone CLIP-L at the tiny width, seeded random, fp32."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    from host.checkpoint import _fill_

    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                    comfy.sd1_clip.SD1ClipModel),
                             model_options={"dtype": torch.float32, "clip_l_model_config": dict(CLIP_CONFIG)})
    _fill_(clip.cond_stage_model, torch.Generator().manual_seed(seed))
    return clip


def tiny_model(family: str):
    """The tiny diffusion model of `family`, its text widths fitted to the tiny text encoders."""
    fam = SD15_TINY if family == "sd15" else dataclasses.replace(
        dit.FAMILIES[family], name=f"{family}_te", config={**dit.FAMILIES[family].config, **FAMILY_FOR_CLIPS[family]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dit.FAMILIES, fam.name, fam)
        return dit.load(fam.name)


def tiny_host(family: str):
    """(MODEL, CLIP, CONDITIONING, LATENT) of the tiny `family`, made under inference mode by the
    host's nodes as in a prompt; once per process (training never changes the model's values)."""
    import nodes

    if family not in _HOSTS:
        clip = {"sd15": sd1_clip, "sdxl": sdxl_clip, "flux": flux_clip}[family]()
        model = tiny_model(family)
        channels = model.model.latent_format.latent_channels
        with torch.inference_mode():
            cond = nodes.CLIPTextEncode().encode(clip, CAPTION)[0]
            latent = {"samples": torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(0))}
        _HOSTS[family] = model, clip, cond, latent
    return _HOSTS[family]


def forget_runs() -> None:
    """Drop the shared models and runs and unload them (before the host's modules go away)."""
    from host.helpers import unload_all

    import gc

    _RUNS.clear()
    _HOSTS.clear()
    unload_all()
    gc.collect()  # patchers freed while the host is still importable


def run(family: str = "sd15", **kw) -> dict:
    """The node's outputs by name (model, lycoris, loss, loss_plot, clip, ...)."""
    model, clip, cond, latent = tiny_host(family)
    args = dict(model=model, latents=latent, conditioning=cond, algorithm="lora", preset="custom", rank=4,
                alpha=4.0, conv_rank=4, conv_alpha=4.0, steps=STEPS, batch_size=1, learning_rate=1e-2,
                optimizer="AdamW", lr_schedule="constant", warmup_steps=0, seed=0,
                gradient_checkpointing=False, training_dtype="auto",
                include_regex=LATE_BLOCK if family == "sd15" else "", clip=clip, captions=CAPTION,
                train_text_encoder=True, text_encoder_lr=1e-2)
    if family != "sd15":
        args.update(preset="attn-mlp", conv_rank=0)
    args.update(kw)
    train = pack_module("nodes.train")
    with torch.inference_mode():
        outputs = train.LycorisTrain().run(**args)
    return dict(zip(train.LycorisTrain.RETURN_NAMES, outputs))


def trained(key: str, family: str = "sd15", **kw) -> dict:
    """`run(family, **kw)` made once per process under the name `key` (tests share runs)."""
    if key not in _RUNS:
        _RUNS[key] = run(family, **kw)
    return _RUNS[key]


def te_modules(lycoris) -> dict:
    return {n: a for n, a in lycoris.items() if n.startswith("lora_te")}


def up(adapter) -> torch.Tensor:
    """The LoRA up factor as saved (the scalar baked in where there is one)."""
    return next(t for k, t in adapter.export().items() if k.endswith("lora_up.weight"))


def encode(clip, text=CAPTION):
    import nodes

    with torch.inference_mode():
        cond = nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond[0][0].float().clone(), cond[0][1]["pooled_output"].float().clone()
