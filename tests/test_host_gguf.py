"""GGUF-quantised UNets (city96's ComfyUI-GGUF node pack) inside a real ComfyUI.

The pack is found at $COMFYUI_GGUF_PATH, else in the host's custom_nodes/ComfyUI-GGUF, else at
/opt/ComfyUI-GGUF; its `gguf` package must import. The test SD1.5 UNet is written as a GGUF file
(Q8_0 Linear weights, F32 elsewhere) and loaded by the pack's own UNet loader, so layers hold its
quantised tensor class and dequantise on every forward.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from host.adapters import Case, build_case
from host.helpers import apply, load, module_at, module_outputs, rel_err, sample_input, unload_all

GGUF_PACK = "comfyui_gguf_under_test"
LINEAR = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"

pytestmark = pytest.mark.usefixtures("quiet_warnings")


def gguf_pack_path(host_path: str) -> str | None:
    for path in (os.environ.get("COMFYUI_GGUF_PATH"), os.path.join(host_path, "custom_nodes", "ComfyUI-GGUF"),
                 "/opt/ComfyUI-GGUF"):
        if path and os.path.isfile(os.path.join(path, "nodes.py")):
            return path
    return None


@pytest.fixture(scope="module")
def gguf_nodes(comfy_host):
    path = gguf_pack_path(comfy_host)
    if path is None:
        pytest.skip("ComfyUI-GGUF not found (set COMFYUI_GGUF_PATH or put it in the host's custom_nodes)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the `gguf` package is not installed (ComfyUI-GGUF needs it)")
    if GGUF_PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(GGUF_PACK, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[GGUF_PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[f"{GGUF_PACK}.nodes"]


def write_gguf(model, path: str) -> None:
    """The UNet's weights as a GGUF file: Q8_0 for Linear weights (rows of 32-multiples), F32 else."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="sd1")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, tensor in model.model.diffusion_model.state_dict().items():
        data = tensor.detach().float().numpy()
        linear = tensor.ndim == 2 and tensor.shape[1] % 32 == 0
        qtype = gguf.GGMLQuantizationType.Q8_0 if linear else gguf.GGMLQuantizationType.F32
        writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_unet(gguf_nodes, sd15, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("unet_gguf")
    write_gguf(sd15[0], str(folder / "sd15-test-Q8_0.gguf"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    folder_paths.folder_names_and_paths["unet_gguf"][0].append(str(folder))
    (model,) = gguf_nodes.UnetLoaderGGUF().load_unet("sd15-test-Q8_0.gguf")
    module = module_at(model.model, LINEAR)
    assert type(module.weight).__name__ == "GGMLTensor" and module.weight.dtype == torch.uint8
    return model


def dense_weight(module) -> torch.Tensor:
    """The layer's own dequantisation (no patches attached outside a load)."""
    return module.cast_bias_weight(dtype=torch.float32, device=torch.device("cpu"))[0]


@pytest.mark.parametrize("case", [Case("lora"), Case("lora", (("dora", "out"),)), Case("lokr"),
                                  Case("lora", (("dora", "in"),)), Case("diag-oft")], ids=lambda c: c.id)
@pytest.mark.parametrize("mode", ["auto", "merge"])
def test_gguf_layer_matches_the_merge_of_its_dequantised_weight(gguf_unet, case, mode):
    """auto bypasses the GGUF layer and merge patches it on the fly (the pack applies weight patches
    after dequantising, on every forward); both equal our merge of the dequantised weight."""
    model = gguf_unet
    module = module_at(model.model, LINEAR)
    files = build_case(case, model, None, sites={"linear": LINEAR})
    assert list(files.targets.values()) == [LINEAR]
    strength = 0.8
    unload_all()
    new_model, _, report = apply(model, None, files.tensors, strength, 0.0, mode)
    if mode == "auto":
        assert "1 bypassed" in report and "GGMLTensor storage" in report, report
    load(new_model)
    got = module_outputs(new_model, None, [LINEAR])[LINEAR]
    from lycoris_core import load_file

    (adapter,) = load_file(files.tensors).values()
    unload_all()
    dense = dense_weight(module)
    with torch.inference_mode():
        want = F.linear(sample_input(module), adapter.merge(dense, strength), module.bias.float())
        base = F.linear(sample_input(module), dense, module.bias.float())
    assert rel_err(got, base) > 1e-3  # the adapter did something
    assert rel_err(got, want) < 1e-4
    assert type(module.weight).__name__ == "GGMLTensor"  # storage never replaced


def test_gguf_unet_strength_zero_is_the_plain_model(gguf_unet):
    from host.helpers import unet_output

    files = build_case(Case("lora", (("dora", "out"),)), gguf_unet, None, sites={"linear": LINEAR})
    plain = unet_output(gguf_unet)
    zero, _, _ = apply(gguf_unet, None, files.tensors, 0.0, 0.0, "auto")
    one, _, _ = apply(gguf_unet, None, files.tensors, 1.0, 0.0, "auto")
    assert torch.equal(unet_output(zero), plain)
    assert rel_err(unet_output(one), plain) > 1e-5
    unload_all()
