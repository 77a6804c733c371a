"""A random-weight SD1.5 checkpoint in the original single-file layout, built with the host's classes.

The file is deterministic (seeded), fp16, and cached outside the repository
($LYCORIS_TEST_CACHE or ~/.cache/comfyui-lycoris-tests), so it is built once per machine.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch

from .host import cache_root

CHECKPOINT_NAME = "sd15_random_fp16.safetensors"
FORMAT_VERSION = "1"  # bump when the builder changes, so stale caches are rebuilt

# the UNet configuration the host's detector derives from a real SD1.5 checkpoint
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD15_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
            "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
            "dropout": 0.0}


def cache_dir() -> str:
    """Where test models live: $LYCORIS_TEST_CACHE or ~/.cache/comfyui-lycoris-tests."""
    path = cache_root()
    os.makedirs(path, exist_ok=True)
    return path


def _fill_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded init that keeps activations O(1): W ~ N(0, 1/fan_in), small biases, norms near 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            shape = tuple(p.shape)
            if p.ndim >= 2 and "embedding" not in name:
                std = 1.0 / math.sqrt(math.prod(shape[1:]))
                value = torch.randn(shape, generator=generator) * std
            elif p.ndim >= 2:
                value = torch.randn(shape, generator=generator) * 0.02
            elif leaf == "weight":  # norm scales
                value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
            else:
                value = 0.02 * torch.randn(shape, generator=generator)
            p.copy_(value.to(p.dtype))


def build_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The three SD1.5 parts with random weights, keys in the original checkpoint layout (fp16)."""
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops
    import comfy.sd1_clip

    g = torch.Generator().manual_seed(seed)
    dtype = torch.float16
    sd: dict[str, torch.Tensor] = {}
    unet = openaimodel.UNetModel(**SD15_UNET, dtype=dtype, device="cpu",
                                 operations=comfy.ops.disable_weight_init)
    _fill_(unet, g)
    sd.update({f"model.diffusion_model.{k}": v.to(dtype) for k, v in unet.state_dict().items()})
    del unet
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=dtype)
    _fill_(clip, g)
    for k, v in clip.state_dict().items():
        if k.startswith("transformer."):
            sd[f"cond_stage_model.{k}"] = v.to(dtype)
    del clip
    vae = autoencoder.AutoencoderKL(ddconfig=SD15_VAE, embed_dim=4)
    _fill_(vae, g)
    sd.update({f"first_stage_model.{k}": v.to(dtype) for k, v in vae.state_dict().items()})
    return {k: v.contiguous() for k, v in sd.items()}


def ensure_checkpoint() -> str:
    """Path of the cached checkpoint, building it (about 30-60 s, 2 GB) when absent."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(cache_dir(), CHECKPOINT_NAME)
    if os.path.exists(path):
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("lycoris_test_format") == FORMAT_VERSION:
                    return path
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
            pass
    sd = build_state_dict()
    fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"lycoris_test_format": FORMAT_VERSION,
                                     "modelspec.architecture": "stable-diffusion-v1"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
