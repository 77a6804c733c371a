"""A small SD1.5 LoRA/LoCon file with kohya names over a few blocks, for the block-weight UI tests."""
from __future__ import annotations

import os

import torch

# kohya module name -> (weight shape of the SD1.5 layer it patches, block id)
SD15_MODULES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((768, 768), "BASE"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((320, 320), "IN01"),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ((320, 320, 3, 3), "IN03"),
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": ((640, 768), "IN05"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": ((1280, 1280), "M00"),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_out_0": ((1280, 1280), "OUT05"),
    "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_2": ((320, 1280), "OUT09"),
}
BLOCKS = ["BASE", "IN01", "IN03", "IN05", "M00", "OUT05", "OUT09"]
FILE_NAME = "sd15_blocks_test.safetensors"


def write_sd15_file(folder: str | os.PathLike, name: str = FILE_NAME, seed: int = 0) -> str:
    """Write the file (LoRA, LoCon on the conv) into `folder`; returns its path."""
    from lycoris_core import REGISTRY, LayerSpec, save_file

    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for module, (shape, _) in SD15_MODULES.items():
        adapter = REGISTRY["lora"].create(LayerSpec.from_weight(torch.zeros(shape)), rank=4, alpha=2.0)
        with torch.no_grad():
            for pname, p in adapter.named_parameters():
                if p.ndim >= 2:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                p.requires_grad_(False)
        adapters[module] = adapter
    path = os.path.join(os.fspath(folder), name)
    if os.path.exists(path):
        os.remove(path)
    return save_file(adapters, path, {"ss_network_module": "lycoris.kohya"})
