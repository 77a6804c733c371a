"""Text encoders: adapter files on SDXL's CLIP-L + CLIP-G pair (tests/host/text_encoders.py).

- diffusers/PEFT files (`text_encoder.…`, `text_encoder_2.…`), written by PEFT on transformers'
  CLIP classes of the same widths and saved by diffusers' SDXL pipeline;
- kohya-style files (`lora_te1_…`, `lora_te2_…`), LyCORIS networks written by lycoris-lora.
Oracles: PEFT's `get_delta_weight` and lycoris-lora's `merge_to` per module, and ComfyUI core's
loader on the same file wherever core patches.
"""
from __future__ import annotations

import os

import pytest
import torch

from host import text_encoders
from host.te_checks import assert_bypass_equals_merge, assert_merges_like, host_key, linears
PARTS = {"text_encoder": "clip_l.transformer.", "text_encoder_2": "clip_g.transformer."}  # file part -> host
# kohya-style names: file prefix -> host prefix, per text-encoder set (the twins come in this order)
KOHYA = {
    "sdxl": {"lora_te1": "clip_l.transformer.", "lora_te2": "clip_g.transformer."},
    "flux": {"lora_te1": "clip_l.transformer.", "lora_te3": "t5xxl.transformer."},  # kohya sd-scripts
    "flux-onetrainer": {"lora_te1": "clip_l.transformer.", "lora_te2": "t5xxl.transformer."},
    "sd3": {"lora_te1": "clip_l.transformer.", "lora_te2": "clip_g.transformer.", "lora_te3": "t5xxl.transformer."},
}


# encoder set -> (host CLIP object, transformers twins in file order)
BUILDERS = {"sdxl": (text_encoders.sdxl_clip, text_encoders.sdxl_twins),
            "flux": (text_encoders.flux_clip, text_encoders.flux_twins),
            "sd3": (text_encoders.sd3_clip, text_encoders.sd3_twins)}


pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


_CLIPS: dict = {}


def encoders(kind: str):
    """(CLIP object, transformers twins) of a tiny text-encoder set, built once per process."""
    family = kind.split("-")[0]
    if family not in _CLIPS:
        _CLIPS[family] = BUILDERS[family][0]()
    twins = BUILDERS[family][1]()
    return _CLIPS[family], twins


@pytest.fixture
def clip(lycoris_pack):
    return encoders("sdxl")[0]


def peft_file(path: str):
    """A LoRA on every Linear of both twins, saved by diffusers' SDXL pipeline; returns the twins."""
    peft = pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    twins = text_encoders.sdxl_twins()
    layers = {}
    g = torch.Generator().manual_seed(3)
    for arg, twin in zip(("text_encoder_lora_layers", "text_encoder_2_lora_layers"), twins):
        twin.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=linears(twin), init_lora_weights=False))
        with torch.no_grad():
            for name, p in twin.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        layers[arg] = peft.get_peft_model_state_dict(twin)
    folder, name = os.path.split(path)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(folder, weight_name=name, **layers)
    return dict(zip(PARTS, twins))


def test_peft_text_encoder_files_merge_with_pefts_deltas(clip, tmp_path):
    path = str(tmp_path / "sdxl_te_peft.safetensors")
    twins = peft_file(path)

    keys = set(clip.cond_stage_model.state_dict())

    def expected(strength):
        out = {}
        for part, twin in twins.items():
            for name, layer in twin.named_modules():
                if hasattr(layer, "get_delta_weight"):
                    key = host_key(PARTS[part], name, keys)
                    out[key] = strength * layer.get_delta_weight("default").float()
        return out

    report = assert_merges_like(clip, path, expected)
    assert "UNMATCHED" not in report, report
    assert_bypass_equals_merge(clip, path)


KOHYA_CASES = [("sdxl", a) for a in ("lora", "loha", "lokr")] + [("flux", "lora"), ("flux", "lokr"),
                                                                  ("flux-onetrainer", "lora"), ("sd3", "lora")]


@pytest.mark.parametrize(("kind", "algo"), KOHYA_CASES)
def test_kohya_text_encoder_names_merge_like_lycoris(lycoris_pack, kind, algo, tmp_path):
    """LyCORIS networks over the twins with kohya's names: `lora_te1_`/`lora_te2_` on SDXL's
    CLIP-L/G, `lora_te1_`/`lora_te3_` on Flux's CLIP-L/T5 (sd-scripts) and `lora_te2_` for its T5
    (OneTrainer), `lora_te1_`/`lora_te2_`/`lora_te3_` on SD3's CLIP-L, CLIP-G and T5 (sd-scripts)."""
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import save_file

    from oracle import randomize

    clip, twins = encoders(kind)
    saved = {"target_module": LycorisNetwork.TARGET_REPLACE_MODULE, "lora_prefix": LycorisNetwork.LORA_PREFIX}
    networks, tensors = {}, {}
    try:
        for (prefix, host_prefix), twin in zip(KOHYA[kind].items(), twins):
            LycorisNetwork.apply_preset({"target_module": ["Linear"], "lora_prefix": prefix})
            net = create_lycoris(twin, 1.0, linear_dim=4, linear_alpha=4, algo=algo)
            net.apply_to()
            randomize(net, scale=0.2, seed=len(networks) + 5)
            networks[host_prefix] = (twin, net)
            tensors.update({k: v.detach().clone() for k, v in net.state_dict().items()})
    finally:
        LycorisNetwork.apply_preset(saved)
    path = str(tmp_path / f"{kind}_te_{algo}.safetensors")
    save_file(tensors, path)
    keys = set(clip.cond_stage_model.state_dict())

    def expected(strength):
        out = {}
        for host_prefix, (twin, net) in networks.items():
            before = {k: v.detach().clone() for k, v in twin.state_dict().items()}
            net.merge_to(strength)
            for k, v in twin.state_dict().items():
                if not torch.equal(v, before[k]):
                    out[host_key(host_prefix, k[: -len(".weight")], keys)] = (v - before[k]).float()
            net.merge_to(-strength)
        return out

    report = assert_merges_like(clip, path, expected)
    assert "UNMATCHED" not in report, report
    assert_bypass_equals_merge(clip, path)
