"""Adapter files as diffusers / PEFT users train them, written by those libraries themselves.

For each tiny host family (tests/host/dit.py) a diffusers model of the same widths is built with
random weights, PEFT adds a LoRA on every Linear (and Conv2d for UNets), the LoRA weights are made
non-zero, and the family's diffusers pipeline saves them (`save_lora_weights`): the file carries
diffusers' own key names (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`), several of
which target slices of one fused host weight. PEFT also gives the oracle for a module's change
(`get_delta_weight`).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch


@dataclass(frozen=True)
class DiffusersFamily:
    """The diffusers model matching a tiny host family, and the pipeline that saves its LoRAs."""

    model: str
    config: dict
    pipeline: str
    layers_arg: str = "transformer_lora_layers"
    # modules whose widths differ between the two implementations at tiny sizes only (left out)
    tiny_only_mismatch: tuple = ()
    # settings read off the host model's weights, where hosts size a layer differently
    from_host: Callable[[dict], dict] | None = None


_ROPE = (16, 24, 24)
DIFFUSERS = {
    "flux": DiffusersFamily("FluxTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 64,
        "num_attention_heads": 2, "joint_attention_dim": 64, "pooled_projection_dim": 32,
        "guidance_embeds": True, "axes_dims_rope": _ROPE}, "FluxPipeline"),
    "flux2": DiffusersFamily("Flux2Transformer2DModel", {
        "patch_size": 1, "in_channels": 32, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32,
        "num_attention_heads": 4, "joint_attention_dim": 64, "mlp_ratio": 3.0, "axes_dims_rope": (8, 8, 8, 8),
        "guidance_embeds": True}, "Flux2Pipeline"),
    "chroma": DiffusersFamily("ChromaTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 64,
        "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": _ROPE,
        "approximator_num_channels": 64, "approximator_hidden_dim": 64, "approximator_layers": 1}, "ChromaPipeline"),
    "sd3": DiffusersFamily("SD3Transformer2DModel", {
        "sample_size": 8, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
        "attention_head_dim": 64, "num_attention_heads": 2, "joint_attention_dim": 64,
        "caption_projection_dim": 128, "pooled_projection_dim": 64, "pos_embed_max_size": 8,
        "dual_attention_layers": (0,), "qk_norm": "rms_norm"}, "StableDiffusion3Pipeline"),
    "hunyuan_video": DiffusersFamily("HunyuanVideoTransformer3DModel", {
        "in_channels": 16, "out_channels": 16, "num_attention_heads": 1, "attention_head_dim": 128,
        "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
        "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 64,
        "pooled_projection_dim": 768, "rope_axes_dim": (16, 56, 56)}, "HunyuanVideoPipeline"),
    "qwen_image": DiffusersFamily("QwenImageTransformer2DModel", {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 64,
        "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": _ROPE}, "QwenImagePipeline"),
    "lumina2": DiffusersFamily("Lumina2Transformer2DModel", {
        "sample_size": 16, "patch_size": 2, "in_channels": 16, "hidden_size": 128, "num_layers": 2,
        "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16, "axes_dim_rope": _ROPE, "axes_lens": (64, 64, 64), "cap_feat_dim": 64},
        # hosts round the MLP width differently at tiny sizes: match the host model's
        "Lumina2Pipeline", from_host=lambda sd: {"ffn_dim_multiplier": sd["layers.0.feed_forward.w1.weight"].shape[0]
                                                 / (4 * sd["layers.0.feed_forward.w1.weight"].shape[1])}),
    "z_image": DiffusersFamily("ZImageTransformer2DModel", {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 256, "n_layers": 2,
        "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "qk_norm": True, "cap_feat_dim": 64,
        "rope_theta": 256.0, "axes_dims": list(_ROPE), "axes_lens": [64, 64, 64]}, "ZImagePipeline",
        # ComfyUI sizes the timestep MLP min(dim, 1024) wide, diffusers 1024: equal from dim 1024 on
        tiny_only_mismatch=("t_embedder.",)),
    "hidream": DiffusersFamily("HiDreamImageTransformer2DModel", {
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1, "num_single_layers": 1,
        "attention_head_dim": 64, "num_attention_heads": 2, "caption_channels": [64, 64], "text_emb_dim": 64,
        "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": (32, 16, 16),
        "max_resolution": (64, 64), "llama_layers": [0, 1]}, "HiDreamImagePipeline"),
    "wan21": DiffusersFamily("WanTransformer3DModel", {
        "patch_size": (1, 2, 2), "num_attention_heads": 1, "attention_head_dim": 128, "in_channels": 16,
        "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 256, "num_layers": 2,
        "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads"}, "WanPipeline"),
    "sdxl": DiffusersFamily("UNet2DConditionModel", {
        "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 1, 1), "cross_attention_dim": 64, "attention_head_dim": (2, 4, 8),
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32},
        "StableDiffusionXLPipeline", "unet_lora_layers"),
}


def diffusers_model(family: str, seed: int = 0, host_weights: dict | None = None) -> torch.nn.Module:
    """The diffusers twin of a tiny host family, random weights (skips when diffusers lacks it)."""
    diffusers = pytest.importorskip("diffusers")
    spec = DIFFUSERS[family]
    cls = getattr(diffusers, spec.model, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {spec.model}")
    known = inspect.signature(cls.__init__).parameters
    config = dict(spec.config)
    if spec.from_host is not None and host_weights is not None:
        config.update(spec.from_host(host_weights))
    torch.manual_seed(seed)
    return cls(**{k: v for k, v in config.items() if k in known}).eval()


def _lora_targets(model: torch.nn.Module, left_out: tuple) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [name for name, module in model.named_modules()
            if name and isinstance(module, kinds) and not name.startswith(left_out)]


def peft_lora_file(family: str, path: str, host_model=None, rank: int = 4, alpha: float = 4.0, seed: int = 0,
                   dora: bool = False, with_config: bool = False):
    """Write a LoRA file for `family` with PEFT + diffusers, fitted to `host_model` (a ModelPatcher)
    where hosts differ; `with_config` stores PEFT's LoraConfig in the file's metadata as diffusers'
    training scripts do (the only place a diffusers file keeps lora_alpha). Returns the PEFT model."""
    peft = pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    host_weights = host_model.model.diffusion_model.state_dict() if host_model is not None else None
    model = diffusers_model(family, seed, host_weights)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=_lora_targets(model, DIFFUSERS[family].tiny_only_mismatch),
                             init_lora_weights=False, use_dora=dora)
    model.add_adapter(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    layers = peft.get_peft_model_state_dict(model)
    spec = DIFFUSERS[family]
    pipeline = getattr(diffusers, spec.pipeline)
    folder, name = os.path.split(path)
    extra = {}
    if with_config:
        extra[spec.layers_arg.replace("_layers", "_adapter_metadata")] = model.peft_config["default"].to_dict()
    pipeline.save_lora_weights(folder, **{spec.layers_arg: layers}, weight_name=name, safe_serialization=True,
                               **extra)
    return model


def peft_delta(model: torch.nn.Module, module_name: str) -> torch.Tensor:
    """PEFT's own weight change of one wrapped module at scale 1 (before any fusing)."""
    layer = model.get_submodule(module_name)
    return layer.get_delta_weight(layer.active_adapters[0]).detach().float()
