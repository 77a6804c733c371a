"""`merge --base` and `convert --to comfy` on diffusers-named DiT LoRAs without a host: a PEFT +
diffusers file (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`) for the tiny Flux and
SD3 of tests/host/dit.py, baked by the command line into a checkpoint saved from the host model's
own state dict (native keys, bare and `diffusion_model.`-prefixed).

Oracles: our LycorisLoader merge in the host, PEFT's own `get_delta_weight` per module (placed by
the host's diffusers -> native map, `comfy.utils.flux_to_diffusers` / `mmdit_to_diffusers`), and
core ComfyUI's LoraLoader for the file converted to ComfyUI names.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from host import dit, peft_files
from host.helpers import apply, load, unload_all

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")
FAMILIES = ("flux", "chroma", "sd3", "qwen_image")
# the --family a file's diffusers names need for --to comfy (Qwen-Image's are its native names,
# which alone read as Flux's too)
CONVERT_FAMILY = {"qwen_image": "qwen_image"}
STRENGTH = 0.7


def _host_map(family: str, model) -> dict:
    """diffusers weight key -> native key (or (key, (dim, start, length)) / (key, None, swap)), the
    host's (Chroma's approximator is not in it; Qwen-Image's names are diffusers' own)."""
    import comfy.utils

    config = model.model.model_config.unet_config
    if family in ("flux", "chroma"):
        return comfy.utils.flux_to_diffusers(config, output_prefix="")
    if family == "sd3":
        return comfy.utils.mmdit_to_diffusers(config, output_prefix="")
    return {k: k for k in model.model.diffusion_model.state_dict()}


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    """(family, host model, native state dict, PEFT model, adapter file, folder)."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    model = dit.load(family)
    sd = {k: v.detach().float().contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
    path = folder / "peft.safetensors"
    peft_model = peft_files.peft_lora_file(family, str(path), model)
    return family, model, sd, peft_model, path, folder


def _bake(base, adapter, out) -> dict[str, torch.Tensor]:
    from lycoris_core.__main__ import main

    assert main(["merge", "--base", str(base), "--adapter", f"{adapter}:{STRENGTH}", "--out", str(out),
                 "--quiet"]) == 0
    return read_safetensors(str(out))


@pytest.fixture(scope="module")
def baked(case):
    """{prefix: baked state dict} for a bare and a `diffusion_model.`-prefixed checkpoint."""
    family, model, sd, peft_model, path, folder = case
    out = {}
    for prefix in ("", "diffusion_model."):
        base = folder / f"base{len(prefix)}.safetensors"
        save_file({prefix + k: v for k, v in sd.items()}, str(base))
        baked = _bake(base, path, folder / f"baked{len(prefix)}.safetensors")
        assert set(baked) == {prefix + k for k in sd}
        out[prefix] = {k[len(prefix):]: v for k, v in baked.items()}
    return out


def test_baked_checkpoint_equals_our_loaders_merge_in_the_host(case, baked):
    from lycoris_core import load_file

    family, model, sd, peft_model, path, folder = case
    merged, _, report = apply(model, None, load_file(str(path)), STRENGTH, 0.0, "merge")
    assert "UNMATCHED" not in report, report
    load(merged)
    ours = {k: v.detach().float().clone() for k, v in merged.model.diffusion_model.state_dict().items()}
    unload_all()
    changed = [k for k in sd if not torch.equal(ours[k], sd[k])]
    assert len(changed) > 10, "our loader changed next to nothing"
    for prefix, got in baked.items():
        for key in sd:
            assert torch.allclose(got[key], ours[key], rtol=1e-5, atol=1e-6), f"{prefix!r} {key}"


def test_baked_checkpoint_equals_peft_delta_placed_by_the_host_map(case, baked):
    family, model, sd, peft_model, path, folder = case
    want = {k: v.clone() for k, v in sd.items()}
    placed = set()
    for key, target in _host_map(family, model).items():
        module = key[: -len(".weight")]
        if not key.endswith(".weight"):
            continue
        try:
            delta = peft_files.peft_delta(peft_model, module)
        except (AttributeError, TypeError):
            continue  # not a LoRA-wrapped Linear (norms, parameters)
        swap = False
        if isinstance(target, str):
            native, offset = target, None
        else:
            native, offset = target[0], target[1]
            swap = len(target) > 2
        if swap:
            delta = torch.cat(delta.chunk(2, dim=0)[::-1])
        rows = want[native] if offset is None else want[native].narrow(*offset)
        rows += STRENGTH * delta.reshape(rows.shape)
        placed.add(native)
    assert len(placed) > 10
    for key in placed:
        assert torch.allclose(baked[""][key], want[key], rtol=1e-4, atol=1e-5), key


class _LeftOut(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        if record.getMessage().startswith("lora key not loaded"):
            self.messages.append(record.getMessage())


def _core(model, tensors, strict: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights after core's LoraLoader applied `tensors`, and the keys it left out (none when strict)."""
    import comfy.sd

    catch = _LeftOut()
    logging.getLogger().addHandler(catch)
    try:
        patched, _ = comfy.sd.load_lora_for_models(model, None, tensors, STRENGTH, 0.0)
    finally:
        logging.getLogger().removeHandler(catch)
    assert not (strict and catch.messages), catch.messages[:3]
    load(patched)
    out = {k: v.detach().float().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    unload_all()
    return out, catch.messages


def test_converted_to_comfy_loads_in_core_with_the_baked_weights(case, baked):
    from lycoris_core.__main__ import main

    family, model, sd, peft_model, path, folder = case
    comfy_file = folder / "comfy.safetensors"
    family_arg = ["--family", CONVERT_FAMILY[family]] if family in CONVERT_FAMILY else []
    assert main(["convert", str(path), "--to", "comfy", "--out", str(comfy_file), "--force", "--quiet",
                 *family_arg]) == 0
    tensors = read_safetensors(str(comfy_file))
    assert all(k.startswith("diffusion_model.") for k in tensors)
    got, _ = _core(model, tensors)
    # core reads the diffusers file itself, all but a few names (Chroma's approximator)
    original, left_out = _core(model, read_safetensors(str(path)), strict=False)
    for key in sd:
        assert torch.allclose(got[key], baked[""][key], rtol=1e-5, atol=1e-6), key
        if not left_out:
            assert torch.allclose(got[key], original[key], rtol=1e-5, atol=1e-6), key
    assert all(family == "chroma" and "distilled_guidance_layer" in m for m in left_out), left_out[:3]
