"""Key families of other trainers (peft, diffusers) read as the same LyCORIS modules."""
import json
import math
import warnings

import pytest
import torch

from lycoris_core import load_file
from lycoris_core.io import write_safetensors
from lycoris_core.keys import group_keys, split_key

OUT, IN, RANK = 12, 10, 4


@pytest.mark.parametrize("key, module, suffix", [
    ("lora_unet_mid_block_attentions_0_proj_in.lora_up.weight",
     "lora_unet_mid_block_attentions_0_proj_in", "lora_up.weight"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.hada_w1_a",
     "lora_te1_text_model_encoder_layers_0_mlp_fc1", "hada_w1_a"),
    ("base_model.model.down.0.attn.to_q.lora_A.weight", "base_model.model.down.0.attn.to_q",
     "lora_down.weight"),
    ("transformer.blocks.0.attn.to_k.lora_B.weight", "transformer.blocks.0.attn.to_k",
     "lora_up.weight"),
    ("unet.mid.to_v.lora_A.default.weight", "unet.mid.to_v", "lora_down.weight"),
    ("unet.mid.to_v.lora_B.default.weight", "unet.mid.to_v", "lora_up.weight"),
    ("blocks.3.attn.qkv.lora_A", "blocks.3.attn.qkv", "lora_down.weight"),  # Mochi
    ("blocks.3.attn.qkv.lora_B", "blocks.3.attn.qkv", "lora_up.weight"),
    ("unet.up_blocks.1.attentions.0.proj_out.lora.down.weight",
     "unet.up_blocks.1.attentions.0.proj_out", "lora_down.weight"),
    ("unet.up_blocks.1.attentions.0.proj_out.lora.up.weight",
     "unet.up_blocks.1.attentions.0.proj_out", "lora_up.weight"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q", "lora_up.weight"),
    ("unet.x.attn1.processor.to_out_lora.down.weight", "unet.x.attn1.processor.to_out",
     "lora_down.weight"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "lora_up.weight"),
    ("transformer.blocks.0.attn.to_k.lora_magnitude_vector", "transformer.blocks.0.attn.to_k",
     "dora_scale"),
    ("transformer.blocks.0.attn.to_k.lora_magnitude_vector.weight", "transformer.blocks.0.attn.to_k",
     "dora_scale"),
    ("transformer.blocks.0.attn.to_k.alpha", "transformer.blocks.0.attn.to_k", "alpha"),
    ("double_blocks.0.processor.qkv_lora1.down.weight", "double_blocks.0.processor.qkv_lora1",
     "lora_down.weight"),  # XLabs Flux
    # a single block's `proj_lora` reads as the glued old-diffusers spelling of module `proj`
    ("single_blocks.3.processor.proj_lora.up.weight", "single_blocks.3.processor.proj",
     "lora_up.weight"),
    ("lora_unet_x.bias_indices", "lora_unet_x", "bias_indices"),
    ("lora_unet_x.something_else", "lora_unet_x", None),
    ("bundle_emb.mychar.string_to_param.*", "bundle_emb", None),
])
def test_split_key(key, module, suffix):
    assert split_key(key) == (module, suffix)


def test_glued_lora_suffix_beats_generic_weight_suffix():
    """`…to_q_lora.up.weight` must not be read as (IA)^3's bare `weight` of a module `…to_q_lora.up`."""
    modules, unknown, clashes = group_keys(["m.processor.to_q_lora.up.weight",
                                            "m.processor.to_q_lora.down.weight"])
    assert modules == {"m.processor.to_q": {"lora_up.weight": "m.processor.to_q_lora.up.weight",
                                            "lora_down.weight": "m.processor.to_q_lora.down.weight"}}
    assert unknown == [] and clashes == []


def _factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(OUT, RANK, generator=g), torch.randn(RANK, IN, generator=g)


def _kohya(name: str, alpha: float | None, dora: torch.Tensor | None = None) -> torch.Tensor:
    """Merged weight of the same factors stored under kohya/LyCORIS names."""
    up, down = _factors()
    sd = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    if dora is not None:
        sd[f"{name}.dora_scale"] = dora.reshape(OUT, 1)
    return load_file(sd, strict=True)[name].merge(WEIGHT)


WEIGHT = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("down_key, up_key", [
    ("lora_A.weight", "lora_B.weight"),
    ("lora_A.default.weight", "lora_B.default.weight"),
    ("lora_A", "lora_B"),
    ("lora.down.weight", "lora.up.weight"),
    ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
])
def test_dotted_families_merge_like_kohya(down_key, up_key):
    name = "transformer.transformer_blocks.0.attn.to_q"
    up, down = _factors()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        af = load_file({f"{name}.{down_key}": down, f"{name}.{up_key}": up})
    assert list(af) == [name]
    assert torch.equal(af[name].merge(WEIGHT), _kohya("lora_unet_x", float(RANK)))  # scale 1
    assert [str(w.message) for w in record] and "without alpha" in str(record[0].message)


def test_old_diffusers_processor_keys():
    name = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    up, down = _factors()
    af = load_file({f"{name}.to_k_lora.up.weight": up, f"{name}.to_k_lora.down.weight": down,
                    f"{name}.to_k.alpha": torch.tensor(2.0)}, strict=True)
    assert list(af) == [f"{name}.to_k"]
    assert torch.equal(af[f"{name}.to_k"].merge(WEIGHT), _kohya("lora_unet_x", 2.0))


def test_peft_magnitude_vector_is_dora_scale_on_output_axis():
    name = "transformer.single_transformer_blocks.0.attn.to_v"
    up, down = _factors()
    magnitude = WEIGHT.norm(dim=1) * 1.2
    af = load_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up,
                    f"{name}.lora_magnitude_vector": magnitude},
                   metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 2})})
    adapter = af[name]
    assert adapter.dora_axis == "out" and adapter.alpha == 2.0
    assert torch.allclose(adapter.merge(WEIGHT), _kohya("lora_unet_x", 2.0, magnitude), atol=1e-6)
    merged = adapter.merge(WEIGHT)
    assert torch.allclose(merged.norm(dim=1), magnitude, rtol=1e-5)


def test_lora_adapter_metadata_gives_alpha_without_warning(tmp_path):
    name = "transformer.transformer_blocks.0.attn.to_q"
    up, down = _factors()
    meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 8, "target_modules": ["to_q"]})}
    path = write_safetensors({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up},
                             tmp_path / "peft.safetensors", meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        af = load_file(path)
    assert af[name].alpha == 8.0 and af[name].scale == 2.0
    assert torch.equal(af[name].merge(WEIGHT), _kohya("lora_unet_x", 8.0))


def test_lora_adapter_metadata_alpha_pattern_and_rslora():
    a, b = "transformer.blocks.0.to_q", "transformer.blocks.0.to_k"
    up, down = _factors()
    sd = {f"{n}.{s}": t for n in (a, b) for s, t in (("lora_A.weight", down), ("lora_B.weight", up))}
    cfg = {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"blocks.0.to_k": 2}, "use_rslora": True}
    af = load_file(sd, metadata={"lora_adapter_metadata": json.dumps(cfg)})
    assert af[a].scale == pytest.approx(8 / math.sqrt(RANK))  # peft rs-LoRA: alpha / sqrt(r)
    assert af[b].scale == pytest.approx(2 / math.sqrt(RANK))


def test_file_alpha_wins_over_lora_adapter_metadata():
    name = "unet.x.to_q"
    up, down = _factors()
    af = load_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up,
                    f"{name}.alpha": torch.tensor(1.0)},
                   metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    assert af[name].alpha == 1.0


def test_broken_lora_adapter_metadata_is_ignored():
    name = "unet.x.to_q"
    up, down = _factors()
    with pytest.warns(UserWarning, match="without alpha"):
        af = load_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up},
                       metadata={"lora_adapter_metadata": "{not json"})
    assert af[name].scale == 1.0
