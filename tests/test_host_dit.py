"""DiTs in a real ComfyUI: a tiny Wan 2.1 built from the host's own classes and detected by the
host's own loader (tests/host/dit.py). The oracle is ComfyUI core's own LoRA loader
(`comfy.sd.load_lora_for_models`, which also runs the host's key conversion) on the same file.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from lycoris.modules.locon import LoConModule
from safetensors.torch import save_file
from torch import nn

from host import dit
from host.helpers import load, pack_module, rel_err, unload_all
from oracle import randomize


@pytest.fixture(scope="module")
def wan(lycoris_pack):
    return dit.load("wan21")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    unload_all()


def wan_output(model) -> torch.Tensor:
    load(model)
    x, t, context = dit.wan_inputs()
    with torch.inference_mode():
        return model.model.apply_model(x, t, c_crossattn=context).float()


def locon(name: str, in_dim: int, out_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA module written by lycoris-lora for a Linear of this shape (random, non-zero up)."""
    ref = LoConModule(name, nn.Linear(in_dim, out_dim), lora_dim=4, alpha=2.0)
    randomize(ref, scale=0.2, seed=seed)
    return {f"{name}.{k}": v.detach().clone() for k, v in ref.state_dict().items()}


def read(tensors: dict, tmp_path, name: str):
    path = tmp_path / name
    save_file(tensors, str(path))
    return pack_module("nodes.host_compat").read_adapters(str(path))


def core_model(model, tensors: dict, strength: float = 1.0):
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, dict(tensors), strength, 0.0)[0]


def ours(model, adapters, strength: float = 1.0, mode: str = "auto"):
    return pack_module("nodes.apply").apply_lycoris(model, None, adapters, strength, 0.0, mode)


def test_the_host_detects_the_tiny_wan_and_it_runs(wan):
    assert type(wan.model.model_config).__name__.startswith("WAN21")
    out = wan_output(wan)
    assert out.shape == (1, 16, 1, 8, 8) and torch.isfinite(out).all() and out.abs().mean() > 0


def test_wan_fun_names_load_through_the_hosts_key_conversion(wan, tmp_path):
    """Wan-Fun files spell the prefix `lora_unet__`; ComfyUI renames it before mapping keys."""
    if pack_module("nodes.host_compat").key_converter() is None:
        pytest.skip("this host has no comfy.lora_convert.convert_lora")
    names = ["blocks_0_cross_attn_k", "blocks_0_cross_attn_q", "blocks_0_self_attn_o"]
    tensors = {}
    for i, name in enumerate(names):
        tensors.update(locon(f"lora_unet__{name}", dit.WAN_DIM, dit.WAN_DIM, seed=i))
    adapters = read(tensors, tmp_path, "wan_fun.safetensors")
    assert adapters.converted_keys == len(tensors)
    assert sorted(adapters) == [f"lora_unet_{n}" for n in names]
    base = wan_output(wan)
    expected = wan_output(core_model(wan, tensors, 0.8))
    model, _, report = ours(wan, adapters, 0.8, "merge")
    assert "converted by ComfyUI's LoRA key conversion" in report and "UNMATCHED" not in report
    assert "3 merged" in report, report
    got = wan_output(model)
    assert rel_err(expected, base) > 1e-3  # the file does change the output
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_norm_adapters_on_wan_rms_norms_match_core(wan, tmp_path, mode):
    """q/k RMSNorm scales (w_norm, and a full `diff`) next to a LoRA on the projection they follow:
    bypass must compute them as RMSNorm, merge patches the scale; both equal core's merge."""
    g = torch.Generator().manual_seed(7)
    tensors = locon("lora_unet_blocks_1_self_attn_q", dit.WAN_DIM, dit.WAN_DIM, seed=3)
    tensors["lora_unet_blocks_1_self_attn_norm_q.w_norm"] = torch.randn(dit.WAN_DIM, generator=g) * 0.3
    tensors["lora_unet_blocks_0_self_attn_norm_k.diff"] = torch.randn(dit.WAN_DIM, generator=g) * 0.3
    adapters = read(tensors, tmp_path, f"wan_norms_{mode}.safetensors")
    base = wan_output(wan)
    expected = wan_output(core_model(wan, tensors, 0.9))
    model, _, report = ours(wan, adapters, 0.9, mode)
    assert f"3 {'merged' if mode == 'merge' else 'bypassed'}" in report, report
    got = wan_output(model)
    assert rel_err(expected, base) > 1e-3
    assert rel_err(got, expected) < 1e-5, report
