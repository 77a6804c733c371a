"""Tiny text encoders built from the host's own classes, as CLIP objects the loaders take.

SDXL's pair (CLIP-L beside CLIP-G) and Flux's (CLIP-L beside T5-XXL) at small widths: the host's `SDClipModel` takes its transformer
config as a dict, so the same classes and state-dict layout (`clip_l.transformer.text_model...`,
`clip_g.transformer...`) as a real SDXL checkpoint, with three layers of width 64 and 96. Their twins in
`transformers` (the classes diffusers pipelines train) have the same widths, so PEFT files written
on the twins fit. The LLM encoders of the newer families (Qwen2.5-VL for Qwen-Image, Gemma 2 for
Lumina 2, Qwen3 for Z-Image, Llama for HunyuanVideo and HiDream) likewise, inside each family's own
text-encoder model class.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

from .checkpoint import _fill_

CLIP_CONFIG = {"attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 49407,
               "hidden_act": "quick_gelu", "hidden_size": 64, "initializer_factor": 1.0,
               "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
               "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2,
               "num_hidden_layers": 3, "pad_token_id": 1, "projection_dim": 64, "vocab_size": 49408}
T5_CONFIG = {"d_ff": 128, "d_kv": 32, "d_model": 64, "decoder_start_token_id": 0, "dropout_rate": 0.1,
             "eos_token_id": 1, "dense_act_fn": "gelu_pytorch_tanh", "initializer_factor": 1.0,
             "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
             "num_decoder_layers": 2, "num_heads": 2, "num_layers": 2, "output_past": True, "pad_token_id": 0,
             "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128}
CLIP_G_CONFIG = {**CLIP_CONFIG, "hidden_act": "gelu", "hidden_size": 96, "intermediate_size": 192,
                 "num_attention_heads": 2, "projection_dim": 96}


def _tiny_sdxl_clip_class():
    import comfy.sd1_clip
    import comfy.sdxl_clip

    class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
        """The host's SDXL text-encoder pair with tiny transformer configs."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, model_options=model_options,
                                                     textmodel_json_config=dict(CLIP_CONFIG))
            self.clip_g = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, return_projected_pooled=True,
                                                     special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                                     model_options={**model_options, "model_name": "clip_g"},
                                                     textmodel_json_config=dict(CLIP_G_CONFIG))
            self.dtypes = {dtype}

    return TinySDXLClip


def _tiny_flux_clip_class():
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5

    class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
        """The host's Flux text-encoder pair (CLIP-L, T5-XXL) with tiny transformer configs."""

        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                     model_options=model_options,
                                                     textmodel_json_config=dict(CLIP_CONFIG))
            self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, layer="last", dtype=dtype,
                                                    textmodel_json_config=dict(T5_CONFIG),
                                                    special_tokens={"end": 1, "pad": 0},
                                                    model_class=comfy.text_encoders.t5.T5,
                                                    model_options={**model_options, "model_name": "t5xxl"})
            self.dtypes = {dtype}

    return TinyFluxClip


def _clip(tokenizer, clip_class, seed: int):
    import comfy.sd
    import comfy.supported_models_base

    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(tokenizer, clip_class),
                             model_options={"dtype": torch.float32})
    _fill_(clip.cond_stage_model, torch.Generator().manual_seed(seed))
    return clip


def sdxl_clip(seed: int = 0):
    """A host CLIP object holding a tiny SDXL CLIP-L + CLIP-G, seeded random weights, fp32."""
    import comfy.sdxl_clip

    return _clip(comfy.sdxl_clip.SDXLTokenizer, _tiny_sdxl_clip_class(), seed)


def flux_clip(seed: int = 0):
    """A host CLIP object holding a tiny Flux CLIP-L + T5-XXL, seeded random weights, fp32."""
    import comfy.text_encoders.flux

    return _clip(comfy.text_encoders.flux.FluxTokenizer, _tiny_flux_clip_class(), seed)


def sd3_clip(seed: int = 0):
    """A host CLIP object holding SD3's own CLIP-L + CLIP-G + T5-XXL model, each shrunk through the
    host's `<name>_model_config` options, seeded random weights, fp32."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip

    options = {"dtype": torch.float32, "clip_l_model_config": dict(CLIP_CONFIG),
               "clip_g_model_config": dict(CLIP_G_CONFIG), "t5xxl_model_config": dict(T5_CONFIG)}
    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer,
                                                                    comfy.text_encoders.sd3_clip.SD3ClipModel),
                             model_options=options)
    _fill_(clip.cond_stage_model, torch.Generator().manual_seed(seed))
    return clip


def sd3_twins(seed: int = 0):
    """(CLIP-L, CLIP-G with projection, T5 encoder): transformers' classes of the same widths."""
    clip_l, t5 = flux_twins(seed)
    clip_g = sdxl_twins(seed)[1]
    return clip_l, clip_g, t5


def flux_twins(seed: int = 0):
    """(CLIP-L, T5 encoder): transformers' classes of the same widths, random."""
    import transformers

    torch.manual_seed(seed)
    one = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG))
    config = transformers.T5Config(**{k: v for k, v in T5_CONFIG.items() if k != "dense_act_fn"},
                                   feed_forward_proj="gated-gelu")
    return one.eval(), transformers.T5EncoderModel(config).eval()


def sdxl_twins(seed: int = 0):
    """(text_encoder, text_encoder_2): transformers' CLIP classes of the same widths, random."""
    import transformers

    torch.manual_seed(seed)
    one = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG))
    two = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_G_CONFIG))
    return one.eval(), two.eval()


# LLM text encoders: the host's decoder-only classes (comfy.text_encoders.llama) at a tiny size.
# The host reads `<name>_model_config` from model_options over its config; head widths are class
# constants there (128, Gemma 2: 256), so the twins take the same head_dim. Four layers: the host
# reads hidden states from layer -2 (Gemma) or -3 (Llama).
LLM_CONFIG = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}
_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class LlmEncoder:
    """One LLM text encoder: the host's text-encoder model holding it and its transformers twin."""

    name: str  # the host's name for it: state-dict prefix `<name>.transformer.`, model_options key
    used_by: str  # the image models that use it
    module: str  # host module of the text-encoder model class
    cls: str  # that class (an SD1ClipModel holding the encoder)
    twin: str  # the transformers class the family's diffusers pipeline holds
    head_dim: int

    def host_class(self):
        try:
            return getattr(importlib.import_module(self.module), self.cls)
        except (ImportError, AttributeError):
            pytest.skip(f"this ComfyUI has no {self.module}.{self.cls} ({self.used_by})")


LLM_ENCODERS = {e.name: e for e in (
    LlmEncoder("qwen25_7b", "Qwen-Image", "comfy.text_encoders.qwen_image", "QwenImageTEModel",
               "Qwen2_5_VLForConditionalGeneration", 128),
    LlmEncoder("gemma2_2b", "Lumina 2", "comfy.text_encoders.lumina2", "LuminaModel", "Gemma2Model", 256),
    LlmEncoder("qwen3_4b", "Z-Image", "comfy.text_encoders.z_image", "ZImageTEModel", "Qwen3Model", 128),
    LlmEncoder("llama", "HunyuanVideo, HiDream", "comfy.text_encoders.hunyuan_video", "HunyuanVideoClipModel",
               "LlamaModel", 128),
)}


def _tiny_qwen25_vl_class():
    """The host's Qwen2.5-VL text-encoder model with its vision tower shrunk too (the host builds
    it at full width, 32 layers, whatever the config says)."""
    import comfy.sd1_clip
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_image
    import comfy.text_encoders.qwen_vl as qwen_vl

    class TinyQwen25VL(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=32, output_hidden_size=config.hidden_size, intermediate_size=64, num_heads=2,
                num_layers=1, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class TinyQwen25VLModel(qwen_image.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                     model_options={}):
            comfy.sd1_clip.SDClipModel.__init__(
                self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TinyQwen25VL,
                enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
                model_options=model_options)

    return TinyQwen25VLModel


def llm_clip(name: str, seed: int = 0):
    """A host CLIP object holding the family's own text-encoder model with the LLM `name` (and
    HunyuanVideo's CLIP-L) at tiny sizes, seeded random weights, fp32. The tokenizer is SD1's: the
    tests never tokenize, and Gemma's needs a SentencePiece model file."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    encoder = LLM_ENCODERS[name]
    te_class = encoder.host_class()
    options = {"dtype": torch.float32, f"{name}_model_config": {**LLM_CONFIG}, "clip_l_model_config": dict(CLIP_CONFIG)}
    if name == "qwen25_7b":
        options["qwen25_7b_class"] = _tiny_qwen25_vl_class()
    with torch.inference_mode(False):
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, te_class),
                             model_options=options)
    _fill_(clip.cond_stage_model, torch.Generator().manual_seed(seed))
    return clip


def llm_twin(name: str, seed: int = 0) -> torch.nn.Module:
    """The transformers model of the same tiny size that the family's diffusers pipeline holds
    (Qwen-Image: the whole Qwen2.5-VL, vision tower included), random."""
    import transformers

    encoder = LLM_ENCODERS[name]
    text = {**LLM_CONFIG, **_TOKEN_IDS, "head_dim": encoder.head_dim}
    torch.manual_seed(seed)
    if name == "qwen25_7b":
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": LLM_CONFIG["hidden_size"], "fullatt_block_indexes": [0]}, **_TOKEN_IDS)
    else:
        config = getattr(transformers, encoder.twin.replace("Model", "Config"))(**text)
    return getattr(transformers, encoder.twin)(config).eval()


def llm_twin_path(path: str) -> str | None:
    """The host path below `<name>.transformer.model.` of a twin's decoder module, None for others
    (Qwen2.5-VL's vision tower)."""
    for root in ("model.language_model.", "model.", ""):
        if path.startswith(root):
            rest = path[len(root):]
            return rest if rest.startswith("layers.") else None
    return None
