"""Tiny text encoders built from the host's own classes, as CLIP objects the loaders take.

SDXL's pair (CLIP-L beside CLIP-G) and Flux's (CLIP-L beside T5-XXL) at small widths: the host's `SDClipModel` takes its transformer
config as a dict, so the same classes and state-dict layout (`clip_l.transformer.text_model...`,
`clip_g.transformer...`) as a real SDXL checkpoint, with three layers of width 64 and 96. Their twins in
`transformers` (the classes diffusers pipelines train) have the same widths, so PEFT files written
on the twins fit.
"""
from __future__ import annotations

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
