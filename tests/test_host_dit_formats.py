"""DiT adapter formats that no installable library writes, built by hand from their trainer's source.

XLabs (x-flux) Flux LoRAs: x-flux's `DoubleStreamBlockLoraProcessor` holds `qkv_lora1`/`proj_lora1`
(image stream: `img_attn.qkv`, `img_attn.proj`) and `qkv_lora2`/`proj_lora2` (text stream), its
`SingleStreamBlockLoraProcessor` `qkv_lora` (added to the qkv part of `linear1`'s output) and
`proj_lora` (beside `linear2`), each a `LoRALinearLayer` saved as `<name>.down.weight` /
`<name>.up.weight`, output `up(down(x))` (no alpha in the file). x-flux is a training repository,
not a package, so the file is written here from that layout. Oracles: the delta that layout
defines, and core's own conversion of these names (`comfy.lora_convert.convert_uso_lora`, which
core runs only on full-size USO files) through core's loader.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from host.dit_checks import assert_bypass_equals_merge, changed_keys, core, merged_weights, ours, tiny
from host.helpers import rel_err, unload_all

FP32_TOL = 1e-5

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")


def xlabs_file(model, rank: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """(file tensors in XLabs' layout for every processor of the tiny Flux, {host weight: (rows, delta)})."""
    weights = model.model.diffusion_model.state_dict()
    hidden = weights["double_blocks.0.img_attn.proj.weight"].shape[0]
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}

    def lora(name: str, host: str, in_dim: int, out_dim: int, rows: slice = slice(None)):
        down = torch.randn(rank, in_dim, generator=g) * 0.1
        up = torch.randn(out_dim, rank, generator=g) * 0.1
        tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = down, up
        expected[f"{host}.weight"] = (rows, up @ down)

    for i in range(sum(k.startswith("double_blocks.") and k.endswith("img_attn.qkv.weight") for k in weights)):
        for n, stream in ((1, "img"), (2, "txt")):
            lora(f"double_blocks.{i}.processor.qkv_lora{n}", f"double_blocks.{i}.{stream}_attn.qkv", hidden, 3 * hidden)
            lora(f"double_blocks.{i}.processor.proj_lora{n}", f"double_blocks.{i}.{stream}_attn.proj", hidden, hidden)
    for i in range(sum(k.startswith("single_blocks.") and k.endswith("linear2.weight") for k in weights)):
        wide = weights[f"single_blocks.{i}.linear2.weight"].shape[1]
        lora(f"single_blocks.{i}.processor.qkv_lora", f"single_blocks.{i}.linear1", hidden, 3 * hidden,
             slice(0, 3 * hidden))
        lora(f"single_blocks.{i}.processor.proj_lora", f"single_blocks.{i}.linear2", wide, hidden)
    return tensors, expected


def test_xlabs_flux_loras_land_with_their_layouts_delta_and_like_core(lycoris_pack, tmp_path):
    """Every XLabs processor lands on its Flux weight (a single block's qkv on the qkv rows of
    linear1), changed by exactly up @ down times strength, nothing else moves, equal to core's merge
    of its own conversion of the names; bypass equals merge."""
    import comfy.lora_convert

    model = tiny("flux")
    tensors, expected = xlabs_file(model)
    path = str(tmp_path / "xlabs_flux.safetensors")
    save_file(tensors, path)
    base = merged_weights(model)
    for strength in (1.0, -0.5):
        got_model, _, report = ours(model, path, strength, "merge")
        assert "UNMATCHED" not in report, report
        got = merged_weights(got_model)
        unload_all()
        assert set(changed_keys(base, got)) == set(expected), report
        for key, (rows, delta) in expected.items():
            want = base[key].clone()
            want[rows] += strength * delta
            assert rel_err(got[key] - base[key], want - base[key]) < FP32_TOL, f"{key}\n{report}"
        by_core = merged_weights(core(model, comfy.lora_convert.convert_uso_lora(dict(tensors)), strength)[0])
        unload_all()
        assert set(changed_keys(base, by_core)) == set(expected)
        for key in expected:
            assert rel_err(got[key], by_core[key]) < FP32_TOL, f"{key}: not core's merge"
    assert_bypass_equals_merge(model, path)
