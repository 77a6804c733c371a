"""Bypass mode inside a real ComfyUI: one pack-owned injection, stacked adapters, same output as
merge for every algorithm, fp8-stored models left untouched."""
from __future__ import annotations

import os

import pytest
import torch

from host.adapters import AdapterSet, Case, all_cases, build_case, distinct_unet_sites, kohya_name
from host.helpers import (apply, fp8_dense, is_fp8_storage, raw_fp8_values, load, module_at, module_outputs, pack_module, rel_err,
                          root_of, sample_input, scaled_fp8_unet, unet_output, unload_all,
                          weights)

CASES = all_cases()
MODULE_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # fp16 CLIP: merged weights are rounded
MODEL_TOL = 1e-4  # whole UNet, fp32


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def _injected_modules(patcher) -> set[str]:
    registry = patcher.get_attachment(pack_module("nodes.bypass").ATTACHMENT_KEY)
    return set(registry.entries) if registry else set()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bypass_layer_output_equals_merge(case, sd15, originals):
    """Each targeted layer (UNet and CLIP) gives the same output bypassed as merged by the host."""
    model, clip, _ = sd15
    files = build_case(case, model, clip)
    keys = list(files.targets.values())
    merged_model, merged_clip, _ = apply(model, clip, files.tensors, 0.7, 0.7, "merge")
    load(merged_model, merged_clip.patcher)
    merged = module_outputs(merged_model, merged_clip, keys)
    model_b, clip_b, report = apply(model, clip, files.tensors, 0.7, 0.7, "bypass")
    assert "merged" not in report and "UNMATCHED" not in report, report
    load(model_b, clip_b.patcher)
    bypassed = module_outputs(model_b, clip_b, keys)
    for key in keys:
        root = root_of(key, model_b, clip_b)[1]
        assert torch.equal(weights(root, [key])[key], originals[key]), f"{key} weight was touched"
        tol = MODULE_TOL[originals[key].dtype]
        assert rel_err(bypassed[key], merged[key]) < tol, f"{case.id} {key}"
    assert _injected_modules(model_b) and not _injected_modules(model)
    unload_all()
    for key in keys:  # ejected: the plain forward is back
        assert "forward" not in module_at(root_of(key, model, clip)[1], key).__dict__


def test_whole_model_bypass_equals_merge_for_all_algorithms(sd15):
    """Every case on its own UNet layers in one mixed file: the UNet output agrees across modes."""
    model, clip, _ = sd15
    files = AdapterSet()
    for i, (case, sites) in enumerate(zip(CASES, distinct_unet_sites(model, len(CASES)))):
        files.extend(build_case(case, model, clip, sites=sites, seed=i))
    merged_model, _, report = apply(model, None, files.tensors, 0.8, 0.0, "merge")
    assert f"{len(files.targets)} merged" in report
    merged = unet_output(merged_model)
    bypassed = unet_output(apply(model, None, files.tensors, 0.8, 0.0, "bypass")[0])
    assert rel_err(bypassed, merged) < MODEL_TOL
    unload_all()


def _stack_files(model, clip):
    """Two LoRAs and a LoKr on the same layers (UNet only)."""
    sites = distinct_unet_sites(model, 1)[0]
    return [build_case(Case(algo), model, clip, sites=sites, seed=seed).tensors
            for algo, seed in (("lora", 1), ("lora", 2), ("lokr", 3))]


def _chain(model, files, modes, strengths=(0.9, -0.5, 0.7)):
    patchers = [model]
    for tensors, mode, s in zip(files, modes, strengths):
        patchers.append(apply(patchers[-1], None, tensors, s, 0.0, mode)[0])
    return patchers


def test_stacked_bypass_loaders_add_up_like_merged_ones(sd15):
    model, clip, _ = sd15
    files = _stack_files(model, clip)
    bypassed = _chain(model, files, ["bypass"] * 3)
    merged = _chain(model, files, ["merge"] * 3)
    mixed = _chain(model, files, ["merge", "bypass", "merge"])
    # each bypass loader adds to the registry of its own clone; earlier clones keep theirs
    registry = [p.get_attachment(pack_module("nodes.bypass").ATTACHMENT_KEY) for p in bypassed]
    sizes = [len({k.split(".")[0] for k in f}) for f in files]
    assert registry[0] is None
    assert [len(r) for r in registry[1:]] == [sum(sizes[:i + 1]) for i in range(3)]
    key = pack_module("nodes.bypass").INJECTION_KEY
    assert [list(p.injections) for p in bypassed[1:]] == [[key]] * 3
    out_merged = unet_output(merged[-1])
    out_bypassed = unet_output(bypassed[-1])
    out_mixed = unet_output(mixed[-1])
    assert rel_err(out_bypassed, out_merged) < MODEL_TOL
    assert rel_err(out_mixed, out_merged) < MODEL_TOL
    # a clone of a bypassed model carries its adapters
    assert rel_err(unet_output(bypassed[-1].clone()), out_merged) < MODEL_TOL
    unload_all()


def test_stacked_weight_reading_adapters_see_the_earlier_ones_like_merge(sd15, originals):
    """DoRA (both axes), OFT and set_weight stacked after other adapters on the same layers: in
    bypass each one reads the weight as patched by the loaders before it, as merge does."""
    model, clip, _ = sd15
    sites = distinct_unet_sites(model, 1)[0]
    before = {k: originals[k] for k in sites.values() if k.startswith("diffusion_model.")}
    files = [build_case(case, model, clip, sites=sites, seed=seed).tensors
             for case, seed in ((Case("lora"), 1), (Case("lora", (("dora", "out"),)), 2),
                                (Case("diag-oft"), 3), (Case("lokr", (("dora", "in"),)), 4))]
    strengths = (0.9, 0.8, -0.6, 0.7)
    bypassed = _chain(model, files, ["bypass"] * 4, strengths)
    merged = _chain(model, files, ["merge"] * 4, strengths)
    out_merged = unet_output(merged[-1])
    assert rel_err(unet_output(bypassed[-1]), out_merged) < MODEL_TOL
    unload_all()
    assert before and all(torch.equal(v, before[k]) for k, v in weights(model.model, list(before)).items())


def test_strength_zero_is_the_untouched_model(sd15, loras_dir):
    from safetensors.torch import save_file

    model, clip, _ = sd15
    tensors = _stack_files(model, clip)[0]
    save_file(tensors, os.path.join(loras_dir, "zero.safetensors"))
    node = pack_module("nodes.loaders").LoadLycoris()
    for mode in ("merge", "bypass", "auto"):
        out = node.load(model, clip, "zero.safetensors", 0.0, 0.0, mode)["result"]
        assert out[0] is model and out[1] is clip
    # strength 0 through per-module multipliers: nothing is patched, the model is not even cloned

    class Zero:
        def strength(self, module_name, model_key):
            return 0.0

    new_model, _, report = apply(model, None, tensors, 1.0, 0.0, "bypass", block_weights=Zero())
    assert new_model is model and "strength 0" in report


def test_fp8_unet_auto_bypasses_and_strength_changes_the_output(sd15_checkpoint):
    """weight_dtype fp8_e4m3fn through the host's UNet loader: auto leaves the fp8 weights alone."""
    import nodes

    unload_all()
    (model,) = nodes.UNETLoader().load_unet(os.path.basename(sd15_checkpoint), "fp8_e4m3fn")
    tb = "diffusion_model.{}.1.transformer_blocks.0.{}.weight"
    files = build_case(Case("lora", (("dora", "out"),)), model, None,
                       sites={"linear": tb.format("input_blocks.1", "attn1.to_out.0"),
                              "conv3x3": "diffusion_model.input_blocks.1.0.in_layers.2.weight"})
    files.extend(build_case(Case("lokr"), model, None, seed=5,
                            sites={"linear": tb.format("output_blocks.11", "ff.net.2")}))
    keys = list(files.targets.values())
    before = weights(model.model, keys)
    assert all(w.dtype == torch.float8_e4m3fn for w in before.values())
    outputs = {}
    for s in (1.0, 0.5):
        new_model, _, report = apply(model, None, files.tensors, s, 0.0, "auto")
        assert f"{len(keys)} bypassed" in report and "float8_e4m3fn storage" in report, report
        outputs[s] = unet_output(new_model)
        after = weights(new_model.model, keys)
        assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in keys)
    assert torch.isfinite(outputs[1.0]).all()
    assert rel_err(outputs[0.5], outputs[1.0]) > 1e-3
    unload_all()


def _set_weight_file(model, key: str) -> AdapterSet:
    import comfy.lora

    shape = module_at(model.model, key).weight.shape
    files = AdapterSet()
    name = kohya_name(comfy.lora.model_lora_keys_unet(model.model, {}), key)
    files.add(name, key, {"set_weight": 0.01 * torch.randn(shape, generator=torch.Generator().manual_seed(3))})
    return files


@pytest.mark.parametrize("case", ["dora-out", "dora-in", "set_weight", "glora"])
def test_scaled_fp8_bypass_reads_the_dequantised_weight(sd15, case):
    """auto on a scaled-fp8 UNet bypasses; adapters that read W (DoRA norms, set_weight, GLoRA)
    must see the weight the layer computes with (stored values x scale_weight on older hosts, the
    QuantizedTensor's dequantize() on newer ones)."""
    import torch.nn.functional as F
    from lycoris_core import load_file

    unload_all()
    model = scaled_fp8_unet(sd15[0])
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    module = module_at(model.model, key)
    assert is_fp8_storage(module.weight)
    dense = fp8_dense(module)
    assert rel_err(raw_fp8_values(module.weight), dense) > 0.5  # reading raw values would be wrong
    if case == "set_weight":
        files = _set_weight_file(model, key)
    else:
        algo, options = ("glora", ()) if case == "glora" else ("lora", (("dora", case[5:]),))
        with torch.inference_mode():  # the model's weights were loaded in inference mode
            files = build_case(Case(algo, options), model, None, sites={"linear": key})
    assert list(files.targets.values()) == [key]
    strength = 0.7
    new_model, _, report = apply(model, None, files.tensors, strength, 0.0, "auto")
    assert "1 bypassed" in report, report
    load(new_model)
    got = module_outputs(new_model, None, [key])[key]
    (adapter,) = load_file(files.tensors).values()
    with torch.inference_mode():
        want = F.linear(sample_input(module), adapter.merge(dense, strength), module.bias.float())
    assert rel_err(got, want) < 1e-4
    unload_all()


def test_sliced_target_bypass_equals_merge(sd15, originals):
    """A bypassed slice of a fused weight changes only its output rows, like the merged slice."""
    from lycoris_core import REGISTRY, LayerSpec

    Target = pack_module("nodes.keymap").Target
    bypass = pack_module("nodes.bypass")
    add_merge_patches = pack_module("nodes.merge_patch").add_merge_patches
    model = sd15[0]
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    w0 = originals[key]
    start, length = 32, 96
    layer = LayerSpec("linear", (length, w0.shape[1]), weight=w0[start:start + length])
    adapter = REGISTRY["lora"].create(layer, rank=4, alpha=2.0, dora="out").requires_grad_(False)
    adapter.up.normal_(0, 0.05)
    target = Target("fused_k", adapter, "model", key, (0, start, length))
    merged, bypassed = model.clone(), model.clone()
    add_merge_patches(merged, [(target, 0.6, False)], "model")
    bypass.add_bypass(bypassed, [(target, 0.6)])
    load(merged)
    y_merged = module_outputs(merged, None, [key])[key]
    load(bypassed)
    y_bypassed = module_outputs(bypassed, None, [key])[key]
    assert rel_err(y_bypassed, y_merged) < MODULE_TOL[torch.float32]
    assert bypass.bypass_unsupported(Target("in", adapter, "model", key, (1, 0, 64)), model.model)
    unload_all()


def test_dora_bypass_works_on_inference_tensors():
    """ComfyUI loads and runs everything in inference mode; weights then have no version counter."""
    from lycoris_core import REGISTRY, LayerSpec

    with torch.inference_mode():
        layer = torch.nn.Linear(16, 12)
    adapter = REGISTRY["lora"].create(LayerSpec.from_module(layer), rank=2, dora="out")
    adapter.requires_grad_(False).up.normal_(0, 0.1)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        y = adapter.bypass(x, layer.forward, 0.5, layer)
    want = torch.nn.functional.linear(x, adapter.merge(layer.weight, 0.5), layer.bias)
    assert rel_err(y, want) < 1e-5
