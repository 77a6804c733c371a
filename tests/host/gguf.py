"""city96's ComfyUI-GGUF for host tests: find and import the pack, write a UNet as a GGUF file."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

PACK_MODULE = "comfyui_gguf_under_test"
FILE_NAME = "sd15-test-Q8_0.gguf"


def pack_path(host_path: str) -> str | None:
    """$COMFYUI_GGUF_PATH, the host's custom_nodes/ComfyUI-GGUF or /opt/ComfyUI-GGUF."""
    for path in (os.environ.get("COMFYUI_GGUF_PATH"), os.path.join(host_path, "custom_nodes", "ComfyUI-GGUF"),
                 "/opt/ComfyUI-GGUF"):
        if path and os.path.isfile(os.path.join(path, "nodes.py")):
            return path
    return None


def missing_reason(host_path: str) -> str | None:
    if pack_path(host_path) is None:
        return "ComfyUI-GGUF not found (set COMFYUI_GGUF_PATH or put it in the host's custom_nodes)"
    if importlib.util.find_spec("gguf") is None:
        return "the `gguf` package is not installed (ComfyUI-GGUF needs it)"
    return None


def import_nodes(host_path: str):
    """The pack's `nodes` module, the pack imported as a package the way the host would."""
    if PACK_MODULE not in sys.modules:
        path = pack_path(host_path)
        spec = importlib.util.spec_from_file_location(PACK_MODULE, os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    return sys.modules[f"{PACK_MODULE}.nodes"]


def write_unet(model, path: str) -> None:
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


def dense_weight(module) -> torch.Tensor:
    """A GGUF layer's own dequantisation (no patches are attached outside a load)."""
    return module.cast_bias_weight(dtype=torch.float32, device=torch.device("cpu"))[0]
