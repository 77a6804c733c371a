"""Checks shared by the text-encoder tests: our merge against an expected change per host weight
and against core's loader on the same file, and bypass against merge."""
from __future__ import annotations

import torch
from safetensors.torch import load_file as read_safetensors

from .helpers import load, pack_module, rel_err, sample_input, unload_all

FP32_TOL = 1e-5


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


def assert_merges_like(clip, path: str, expected_change, strengths=(1.0, -0.5), core_patches_all=False) -> str:
    """Our merge changes each CLIP weight by `expected_change(strength)` (host key -> delta) and
    nothing else, and equals core's merge on every weight core patches (`core_patches_all`: core
    patches every one of them too)."""
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
        if core_patches_all:
            assert set(changed(base, by_core)) == set(deltas), "core left weights of the file unpatched"
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
