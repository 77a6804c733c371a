"""`convert` inside a real ComfyUI: core's own LoRA loader (`comfy.sd.load_lora_for_models`) gives
the same weights for the original file and for each converted one, on SD1.5 (UNet and CLIP) and
on a tiny Flux built from the host's classes (diffusers names written by PEFT + diffusers, and
kohya names on the native layout)."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from host import dit, peft_files
from host.adapters import Case, build_case
from host.helpers import apply, load, unload_all

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")
STRENGTH = 0.8


def convert(src, style, out) -> None:
    from lycoris_core.__main__ import main

    assert main(["convert", str(src), "--to", style, "--out", str(out), "--quiet"]) == 0


class LeftOut(logging.Handler):
    """Collects the file keys core's loader reports as not loaded."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("lora key not loaded"):
            self.keys.append(message)


def core_weights(model, clip, path, keys) -> dict[str, torch.Tensor]:
    """`keys` after core's loader applied the file at STRENGTH (asserting it left no key out)."""
    import comfy.sd

    catch = LeftOut()
    logging.getLogger().addHandler(catch)
    try:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, read_safetensors(str(path)),
                                                            STRENGTH, STRENGTH)
    finally:
        logging.getLogger().removeHandler(catch)
    assert not catch.keys, f"{path.name}: {catch.keys[:3]}"
    load(*([new_model] + ([new_clip.patcher] if clip is not None else [])))
    roots = {"clip_": new_clip.cond_stage_model if clip is not None else None, "": new_model.model}
    states = {prefix: root.state_dict() for prefix, root in roots.items() if root is not None}
    out = {k: states["clip_" if k.startswith("clip_") else ""][k].detach().float().clone() for k in keys}
    unload_all()
    return out


def assert_core_agrees(model, clip, original, converted, keys) -> None:
    want = core_weights(model, clip, original, keys)
    got = core_weights(model, clip, converted, keys)
    for key in keys:
        assert torch.equal(got[key], want[key]), f"{converted.name}: {key}"


def test_sd15_kohya_file_converted_to_comfy_and_diffusers_loads_in_core_with_the_same_weights(sd15, tmp_path, originals):
    model, clip, _ = sd15
    files = build_case(Case("lora"), model, clip)
    original = tmp_path / "kohya.safetensors"
    save_file(files.tensors, str(original))
    keys = sorted(files.targets.values())
    comfy = tmp_path / "comfy.safetensors"
    convert(original, "comfy", comfy)
    assert_core_agrees(model, clip, original, comfy, keys)
    want = core_weights(model, clip, original, keys)
    assert all(not torch.equal(want[k], originals[k].float()) for k in keys), "core loaded nothing"
    # core reads no PEFT attention names on SD UNets (`attn1.to_q`, only the old `processor.to_q`):
    # the diffusers file goes through our loader, against core's weights for the original
    diffusers_file = tmp_path / "diffusers.safetensors"
    convert(original, "diffusers", diffusers_file)
    from lycoris_core import load_file

    new_model, new_clip, report = apply(model, clip, load_file(str(diffusers_file)), STRENGTH, STRENGTH, "merge")
    assert "UNMATCHED" not in report
    load(new_model, new_clip.patcher)
    for key in keys:
        root = new_clip.cond_stage_model if key.startswith("clip_") else new_model.model
        got = root.state_dict()[key].float()
        assert torch.allclose(got, want[key], rtol=1e-3, atol=1e-5), key
    unload_all()


def test_flux_diffusers_file_to_kohya_and_back_loads_in_core_with_the_same_weights(tmp_path):
    model = dit.load("flux")
    original = tmp_path / "flux_peft.safetensors"
    peft_files.peft_lora_file("flux", str(original), model)
    keys = ["diffusion_model." + k for k in model.model.diffusion_model.state_dict()]
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"
    convert(original, "kohya", kohya)
    assert all(k.startswith("lora_transformer_") for k in read_safetensors(str(kohya)))
    assert_core_agrees(model, None, original, kohya, keys)
    convert(kohya, "diffusers", back)
    assert set(read_safetensors(str(back))) == set(read_safetensors(str(original)))
    assert_core_agrees(model, None, original, back, keys)


def test_flux_kohya_file_on_native_names_converted_to_comfy_loads_in_core_with_the_same_weights(tmp_path):
    model = dit.load("flux")
    sd = model.model.diffusion_model.state_dict()
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for key, weight in sd.items():
        if key.endswith(".weight") and weight.ndim == 2:
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=g) * 0.1
            tensors[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=g) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
    original, comfy = tmp_path / "flux_kohya.safetensors", tmp_path / "flux_comfy.safetensors"
    save_file(tensors, str(original))
    convert(original, "comfy", comfy)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
             for k in read_safetensors(str(comfy))}
    assert names == {"diffusion_model." + k[: -len(".weight")] for k, w in sd.items()
                     if k.endswith(".weight") and w.ndim == 2}
    assert_core_agrees(model, None, original, comfy, ["diffusion_model." + k for k in sd])
