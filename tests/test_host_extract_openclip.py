"""`extract` on SDXL checkpoints whose second text encoder is OpenCLIP-G in the original layout
(`conditioner.embedders.1.model.transformer.resblocks.N.attn.in_proj_weight`, `mlp.c_fc`, ...):
the extracted file patches base + delta through our loader and core ComfyUI's.

The checkpoints are the host's own: a tiny SDXL CLIP-L/G pair (tests/host/text_encoders.py) written
in checkpoint layout by the host's `SDXL.process_clip_state_dict_for_saving`. Oracles: the known
low-rank deltas, carried to the host's weights by the host's own `process_clip_state_dict` (which
splits in_proj into q/k/v), core's key map `model_lora_keys_clip`, and core's loader.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from host import text_encoders
from host.te_checks import assert_merges_like

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

RANK = 2
OPENCLIP = "conditioner.embedders.1.model.transformer.resblocks."
CLIP_L = "conditioner.embedders.0.transformer.text_model.encoder.layers."
# checkpoint keys changed by a rank-2 delta; in_proj by one per third (q, k, v), so rank 6 in all
CHANGED = (f"{OPENCLIP}0.attn.in_proj_weight", f"{OPENCLIP}1.attn.in_proj_weight",
           f"{OPENCLIP}1.attn.out_proj.weight", f"{OPENCLIP}2.mlp.c_fc.weight",
           f"{OPENCLIP}2.mlp.c_proj.weight", f"{CLIP_L}0.self_attn.q_proj.weight")


def _low_rank(rows: int, cols: int, g: torch.Generator, scale: float) -> torch.Tensor:
    d = torch.randn(rows, RANK, generator=g) @ torch.randn(RANK, cols, generator=g)
    return d * (scale / d.norm())


def _sdxl_model_config():
    import comfy.supported_models

    return comfy.supported_models.SDXL.__new__(comfy.supported_models.SDXL)  # its unet config is not needed


@pytest.fixture(scope="module")
def setup(lycoris_pack, loras_dir, tmp_path_factory):
    """(CLIP, extracted file, {host key: delta}): the tiny SDXL CLIP, the file extracted from its
    checkpoint pair, and the deltas the host's own conversion makes of the checkpoint deltas."""
    from lycoris_core.__main__ import main

    clip = text_encoders.sdxl_clip(seed=5)
    config = _sdxl_model_config()
    host_sd = {k: v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()}
    base = {k: v.contiguous() for k, v in config.process_clip_state_dict_for_saving(dict(host_sd)).items()}
    assert all(k in base for k in CHANGED), "the host writes another checkpoint layout"
    g = torch.Generator().manual_seed(12)
    tuned, deltas = dict(base), {}
    for key in CHANGED:
        w = base[key]
        blocks = 3 if key.endswith("in_proj_weight") else 1
        rows = w.shape[0] // blocks
        d = torch.cat([_low_rank(rows, w.shape[1], g, 0.2 * float(w.norm()) / blocks) for _ in range(blocks)])
        tuned[key] = w + d
        deltas[key] = d
    folder = tmp_path_factory.mktemp("extract_openclip")
    save_file(base, str(folder / "base.safetensors"))
    save_file(tuned, str(folder / "tuned.safetensors"))
    out = loras_dir / "extracted_openclip.safetensors"
    assert main(["extract", "--base", str(folder / "base.safetensors"), "--tuned", str(folder / "tuned.safetensors"),
                 "--out", str(out), "--rank", str(RANK), "--dtype", "fp32", "--quiet", "--device", "cpu"]) == 0
    host_deltas = config.process_clip_state_dict(dict(deltas))
    assert set(host_deltas) <= set(host_sd)
    return clip, out, host_deltas


def test_extracted_names_are_core_keys_for_the_changed_host_weights(setup):
    import comfy.lora

    from lycoris_core import load_file

    clip, path, host_deltas = setup
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    names = list(load_file(str(path)))
    assert len(names) == 3 * 2 + 3 + 1  # q, k, v of two layers, out_proj, c_fc, c_proj, CLIP-L q_proj
    assert {key_map.get(n) for n in names} == set(host_deltas)
    assert key_map["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"] == (
        "clip_g.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight")
    assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj" in names


def test_extracted_openclip_file_patches_base_plus_delta_in_our_loader_and_core(setup):
    clip, path, host_deltas = setup
    assert_merges_like(clip, str(path), lambda strength: {k: strength * d for k, d in host_deltas.items()},
                       strengths=(1.0,), core_patches_all=True)
