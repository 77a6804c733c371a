"""Tiny random-weight diffusion models built from the host's own model classes, loaded by its own loader.

Each family is the host's diffusion-model class with small widths and one or two blocks of each
kind, filled with seeded weights; its state dict (the host's native layout) goes through
`comfy.sd.load_diffusion_model_state_dict`, so the model class, key maps and dtype handling are the
host's, as for a downloaded file. The host's detector hard-codes full-size widths for some
families (Flux: 24 heads of 128), so while loading a tiny model the settings it was built with are
laid over what the detector found; the family (model-config class) is still the detector's choice. SDXL's
UNet is matched by exact full-size settings, so it is built through the host's `SDXL` config class
directly. A family the host lacks is skipped, naming the class.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from dataclasses import dataclass

import pytest
import torch

from .checkpoint import _fill_

WAN_DIM = 128  # the host's Wan detector sets num_heads = dim // 128


@dataclass(frozen=True)
class Family:
    """One model family: the host class to build and the settings that make it tiny."""

    name: str
    module: str  # host module holding the class
    cls: str
    config: dict  # constructor keywords; those the host's class does not take are dropped
    detects_as: str  # the host's model-config class name it must load as (prefix)
    requires: tuple = ()  # config keys this host's class must take, else the family is skipped
    params: str | None = None  # dataclass the class reads its keywords into, if any
    config_class: str | None = None  # host config class used as is, where matching needs full sizes

    def host_class(self):
        """The host's model class, or skip naming it when this host lacks it."""
        try:
            return getattr(importlib.import_module(self.module), self.cls)
        except (ImportError, AttributeError):
            pytest.skip(f"this ComfyUI has no {self.module}.{self.cls} ({self.name})")

    def host_config(self) -> dict:
        """The config with the keys this host's class does not know dropped (older hosts)."""
        cls = self.host_class()
        if self.params is not None:
            known = {f.name for f in dataclasses.fields(getattr(importlib.import_module(self.module), self.params))}
        else:
            known = set(inspect.signature(cls.__init__).parameters)
        known |= {"image_model"}
        missing = [k for k in self.requires if k not in known]
        if missing:
            pytest.skip(f"this ComfyUI's {self.cls} takes no {', '.join(missing)} ({self.name})")
        return {k: v for k, v in self.config.items() if k in known}


def _flux_config(hidden: int, heads: int, axes: list, **more) -> dict:
    return {"in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
            "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": axes, "theta": 10000, "patch_size": 2,
            "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [], **more}


FAMILIES = {f.name: f for f in (
    Family("flux", "comfy.ldm.flux.model", "Flux", {"image_model": "flux", **_flux_config(128, 2, [16, 24, 24])},
           "Flux", params="FluxParams"),
    Family("flux2", "comfy.ldm.flux.model", "Flux",
           {"image_model": "flux2", **_flux_config(128, 2, [16, 16, 16, 16], in_channels=32, out_channels=32,
                                                    vec_in_dim=None, patch_size=1, qkv_bias=False,
                                                    guidance_embed=True, global_modulation=True,
                                                    mlp_silu_act=True, ops_bias=False, txt_ids_dims=[3],
                                                    mlp_ratio=3.0, theta=2000, default_ref_method="index")},
           "Flux2", params="FluxParams", requires=("global_modulation",)),
    Family("chroma", "comfy.ldm.chroma.model", "Chroma",
           {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64,
            "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
            "out_dim": 128, "hidden_dim": 64, "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": None},
           "Chroma", params="ChromaParams"),
    Family("sd3", "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper",
           {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 64,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
            "pos_embed_max_size": 8, "num_patches": 64, "qk_norm": "rms", "input_size": None,
            "x_block_self_attn_layers": [0]},
           "SD3"),
    Family("hunyuan_video", "comfy.ldm.hunyuan_video.model", "HunyuanVideo",
           {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 64, "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2],
            "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
            "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False},
           "HunyuanVideo", params="HunyuanVideoParams"),
    Family("qwen_image", "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel",
           {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
            "num_layers": 2, "attention_head_dim": 64, "num_attention_heads": 2,
            "joint_attention_dim": 64, "axes_dims_rope": (16, 24, 24)},
           "QwenImage"),
    Family("lumina2", "comfy.ldm.lumina.model", "NextDiT",
           {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 128, "n_layers": 2,
            "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16,
            "ffn_dim_multiplier": 4.0, "qk_norm": True, "cap_feat_dim": 64, "axes_dims": [16, 24, 24],
            "axes_lens": [64, 64, 64], "rope_theta": 10000.0},
           "Lumina2"),
    Family("z_image", "comfy.ldm.lumina.model", "NextDiT",
           {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "n_layers": 2,
            "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "multiple_of": 1,
            "ffn_dim_multiplier": 8.0 / 3.0, "qk_norm": True, "cap_feat_dim": 64, "axes_dims": [16, 24, 24],
            "axes_lens": [64, 64, 64], "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0},
           "Lumina2", requires=("z_image_modulation",)),
    Family("sdxl", "comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel",
           {"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2],
            "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
            "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "num_head_channels": 16,
            "context_dim": 64, "use_linear_in_transformer": True, "use_spatial_transformer": True,
            "num_classes": "sequential", "adm_in_channels": 2816, "legacy": False, "image_size": 32,
            "use_checkpoint": False, "use_temporal_attention": False, "use_temporal_resblock": False},
           "SDXL", config_class="SDXL"),
    Family("hidream", "comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel",
           {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
            "num_single_layers": 1, "attention_head_dim": 64, "num_attention_heads": 2,
            "caption_channels": [64, 64], "text_emb_dim": 64, "num_routed_experts": 2,
            "num_activated_experts": 1, "axes_dims_rope": [32, 16, 16], "max_resolution": [64, 64],
            "llama_layers": [0, 1]},
           "HiDream"),
    Family("wan21", "comfy.ldm.wan.model", "WanModel",
           {"model_type": "t2v", "dim": WAN_DIM, "ffn_dim": 256, "num_heads": 1, "num_layers": 2,
            "in_dim": 16, "out_dim": 16},
           "WAN21"),
)}
FAMILY_NAMES = tuple(FAMILIES)


def _operations():
    import comfy.ops

    return comfy.ops.manual_cast


def state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny `family` model's weights in the host's layout, seeded."""
    fam = FAMILIES[family]
    cls = fam.host_class()
    config = fam.host_config()
    model = cls(**config, operations=_operations())
    twin = dict(cls(**config, operations=_operations()).named_buffers())  # alive beside the first
    generator = torch.Generator().manual_seed(seed)
    _fill_(model, generator)
    with torch.no_grad():
        # buffers some classes leave as allocated (SD3's pos_embed): their bytes are whatever the
        # memory held, so they differ between two constructions (or are not finite)
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and (not bool(torch.isfinite(buffer).all())
                                               or not torch.equal(buffer, twin[name])):
                buffer.copy_(0.02 * torch.randn(buffer.shape, generator=generator))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _detection_overlaid(values: dict, config_class: str | None):
    """The host's detector with `values` laid over what it detects (sizes it hard-codes), and
    `config_class` chosen for the result when set."""
    import comfy.model_detection as md
    import comfy.supported_models

    detect, choose = md.detect_unet_config, md.model_config_from_unet_config

    def overlaid(*args, **kwargs):
        config = detect(*args, **kwargs)
        if config is not None:
            config.update(values)
        return config

    def chosen(unet_config, state_dict=None):
        return getattr(comfy.supported_models, config_class)(unet_config)

    md.detect_unet_config = overlaid
    if config_class is not None:
        md.model_config_from_unet_config = chosen
    try:
        yield
    finally:
        md.detect_unet_config, md.model_config_from_unet_config = detect, choose


def load(family: str, seed: int = 0, dtype: torch.dtype | None = None):
    """A ModelPatcher for a tiny `family` model, as the host's UNET loader gives it (with its
    `weight_dtype` option set to `dtype` when given)."""
    import comfy.sd

    fam = FAMILIES[family]
    sd = state_dict(family, seed)
    options = {} if dtype is None else {"dtype": dtype}
    with torch.inference_mode(), _detection_overlaid(fam.host_config(), fam.config_class):
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    if model is None:
        raise RuntimeError(f"the host did not detect the tiny {family} model")
    found = type(model.model.model_config).__name__
    if not found.startswith(fam.detects_as):
        raise RuntimeError(f"the tiny {family} model was detected as {found}, not {fam.detects_as}")
    return model


def wan_inputs(seed: int = 0):
    """(x, timestep, context) for a tiny Wan: one latent frame of 8x8, 6 text tokens."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 1, 8, 8, generator=g), torch.tensor([0.5]),
            torch.randn(1, 6, 4096, generator=g))
