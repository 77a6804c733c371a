"""Checks shared by the DiT family tests: the tiny host models (built once per process), our
loader and core's on the same file, whole-model weights as patched, bypass against merge."""
from __future__ import annotations

import logging

import torch

from . import dit, peft_files
from .helpers import load, module_outputs, pack_module, rel_err, unload_all

FP32_TOL = 1e-5


_MODELS: dict = {}


def tiny(family: str):
    """The tiny host model of `family`, built once per test process."""
    if family not in _MODELS:
        _MODELS[family] = dit.load(family)
    return _MODELS[family]


def merged_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of the diffusion model as patched for use (loaded through the host)."""
    load(model)
    return {k: v.detach().float().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def core(model, tensors: dict, strength: float):
    """ComfyUI core's LoRA loader on the same tensors, and the file keys it left out."""
    import comfy.sd

    left_out = []

    class Catch(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("lora key not loaded"):
                left_out.append(message.split(":", 1)[1].strip())

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        patched = comfy.sd.load_lora_for_models(model, None, dict(tensors), strength, 0.0)[0]
    finally:
        logging.getLogger().removeHandler(handler)
    return patched, left_out


def ours(model, path: str, strength: float, mode: str):
    adapters = pack_module("nodes.host_compat").read_adapters(path)
    return pack_module("nodes.apply").apply_lycoris(model, None, adapters, strength, 0.0, mode)


def changed_keys(base: dict, patched: dict) -> list[str]:
    return [k for k in base if not torch.equal(base[k], patched[k])]


def assert_bypass_equals_merge(model, path: str, strength: float = 0.8) -> None:
    """Bypass gives every patched layer the output our merge gives it."""
    base = merged_weights(model)
    merged_model, _, _ = ours(model, path, strength, "merge")
    touched = ["diffusion_model." + k for k in changed_keys(base, merged_weights(merged_model))
               if k.endswith(".weight")]
    assert touched
    want = module_outputs(merged_model, None, touched)
    unload_all()
    bypassed, _, report = ours(model, path, strength, "bypass")
    have = module_outputs(load_and(bypassed), None, touched)
    for key in touched:
        assert rel_err(have[key], want[key]) < FP32_TOL, f"{key}\n{report}"
    assert merged_weights(bypassed).keys() == base.keys()
    unload_all()


def load_and(model):
    load(model)
    return model


def targets_of(model, path: str):
    """Our key map's resolution of a file: (targets, unmatched names)."""
    adapters = pack_module("nodes.host_compat").read_adapters(path)
    resolution = pack_module("nodes.keymap").KeyMap(model).resolve(adapters)
    return resolution.targets, resolution.unmatched


def expected_change(target, twin, strength: float) -> torch.Tensor:
    """PEFT's own change of the file module `target.name`, as the host lays out that weight."""
    delta = strength * peft_files.peft_delta(twin, target.name.split(".", 1)[1])
    if target.function is not None:
        delta = target.function(delta)
    return delta
