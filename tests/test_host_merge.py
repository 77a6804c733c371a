"""Merge mode inside a real ComfyUI: the host patches exactly what lycoris_core merges, for every
registered algorithm, and matches ComfyUI core's own loader wherever core is right."""
from __future__ import annotations


import pytest
import torch

from host.adapters import AdapterSet, Case, all_cases, build_case, buildable
from host.helpers import apply, load, pack_module, rel_err, root_of, unload_all, weights

CASES = all_cases()
STRENGTHS = (1.0, -0.6)
# relative error of the weight change allowed against core: fp32 UNet, fp16 CLIP (rounding)
CORE_TOL = {torch.float32: 5e-5, torch.float16: 3e-4}


pytestmark = pytest.mark.usefixtures("quiet_warnings")


def core_difference(case: Case, strength: float, key: str) -> str | None:
    """Where ComfyUI core (Oct 2025) is known to be wrong or to lack support (docs/compatibility.md)."""
    opts = case.kwargs
    if case.algo == "ia3":
        return "core does not load (IA)^3"
    if case.algo == "diag-oft-legacy":
        return "core does not read the legacy oft_diag layout"
    if case.algo in ("diag-oft", "boft") and strength != 1:
        return "core applies OFT/BOFT strength twice"
    if case.algo in ("diag-oft", "boft") and opts.get("constraint"):
        return "core bounds ||Q|| by alpha instead of alpha * out_dim"
    if case.algo == "diag-oft" and opts.get("rescaled"):
        return "core's OFT merge ignores rescale"
    if opts.get("dora") == "out":
        return "core normalises output-axis DoRA by ||W|| instead of ||W + dW||"
    if case.algo == "lokr" and opts.get("use_tucker") and ".in_layers.2." in key:
        return "core's LoKr Tucker conv fails to reshape and leaves the weight unpatched"
    return None


def patched(model, clip, targets) -> dict[str, torch.Tensor]:
    """Weights (and biases) of the targeted layers after the host loaded these patchers."""
    load(model, clip.patcher)
    out = {}
    for key in targets:
        root = root_of(key, model, clip)[1]
        out.update(weights(root, [key]))
        bias = key[: -len("weight")] + "bias"
        try:
            out.update(weights(root, [bias]))
        except AttributeError:
            pass
    return out


def test_every_registered_algorithm_has_a_case():
    from lycoris_core import REGISTRY

    assert {c.algo for c in CASES} == set(REGISTRY)
    assert all(buildable(a) for a in REGISTRY), "add a builder for read-only layouts in host/adapters.py"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_merge_patch_equals_lycoris_core_and_core_comfyui(case, sd15, originals):
    from lycoris_core import load_file

    model, clip, _ = sd15
    files: AdapterSet = build_case(case, model, clip)
    assert files.targets, f"{case.id} fits no test layer"
    adapters = load_file(files.tensors)
    for strength in STRENGTHS:
        new_model, new_clip, report = apply(model, clip, adapters, strength, strength, "merge")
        assert "UNMATCHED" not in report and "bypassed" not in report
        ours = patched(new_model, new_clip, files.targets.values())
        for name, key in files.targets.items():
            w0 = originals[key]
            expected = adapters[name].merge(w0.float(), strength).to(w0.dtype)
            assert torch.equal(ours[key], expected), f"{case.id} {key} at {strength}"
            bias_key = key[: -len("weight")] + "bias"
            b0 = originals[bias_key]
            if b0 is not None:
                b_expected = adapters[name].merge_bias(b0, strength)
                assert torch.equal(ours[bias_key], b_expected.to(b0.dtype)), f"{case.id} {bias_key}"

        import comfy.sd

        core_model, core_clip = comfy.sd.load_lora_for_models(model, clip, files.tensors, strength, strength)
        core = patched(core_model, core_clip, files.targets.values())
        for key in files.targets.values():
            w0 = originals[key]
            err = rel_err(core[key].float() - w0.float(), ours[key].float() - w0.float())
            known = core_difference(case, strength, key)
            if known:
                assert err > CORE_TOL[w0.dtype], f"{case.id} {key}: core now agrees ({known}): update docs"
            else:
                assert err < CORE_TOL[w0.dtype], f"{case.id} {key} at {strength}: core differs by {err:.2e}"
    unload_all()
    for key in files.targets.values():  # unpatching restores every weight bit for bit
        root = root_of(key, model, clip)[1]
        assert torch.equal(weights(root, [key])[key], originals[key])


def test_strength_changes_and_unpatch_work_as_for_core_loras(sd15, originals):
    """Alternating clones at different strengths re-patch from the backup each time."""
    from lycoris_core import load_file

    model, clip, _ = sd15
    files = build_case(Case("lora"), model, clip)
    adapters = load_file(files.tensors)
    clones = {s: apply(model, clip, adapters, s, s, "merge")[0] for s in (1.0, 0.25, -2.0)}
    for s in (1.0, -2.0, 0.25, 1.0):
        got = patched(clones[s], clip, [k for k in files.targets.values() if not k.startswith("clip_")])
        for name, key in files.targets.items():
            if key in got:
                assert torch.equal(got[key], adapters[name].merge(originals[key].float(), s))
    unload_all()


def test_lowvram_patches_on_every_forward(sd15, originals):
    """Partially loaded modules patch on each forward (LowVramPatch -> our calculate_weight)."""
    from lycoris_core import LayerSpec, load_file

    from host.helpers import module_at, sample_input

    model, clip, _ = sd15
    files = build_case(Case("lokr", (("dora", "in"),)), model, clip)
    files.extend(build_case(Case("lora"), model, clip, seed=3).renamed("lora_unet_", "lycoris_"))
    adapters = load_file(files.tensors)
    new_model = apply(model, None, adapters, 0.8, 0.0, "merge")[0]
    unload_all()
    new_model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # nothing fits
    try:
        assert new_model.model.model_lowvram
        for name, key in files.targets.items():
            if key.startswith("clip_"):
                continue
            module = module_at(new_model.model, key)
            assert module.weight_function, f"{key} is not patched per forward"
            assert torch.equal(module.weight, originals[key])  # stored weight untouched
            x = sample_input(module)
            with torch.no_grad():
                got = module(x)
                spec = LayerSpec.from_module(module)
                merged_w = originals[key].float()
                for a in [adapters[n] for n, k in files.targets.items() if k == key]:
                    merged_w = a.merge(merged_w, 0.8)
                want = spec.op(x, merged_w, module.bias)
            assert rel_err(got, want) < 1e-6, key
    finally:
        new_model.unpatch_model(torch.device("cpu"))
    unload_all()


def test_sliced_targets_patch_their_rows_in_place(sd15, originals):
    """Fused weights (Flux qkv style): a patch with an offset writes only its slice, in place."""
    from lycoris_core import LayerSpec, REGISTRY

    Target = pack_module("nodes.keymap").Target
    add_merge_patches = pack_module("nodes.merge_patch").add_merge_patches
    model = sd15[0]
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    w0 = originals[key]
    start, length = 64, 128
    layer = LayerSpec("linear", (length, w0.shape[1]), weight=w0[start:start + length])
    adapter = REGISTRY["lora"].create(layer, rank=4, alpha=2.0).requires_grad_(False)
    adapter.up.normal_(0, 0.05)
    for part, function in ((slice(start, start + length), None),
                           (slice(start, start + length), lambda d: torch.flip(d, [0]))):
        clone = model.clone()
        target = Target("fused_q", adapter, "model", key, (0, start, length), function)
        add_merge_patches(clone, [(target, 0.7, False)], "model")
        got = patched(clone, sd15[1], [key])[key]
        delta = adapter.merge(w0[part].float(), 0.7) - w0[part]
        expected_part = w0[part] + (delta if function is None else function(delta))
        assert torch.allclose(got[part], expected_part, atol=1e-6, rtol=0)
        if function is None:
            assert torch.equal(got[part], adapter.merge(w0[part], 0.7))
        assert torch.equal(got[:start], w0[:start]) and torch.equal(got[start + length:], w0[start + length:])
    unload_all()


def test_sliced_bias_changes_patch_the_same_rows_of_the_bias(sd15, originals):
    from lycoris_core import load_file

    Target = pack_module("nodes.keymap").Target
    add_merge_patches = pack_module("nodes.merge_patch").add_merge_patches
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    bias_key = key[: -len("weight")] + "bias"
    w0, b0 = originals[key], originals[bias_key]
    start, length = 100, 60
    g = torch.Generator().manual_seed(4)
    adapter = load_file({"m.diff": torch.randn(length, w0.shape[1], generator=g) * 0.01,
                         "m.diff_b": torch.randn(length, generator=g) * 0.01})["m"]
    clone = sd15[0].clone()
    add_merge_patches(clone, [(Target("m", adapter, "model", key, (0, start, length)), 0.5, True)], "model")
    got = patched(clone, sd15[1], [key])
    rows = slice(start, start + length)
    assert torch.equal(got[key][rows], adapter.merge(w0[rows], 0.5))
    assert torch.equal(got[bias_key][rows], adapter.merge_bias(b0[rows], 0.5))
    assert torch.equal(got[bias_key][:start], b0[:start]) and torch.equal(got[bias_key][start + length:],
                                                                          b0[start + length:])
    unload_all()


def test_patch_errors_are_raised_not_swallowed(sd15):
    """A patch that fails while the host loads the model raises instead of leaving the weight."""
    Target = pack_module("nodes.keymap").Target
    add_merge_patches = pack_module("nodes.merge_patch").add_merge_patches

    class Broken:
        algo = "broken"
        file = None

        def merge(self, weight, strength, inplace=False, store_dtype=None):
            raise RuntimeError("factor went missing")

        def clear_cache(self):
            pass

        def tensor_values(self):
            return ()

        def with_tensors(self, values):
            return self

    clone = sd15[0].clone()
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    add_merge_patches(clone, [(Target("broken", Broken(), "model", key), 1.0, False)], "model")
    with pytest.raises(RuntimeError, match="factor went missing"):
        load(clone)
    unload_all()


def test_bias_change_on_a_layer_without_bias_is_reported(sd15):
    """The host model has no bias key to patch: merge mode says so in the report."""
    model = sd15[0]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # no bias
    tensors = {f"{name}.diff": torch.full((320, 768), 1e-3), f"{name}.diff_b": torch.ones(320)}
    _, _, report = apply(model, None, tensors, 1.0, 0.0, "merge")
    assert "bias change ignored in merge mode: the layer has no bias: 1" in report
    _, _, report = apply(model, None, tensors, 1.0, 0.0, "bypass")
    assert "ignored" not in report and "1 bypassed" in report


def _rebuilt(patch):
    """The patch rebuilt the way hosts with dynamic VRAM do before use: from its constructor
    arguments, every tensor of `weights` moved, other elements passed as they are. Through the
    host's own function where it has one (`comfy.lora.prefetch_prepared_value`, which rebuilds
    as `type(p)(p.loaded_keys, <weights moved>)`), then with every tensor copied to new storage,
    as a move to another device would."""
    import comfy.lora

    host_rebuild = getattr(comfy.lora, "prefetch_prepared_value", None)
    if host_rebuild is not None:
        patch = host_rebuild(patch, [0], None, None, False)
    moved = tuple(w.clone() if isinstance(w, torch.Tensor) else w for w in patch.weights)
    return type(patch)(patch.loaded_keys, moved)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_patches_survive_the_hosts_rebuild_bit_for_bit(case, sd15):
    """Newer hosts rebuild every weight patch as `type(p)(p.loaded_keys, <p.weights moved>)`
    (dynamic VRAM): our patches must follow that contract and compute the same bits after it."""
    _Patch = pack_module("nodes.merge_patch")._Patch
    model, clip, _ = sd15
    files = build_case(case, model, clip)
    new_model, new_clip, _ = apply(model, clip, files.tensors, 0.7, -0.4, "merge")
    checked = 0
    for patcher in (new_model, new_clip.patcher):
        for key, entries in patcher.patches.items():
            weight = weights(patcher.model, [key])[key]
            for strength, patch, strength_model, offset, function in entries:
                if not isinstance(patch, _Patch):
                    continue
                rebuilt = _rebuilt(patch)
                assert rebuilt.adapter is not patch.adapter
                tensors = [w for w in rebuilt.weights if isinstance(w, torch.Tensor)]
                assert all(a.data_ptr() == b.data_ptr() for a, b in zip(rebuilt.adapter.tensor_values(), tensors))
                assert len(tensors) == len(patch.adapter.tensor_values())
                w = weight.float()
                if offset is not None:
                    w = w.narrow(*offset)
                args = (key, strength, strength_model, offset, function, torch.float32, None)
                before = patch.calculate_weight(w.clone(), *args)
                after = rebuilt.calculate_weight(w.clone(), *args)
                assert torch.equal(before, after), f"{case.id} {key}"
                assert not torch.equal(before, w), f"{case.id} {key}: the patch changed nothing"
                checked += 1
    assert checked >= len(files.targets), f"{case.id}: only {checked} patches checked"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_half_precision_intermediates_are_no_worse_than_core(algo, dtype, sd15, originals):
    """Newer hosts hand calculate_weight a working weight in fp16/bf16 with that intermediate dtype
    (fp16 on CUDA, the weight's own dtype under lowvram). Against the float64 result, our patch at
    that dtype is no further off than core's own adapter on the same file."""
    import comfy.lora

    _Patch = pack_module("nodes.merge_patch")._Patch
    model, clip, _ = sd15
    files = build_case(Case(algo), model, None)
    new_model, _, _ = apply(model, None, files.tensors, 0.7, 0.0, "merge")
    core = comfy.lora.load_lora(files.tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
    checked = 0
    for key, entries in new_model.patches.items():
        ours = [e for e in entries if isinstance(e[1], _Patch)]
        if key not in core or not ours:
            continue
        w0 = originals[key]

        def run(patch, dt, working):
            return comfy.lora.calculate_weight([(0.7, patch, 1.0, None, None)], working, key,
                                               intermediate_dtype=dt)

        exact = run(core[key], torch.float64, w0.double())
        err_ours = rel_err(run(ours[0][1], dtype, w0.to(dtype)) - w0.double(), exact - w0.double())
        err_core = rel_err(run(core[key], dtype, w0.to(dtype)) - w0.double(), exact - w0.double())
        assert err_ours <= err_core * 1.05 + 1e-6, f"{algo} {key}: ours {err_ours:.2e}, core {err_core:.2e}"
        checked += 1
    assert checked, f"{algo}: no key patched by both"
    unload_all()


@pytest.mark.parametrize("algo,options", [("lora", ()), ("loha", ()), ("lora", (("dora", "in"),))],
                         ids=["lora", "loha", "dora-in"])
def test_merge_into_scaled_fp8_goes_through_the_hosts_requantisation(algo, options, sd15):
    """mode merge on a scaled-fp8 UNet: the host dequantises, we merge, the host stores fp8 again
    (QuantizedTensor on newer hosts, fp8 + scale_weight on older ones). Oracle: core's loader on the
    same file through the same path, and the float merge within fp8 rounding."""
    import comfy.sd
    import torch.nn.functional as F
    from lycoris_core import load_file

    from host.helpers import (fp8_dense, is_fp8_storage, module_at, module_outputs, sample_input,
                              scaled_fp8_unet, stored_bytes)

    unload_all()
    model = scaled_fp8_unet(sd15[0])
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
    module = module_at(model.model, key)
    before, dense = stored_bytes(module.weight), fp8_dense(module)
    with torch.inference_mode():
        files = build_case(Case(algo, options), model, None, sites={"linear": key})
    strength = 0.8
    ours, _, report = apply(model, None, files.tensors, strength, 0.0, "merge")
    assert "1 merged" in report, report
    core = comfy.sd.load_lora_for_models(model, None, dict(files.tensors), strength, 0.0)[0]
    (adapter,) = load_file(files.tensors).values()
    x = sample_input(module)
    with torch.inference_mode():
        float_merge = F.linear(x, adapter.merge(dense, strength), module.bias.float())
    outputs = {}
    for name, patcher in (("ours", ours), ("core", core)):
        load(patcher)
        assert is_fp8_storage(module.weight), f"{name}: the merged weight is no longer stored as fp8"
        assert not torch.equal(stored_bytes(module.weight), before), f"{name}: nothing was merged"
        outputs[name] = module_outputs(patcher, None, [key])[key]
        unload_all()
    assert torch.equal(stored_bytes(module.weight), before)  # unpatched back to the file's bytes
    # same float merge, same host requantisation: equal but for rounding ties
    assert rel_err(outputs["ours"], outputs["core"]) < 2e-3
    assert rel_err(outputs["ours"], float_merge) < 6e-2  # e4m3 keeps 3 mantissa bits
