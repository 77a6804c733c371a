"""Our loaders next to ComfyUI core's: stacked in either order, merged or bypassed, the result is
the sum of both files' effects. Oracle: core's own LoRA loader node applied to both files (core
stacks its patches additively), on the SD1.5 test model. Both files put LoRA (which core computes
exactly) on the same layers, so the effects really overlap."""
from __future__ import annotations

import os

import pytest
from safetensors.torch import save_file

from host.adapters import Case, build_case
from host.helpers import rel_err, unet_output, unload_all

pytestmark = pytest.mark.usefixtures("quiet_warnings")


@pytest.fixture(scope="module")
def files(sd15, loras_dir):
    names = []
    for seed in (0, 1):
        tensors = build_case(Case("lora"), sd15[0], None, seed=seed).tensors
        name = f"neighbour_{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(loras_dir, name))
        names.append(name)
    return names


def core(model, name, strength):
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def ours(model, name, strength, mode):
    from host.helpers import pack_module

    out = pack_module("nodes.loaders").LoadLycorisModelOnly().load_model_only(model, name, strength, mode)
    return out["result"][0]


@pytest.fixture(scope="module")
def expected(sd15, files):
    """Core's loader for both files, and the base output (to check the files change it)."""
    model = sd15[0]
    both = core(core(model, files[0], 0.7), files[1], -0.5)
    out = unet_output(both), unet_output(model)
    unload_all()
    return out


@pytest.mark.parametrize("mode", ["merge", "bypass"])
@pytest.mark.parametrize("order", ["ours-then-core", "core-then-ours"])
def test_our_loader_stacks_with_cores_lora_loader(sd15, files, expected, order, mode):
    model = sd15[0]
    if order == "ours-then-core":
        stacked = core(ours(model, files[0], 0.7, mode), files[1], -0.5)
    else:
        stacked = ours(core(model, files[0], 0.7), files[1], -0.5, mode)
    want, base = expected
    got = unet_output(stacked)
    unload_all()
    assert rel_err(want, base) > 1e-3
    assert rel_err(got, want) < 1e-5


def test_our_bypass_stacks_with_cores_bypass_loader(sd15, files, expected):
    import comfy.sd

    load_bypass = getattr(comfy.sd, "load_bypass_lora_for_models", None)
    if load_bypass is None:
        pytest.skip("this host has no core bypass LoRA loader (comfy.sd.load_bypass_lora_for_models, "
                    "ComfyUI v0.11.0 and later)")
    import comfy.utils
    import folder_paths

    def core_file(name):
        return comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name))

    model = sd15[0]
    for first in ("ours", "core"):
        if first == "ours":
            stacked = load_bypass(ours(model, files[0], 0.7, "bypass"), None, core_file(files[1]), -0.5, 0.0)[0]
        else:
            stacked = ours(load_bypass(model, None, core_file(files[0]), 0.7, 0.0)[0], files[1], -0.5, "bypass")
        got = unet_output(stacked)
        unload_all()
        assert rel_err(got, expected[0]) < 1e-5, first
