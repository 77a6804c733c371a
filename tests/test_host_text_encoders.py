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
from safetensors.torch import load_file as read_safetensors

from host import text_encoders
from host.helpers import load, pack_module, rel_err, sample_input, unload_all

FP32_TOL = 1e-5
PARTS = {"text_encoder": "clip_l.transformer.", "text_encoder_2": "clip_g.transformer."}  # file part -> host
# kohya-style names: file prefix -> host prefix, per text-encoder set (the twins come in this order)
KOHYA = {
    "sdxl": {"lora_te1": "clip_l.transformer.", "lora_te2": "clip_g.transformer."},
    "flux": {"lora_te1": "clip_l.transformer.", "lora_te3": "t5xxl.transformer."},  # kohya sd-scripts
    "flux-onetrainer": {"lora_te1": "clip_l.transformer.", "lora_te2": "t5xxl.transformer."},
}


pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


_CLIPS: dict = {}


def encoders(kind: str):
    """(CLIP object, transformers twins) of a tiny text-encoder set, built once per process."""
    family = kind.split("-")[0]
    if family not in _CLIPS:
        build = {"sdxl": (text_encoders.sdxl_clip, text_encoders.sdxl_twins),
                 "flux": (text_encoders.flux_clip, text_encoders.flux_twins)}[family]
        _CLIPS[family] = build[0]()
    twins = {"sdxl": text_encoders.sdxl_twins, "flux": text_encoders.flux_twins}[family]()
    return _CLIPS[family], twins


@pytest.fixture
def clip(lycoris_pack):
    return encoders("sdxl")[0]


def clip_weights(clip) -> dict[str, torch.Tensor]:
    load(clip.patcher)
    return {k: v.detach().float().clone() for k, v in clip.cond_stage_model.state_dict().items()}


def ours(clip, path: str, strength: float, mode: str = "merge"):
    adapters = pack_module("nodes.host_compat").read_adapters(path)
    return pack_module("nodes.apply").apply_lycoris(None, clip, adapters, 0.0, strength, mode)


def core(clip, path: str, strength: float):
    import comfy.sd

    return comfy.sd.load_lora_for_models(None, clip, read_safetensors(path), 0.0, strength)[1]


def changed(base: dict, other: dict) -> list[str]:
    return [k for k in base if not torch.equal(base[k], other[k])]


def linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def host_key(prefix: str, path: str, keys: set[str]) -> str:
    """The host weight of a twin's module (transformers 5's CLIPTextModel lacks `text_model.`)."""
    for candidate in (f"{prefix}{path}.weight", f"{prefix}text_model.{path}.weight"):
        if candidate in keys:
            return candidate
    raise KeyError(f"no host weight for {prefix}{path}")


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


def assert_merges_like(clip, path: str, expected_change, strengths=(1.0, -0.5)) -> str:
    """Our merge changes each CLIP weight by `expected_change(strength)` (host key -> delta) and
    nothing else, and equals core's merge on every weight core patches."""
    base = clip_weights(clip)
    unload_all()
    report = ""
    for strength in strengths:
        got_clip, report = ours(clip, path, strength)[1:]
        got = clip_weights(got_clip)
        unload_all()
        deltas = expected_change(strength)
        assert deltas and set(changed(base, got)) == set(deltas), report
        worst = max(rel_err(got[k] - base[k], d) for k, d in deltas.items())
        assert worst < FP32_TOL, f"{strength}: {worst:.2e}\n{report}"
        by_core = clip_weights(core(clip, path, strength))
        unload_all()
        for k in changed(base, by_core):
            assert rel_err(got[k], by_core[k]) < FP32_TOL, f"{k}: not core's merge\n{report}"
    return report


def outputs(clip, keys: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's output on a fixed input, with whatever patches or injections are loaded."""
    import comfy.utils

    load(clip.patcher)
    out = {}
    with torch.inference_mode():
        for i, key in enumerate(keys):
            module = comfy.utils.get_attr(clip.cond_stage_model, key[: -len(".weight")])
            out[key] = module(sample_input(module, i)).float()
    return out


def assert_bypass_equals_merge(clip, path: str, strength: float = 0.8) -> None:
    base = clip_weights(clip)
    merged = ours(clip, path, strength)[1]
    keys = [k for k in changed(base, clip_weights(merged)) if k.endswith(".weight")]
    assert keys
    want = outputs(merged, keys)
    unload_all()
    have = outputs(ours(clip, path, strength, "bypass")[1], keys)
    for k in keys:
        assert rel_err(have[k], want[k]) < FP32_TOL, k


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
                                                                  ("flux-onetrainer", "lora")]


@pytest.mark.parametrize(("kind", "algo"), KOHYA_CASES)
def test_kohya_text_encoder_names_merge_like_lycoris(lycoris_pack, kind, algo, tmp_path):
    """LyCORIS networks over both twins with kohya's names: `lora_te1_`/`lora_te2_` on SDXL's
    CLIP-L/G, `lora_te1_`/`lora_te3_` on Flux's CLIP-L/T5 (sd-scripts) and `lora_te2_` for its T5
    (OneTrainer)."""
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
