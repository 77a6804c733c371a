"""Model families users run now (SDXL, SD3.5, Flux.1/2, Chroma, Wan, HunyuanVideo, Qwen-Image,
Lumina 2, Z-Image, HiDream), each a tiny random-weight model built from the host's own classes
(tests/host/dit.py), with the adapter files their trainers write:

- diffusers / PEFT files, written by PEFT and the family's diffusers pipeline on a diffusers twin of
  the same widths (tests/host/peft_files.py). Several of their modules are slices of one fused host
  weight (q, k, v into qkv; Flux's single-block linear1).
- kohya-style files (`lora_unet_<host path>`), LoCon modules written by lycoris-lora.
- LyCORIS files as SimpleTuner writes them on DiTs (`lycoris_<diffusers path>`), every algorithm,
  written by lycoris-lora's own module classes, on fused slices.

Oracles: ComfyUI core's own loader on the same file (`comfy.sd.load_lora_for_models`, which also
runs the host's key conversion), over the whole model's weights; PEFT's `get_delta_weight` for a
fused slice; lycoris-lora's own merged weight for every algorithm on a slice.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from host import dit, peft_files
from host.dit_checks import (assert_bypass_equals_merge, changed_keys, core, expected_change, merged_weights, ours,
                              targets_of, tiny)
from host.helpers import load, module_at, pack_module, rel_err, unload_all

STRENGTHS = (1.0, 0.5, 0.0, -0.5)
FP32_TOL = 1e-5


pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


def assert_peft_file_merges(model, twin, path: str, compare_core: bool = True) -> str:
    """Merged through our loader, every module the file targets changes its weight (or its slice
    of a fused weight) by exactly PEFT's delta times strength, nothing else moves, and every layer
    core's loader patches ends up the same as core's. Returns the report at strength 1."""
    tensors = read_safetensors(path)
    base = merged_weights(model)
    targets, unmatched = targets_of(model, path)
    assert targets, f"our key map places no module of the file; unmatched: {unmatched[:5]}"
    report_at_1 = ""
    for strength in STRENGTHS:
        got_model, _, report = ours(model, path, strength, "merge")
        got = merged_weights(got_model)
        unload_all()
        expected = {k: v.clone() for k, v in base.items()}
        for t in targets:
            key = t.key[len("diffusion_model."):]
            rows = slice(None) if t.offset is None else slice(t.offset[1], t.offset[1] + t.offset[2])
            expected[key][rows] += expected_change(t, twin, strength).reshape(expected[key][rows].shape)
        worst = max(rel_err(got[k] - base[k], expected[k] - base[k]) if strength else
                    float(not torch.equal(got[k], base[k])) for k in base)
        assert worst < FP32_TOL, f"strength {strength}: {worst:.2e} off PEFT's deltas\n{report}"
        if compare_core:
            core_model, _ = core(model, tensors, strength)
            by_core = merged_weights(core_model)
            unload_all()
            for k in changed_keys(base, by_core):
                assert rel_err(got[k], by_core[k]) < FP32_TOL, f"{k} at {strength}: not core's merge\n{report}"
        if unmatched:
            assert "UNMATCHED" in report and all(n.split(".", 1)[1] in report or n in report
                                                 for n in unmatched[:1]), report
        if strength == 1.0:
            report_at_1 = report
    return report_at_1


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_the_host_builds_and_detects_each_tiny_family(family):
    model = tiny(family)
    assert type(model.model.model_config).__name__.startswith(dit.FAMILIES[family].detects_as)
    weights = model.model.diffusion_model.state_dict()
    assert sum(v.numel() for v in weights.values()) < 8_000_000
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_peft_diffusers_files_merge_exactly(family, tmp_path):
    """A LoRA on every Linear (and Conv) of the diffusers twin, saved by diffusers: each lands with
    PEFT's own delta at strengths 1, 0.5, 0 and -0.5, agreeing with core wherever core patches."""
    model = tiny(family)
    path = str(tmp_path / f"{family}_peft.safetensors")
    twin = peft_files.peft_lora_file(family, path, tiny(family))
    report = assert_peft_file_merges(model, twin, path)
    assert "merged" in report


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_peft_diffusers_files_bypass_like_merge(family, tmp_path):
    model = tiny(family)
    path = str(tmp_path / f"{family}_peft.safetensors")
    peft_files.peft_lora_file(family, path, tiny(family))
    assert_bypass_equals_merge(model, path)


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_every_module_of_a_peft_file_lands(family, tmp_path):
    """No module of a PEFT LoRA on every Linear of the diffusers model is left out."""
    path = str(tmp_path / f"{family}_all.safetensors")
    peft_files.peft_lora_file(family, path, tiny(family))
    _, unmatched = targets_of(tiny(family), path)
    assert not unmatched


FUSED_SLICES = {  # diffusers module -> (host weight, rows) on the tiny models
    "flux": ("transformer_blocks.0.attn.to_k", "diffusion_model.double_blocks.0.img_attn.qkv.weight", (128, 256)),
    "chroma": ("single_transformer_blocks.0.attn.to_v", "diffusion_model.single_blocks.0.linear1.weight", (256, 384)),
    "sd3": ("transformer_blocks.1.attn.to_v", "diffusion_model.joint_blocks.1.x_block.attn.qkv.weight", (256, 384)),
}


@pytest.mark.parametrize("family", sorted(FUSED_SLICES))
def test_a_fused_slice_gets_exactly_pefts_change(family, tmp_path):
    """PEFT's own delta of one diffusers module lands on its rows of the fused host weight, and no
    other row of that weight moves except by the file's other modules."""
    module, key, (start, stop) = FUSED_SLICES[family]
    model = tiny(family)
    path = str(tmp_path / f"{family}_slice.safetensors")
    twin = peft_files.peft_lora_file(family, path, tiny(family))
    delta = peft_files.peft_delta(twin, module)
    key = key if key in {"diffusion_model." + k for k in model.model.diffusion_model.state_dict()} else \
        pytest.fail(f"{key} is not a weight of the tiny {family}")
    base = merged_weights(model)[key[len("diffusion_model."):]]
    got_model, _, report = ours(model, path, 0.7, "merge")
    got = merged_weights(got_model)[key[len("diffusion_model."):]]
    assert rel_err(got[start:stop] - base[start:stop], 0.7 * delta) < 1e-5, report


SLICE_SITE = ("flux", "lycoris_transformer_blocks_0_attn_to_k", "diffusion_model.double_blocks.0.img_attn.qkv", 128, 256)


def _slice_cases():
    from host.adapters import all_cases

    try:
        return all_cases()
    except ImportError:
        return []


@pytest.mark.parametrize("mode", ["merge", "bypass"])
@pytest.mark.parametrize("case", _slice_cases(), ids=lambda c: c.id)
def test_every_algorithm_on_a_fused_slice(case, mode, tmp_path):
    """A LyCORIS module on Flux's to_k, as SimpleTuner names it on a diffusers Flux, patches only the
    k rows of the fused qkv weight, exactly as the same adapter patches a plain layer holding just
    those rows (that plain-layer result is pinned to lycoris-lora by the algorithm tests)."""
    from host.adapters import module_tensors
    from lycoris_core import load_file
    from oracle import merged_forward

    family, name, module_path, start, stop = SLICE_SITE
    model = tiny(family)
    fused = module_at(model.model, module_path)
    plain = torch.nn.Linear(fused.in_features, stop - start)
    with torch.no_grad():
        plain.weight.copy_(fused.weight[start:stop].float())
        plain.bias.copy_(fused.bias[start:stop].float())
    tensors = module_tensors(case, plain, seed=5)
    if tensors is None:
        pytest.skip(f"{case.id} does not fit a {tuple(plain.weight.shape)} Linear")
    tensors = {f"{name}.{k}": v for k, v in tensors.items()}
    path = str(tmp_path / "slice.safetensors")
    save_file(tensors, path)
    adapter = load_file(tensors)[name]
    x = torch.randn(2, 5, fused.in_features, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        base = fused(x).float()
    for strength in (1.0, -0.5):
        got_model, _, report = ours(model, path, strength, mode)
        load(got_model)
        with torch.inference_mode():
            out = module_at(got_model.model, module_path)(x).float()
        unload_all()
        expected = merged_forward(adapter, plain, x, strength)
        assert rel_err(out[..., start:stop], expected) < FP32_TOL, f"{case.id} at {strength}\n{report}"
        assert torch.equal(out[..., :start], base[..., :start]) and torch.equal(out[..., stop:], base[..., stop:])


def _numbered(code: str, count: int) -> list[str]:
    return [f"{code}{i:02d}" for i in range(count)]


def expected_blocks(family: str) -> set[str]:
    """The numbered blocks users know for each family, counted from the tiny model's settings."""
    c = dit.FAMILIES[family].config
    if family in ("flux", "flux2", "chroma", "hunyuan_video"):
        return set(_numbered("D", c["depth"]) + _numbered("S", c["depth_single_blocks"]))
    if family == "sd3":
        return set(_numbered("J", c["depth"]))
    if family == "qwen_image":
        return set(_numbered("T", c["num_layers"]))
    if family in ("lumina2", "z_image"):
        return set(_numbered("L", c["n_layers"]) + _numbered("CR", c["n_refiner_layers"])
                   + _numbered("NR", c["n_refiner_layers"]))
    if family == "wan21":
        return set(_numbered("B", c["num_layers"]))
    if family == "hidream":
        return set(_numbered("DS", c["num_layers"]) + _numbered("SS", c["num_single_layers"]))
    if family == "sdxl":  # 3 levels x (2 resnets + 1 downsample), a middle block, the mirror
        return set(_numbered("IN", 9) + ["M00"] + _numbered("OUT", 9))
    raise KeyError(family)


@pytest.mark.parametrize("family", dit.FAMILY_NAMES)
def test_blocks_are_named_as_users_know_them(family):
    """Automatic block discovery on the host's own keys: Flux double/single blocks (D/S), SD3 joint
    blocks (J), Qwen-Image transformer blocks (T), Lumina layers and refiners, Wan blocks (B), SDXL
    IN/M/OUT; everything else is IN/OUT/OTHER, never a numbered block."""
    from lycoris_core.blocks import block_of

    keys = ["diffusion_model." + k for k in tiny(family).model.diffusion_model.state_dict() if k.endswith(".weight")]
    found = {block_of(k, k) for k in keys}
    numbered = {b for b in found if b[-2:].isdigit()}
    assert numbered == expected_blocks(family)
    assert found - numbered <= {"IN", "OUT", "OTHER"}


@pytest.mark.parametrize("family", ["flux", "wan21", "sd3"])
def test_block_weights_act_per_block_on_dits(family, tmp_path):
    """A block-weight spec that switches one numbered block off leaves exactly that block's layers
    untouched, while the rest of the file still patches."""
    from lycoris_core.blocks import block_of
    from lycoris_core.blocks.spec import parse_spec

    model = tiny(family)
    path = str(tmp_path / f"{family}_blocks.safetensors")
    peft_files.peft_lora_file(family, path, tiny(family))
    off = sorted(expected_blocks(family))[0]
    adapters = pack_module("nodes.host_compat").read_adapters(path)
    base = merged_weights(model)
    patched, _, report = pack_module("nodes.apply").apply_lycoris(model, None, adapters, 1.0, 0.0, "merge",
                                                                 parse_spec(f"{off}=0"))
    got = merged_weights(patched)
    changed = {k for k in changed_keys(base, got)}
    in_block = {k for k in base if block_of("diffusion_model." + k, "diffusion_model." + k) == off}
    assert changed and not (changed & in_block), report
    full = merged_weights(ours(model, path, 1.0, "merge")[0])
    assert changed_keys(base, full) and set(changed_keys(base, full)) & in_block


LYCORIS_NETWORK_ALGOS = ("lora", "loha", "lokr")


@pytest.fixture
def lycoris_preset():
    """lycoris-lora's network targets set the way kohya's LyCORIS wrapper names DiT modules
    (`lora_unet_` + the model's own path), restored afterwards (the preset is class state)."""
    from lycoris import LycorisNetwork

    saved = {"target_module": LycorisNetwork.TARGET_REPLACE_MODULE, "target_name": LycorisNetwork.TARGET_REPLACE_NAME,
             "lora_prefix": LycorisNetwork.LORA_PREFIX}
    LycorisNetwork.apply_preset({"target_module": ["Linear"], "target_name": [], "lora_prefix": "lora_unet"})
    yield
    LycorisNetwork.apply_preset(saved)


# LoRA on every family; the other network algorithms on one family of each layout
# LoRA on every family; the other network algorithms, and the other spellings of native names,
# on a few families
NETWORK_CASES = [(f, "lora", "kohya") for f in dit.FAMILY_NAMES] + [
    (f, a, "kohya") for f in ("flux", "sd3", "wan21") for a in LYCORIS_NETWORK_ALGOS if a != "lora"] + [
    (f, "lora", style) for f in ("flux", "wan21", "qwen_image", "hunyuan_video") for style in ("comfy", "bfl_peft")]
# how trainers spell a native module path: kohya/LyCORIS and musubi-tuner (`lora_unet_`, Wan and
# HunyuanVideo in their original layout), ComfyUI's own saved LoRAs, BFL/AI-Toolkit (Wan)
STYLES = {"kohya": lambda path, suffix: f"lora_unet_{path.replace('.', '_')}.{suffix}",
          "comfy": lambda path, suffix: f"diffusion_model.{path}.{suffix}",
          "bfl_peft": lambda path, suffix: f"diffusion_model.{path}." + {
              "lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)}


def respelled(tensors: dict, model: torch.nn.Module, style: str) -> dict:
    """A kohya-named state dict in another trainer's spelling of the same native paths."""
    dotted = {"lora_unet_" + n.replace(".", "_"): n for n, _ in model.named_modules() if n}
    out = {}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        if style == "bfl_peft" and suffix == "alpha":
            continue  # PEFT files carry no alpha: the tests use alpha = rank
        out[STYLES[style](dotted[name], suffix)] = value
    return out


@pytest.mark.parametrize(("family", "algo", "style"), NETWORK_CASES)
def test_lycoris_network_files_on_native_names_merge_like_lycoris(family, algo, style, tmp_path, lycoris_preset):
    """A LyCORIS network over every Linear of the host's own model, saved by lycoris-lora with
    kohya's `lora_unet_<path>` names (`lora_unet_double_blocks_0_img_attn_qkv` on Flux), or the same
    modules as ComfyUI saves them (`diffusion_model.<path>.lora_up.weight`) and as BFL/AI-Toolkit
    files spell them (`diffusion_model.<path>.lora_A.weight`): our merge
    equals lycoris-lora's own `merge_to` over the whole model at strengths 1 and -0.5, our bypass
    equals our merge, and every layer core's loader patches ends up the same as core's."""
    import copy

    from lycoris import create_lycoris
    from oracle import randomize

    model = tiny(family)
    base = merged_weights(model)
    assert all(torch.isfinite(v).all() for v in base.values())
    unload_all()
    path = str(tmp_path / f"{family}_{algo}_{style}.safetensors")
    reference = copy.deepcopy(model.model.diffusion_model).float()
    network = create_lycoris(reference, 1.0, linear_dim=4, linear_alpha=4, algo=algo)
    network.apply_to()  # registers the modules (their weights) with the network
    randomize(network, scale=0.05, seed=11)
    assert network.state_dict(), "lycoris-lora made no module"
    network.save_weights(path, torch.float32, None)
    if style != "kohya":
        save_file(respelled(read_safetensors(path), reference, style), path)
    tensors = read_safetensors(path)
    for strength in (1.0, -0.5):
        network.merge_to(strength)
        expected = {k: v.detach().float().clone() for k, v in reference.state_dict().items()}
        network.merge_to(-strength)  # additive algorithms: back to the base weights
        got_model, _, report = ours(model, path, strength, "merge")
        assert "UNMATCHED" not in report, report
        got = merged_weights(got_model)
        unload_all()
        touched = changed_keys(base, expected)
        assert touched and changed_keys(base, got) == touched, report
        worst = max(rel_err(got[k] - base[k], expected[k] - base[k]) for k in touched)
        assert worst < 1e-4, f"{strength}: {worst:.2e} off lycoris-lora's merge\n{report}"
        core_model, _ = core(model, tensors, strength)
        by_core = merged_weights(core_model)
        unload_all()
        for k in changed_keys(base, by_core):
            assert rel_err(got[k], by_core[k]) < FP32_TOL, f"{k}: not core's merge"
    assert_bypass_equals_merge(model, path)


@pytest.mark.parametrize("family", ["flux", "wan21", "sdxl"])
def test_peft_alpha_from_the_files_lora_config(family, tmp_path):
    """diffusers keeps lora_alpha only in the file's `lora_adapter_metadata` (one LoraConfig per
    model part, `transformer.lora_alpha`); with alpha 8 at rank 4 every module scales by 2, as PEFT
    computes it. Core's loader reads no such metadata and applies scale 1."""
    model = tiny(family)
    path = str(tmp_path / f"{family}_alpha.safetensors")
    twin = peft_files.peft_lora_file(family, path, model, rank=4, alpha=8.0, with_config=True)
    report = assert_peft_file_merges(model, twin, path, compare_core=False)
    assert "without alpha" not in report, report
