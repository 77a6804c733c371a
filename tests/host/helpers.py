"""Small helpers for host tests: apply through our pack, load through the host, read weights/outputs."""
from __future__ import annotations

import sys

import torch

from .host import PACK_MODULE, import_pack

SIGMA = 5.0


def pack_module(name: str):
    """A module of the pack imported under test (e.g. "nodes.apply")."""
    import_pack()
    return sys.modules[f"{PACK_MODULE}.{name}"]


def apply(model, clip, tensors_or_file, strength_model=1.0, strength_clip=1.0, mode="auto",
          block_weights=None):
    """apply_lycoris on a state dict (read with our core) or an AdapterFile."""
    from lycoris_core import load_file

    adapters = tensors_or_file if hasattr(tensors_or_file, "adapters") else load_file(tensors_or_file)
    return pack_module("nodes.apply").apply_lycoris(model, clip, adapters, strength_model,
                                                     strength_clip, mode, block_weights)


def root_of(key: str, model, clip):
    """(patcher, torch root) that holds a state-dict key: CLIP keys start with the encoder name."""
    if key.startswith("clip_"):
        return clip.patcher, clip.cond_stage_model
    return model, model.model


def module_at(root, key: str) -> torch.nn.Module:
    import comfy.utils

    return comfy.utils.get_attr(root, key[: -len(".weight")] if key.endswith(".weight") else key)


def load(*patchers) -> None:
    """Load patchers the way sampling / text encoding does (patches and injections applied), in
    inference mode like the server's prompt execution."""
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.load_models_gpu(list(patchers))


def unload_all() -> None:
    """Unload every model: weights restored from backups, injections ejected; in inference mode like
    the server's prompt execution (v0.8.0 cannot re-wrap QuantizedTensor weights outside it)."""
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.unload_all_models()


def weights(root, keys) -> dict[str, torch.Tensor]:
    import comfy.utils

    return {k: comfy.utils.get_attr(root, k).detach().clone() for k in keys}


class Originals:
    """Unpatched weights of the shared SD1.5 model: the host's backup when a clone has patched a
    weight (every clone of a model shares that backup), else the weight itself."""

    def __init__(self, model, clip):
        self.model, self.clip = model, clip
        self._cache: dict[str, torch.Tensor | None] = {}

    def __getitem__(self, key: str) -> torch.Tensor | None:
        if key not in self._cache:
            import comfy.utils

            patcher, root = root_of(key, self.model, self.clip)
            backup = patcher.backup.get(key)
            try:
                weight = backup.weight if backup is not None else comfy.utils.get_attr(root, key)
            except AttributeError:
                weight = None
            self._cache[key] = None if weight is None else weight.detach().clone()
        return self._cache[key]


def sample_input(module: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """A small fp32 input batch for a Linear / Conv2d / norm layer."""
    g = torch.Generator().manual_seed(seed)
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear) or (weight is not None and weight.ndim == 2):
        return torch.randn(2, 5, weight.shape[1], generator=g)  # also Linears of custom op sets
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(1, module.in_channels, 8, 8, generator=g)
    if isinstance(module, torch.nn.GroupNorm):
        return torch.randn(1, module.num_channels, 8, 8, generator=g)
    if isinstance(module, torch.nn.LayerNorm):
        return torch.randn(2, 5, *module.normalized_shape, generator=g)
    raise TypeError(f"no sample input for {type(module).__name__}")


def module_outputs(model, clip, keys, seed: int = 0) -> dict[str, torch.Tensor]:
    """Forward of each targeted layer on a fixed input (whatever patches/injections are loaded)."""
    out = {}
    with torch.inference_mode():
        for i, key in enumerate(keys):
            module = module_at(root_of(key, model, clip)[1], key)
            out[key] = module(sample_input(module, seed + i)).float()
    return out


def unet_inputs(seed: int = 0):
    """An 8x8 latent, a sigma and a random text context for the SD1.5 UNet."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([SIGMA]),
            torch.randn(1, 77, 768, generator=g))


def unet_output(model, seed: int = 0) -> torch.Tensor:
    """The UNet's prediction through the host (load with patches/injections, apply_model)."""
    load(model)
    x, sigma, context = unet_inputs(seed)
    with torch.inference_mode():
        return model.model.apply_model(x, sigma, c_crossattn=context).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def scaled_fp8_unet(model):
    """`model`'s UNet as a scaled-fp8 checkpoint (the host's `scaled_fp8` marker, fp8 Linear
    weights with per-layer `scale_weight` far from 1), loaded by the host's own loader."""
    import comfy.sd

    source = model.model.diffusion_model
    sd = {k: v.detach().float().clone() for k, v in source.state_dict().items()}
    for name, module in source.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = sd[f"{name}.weight"]
            scale = w.abs().amax() / 64  # stored values well inside fp8 range, scales ~1e-3..1e-2
            sd[f"{name}.weight"] = (w / scale).to(torch.float8_e4m3fn)
            sd[f"{name}.scale_weight"] = scale.reshape(())
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    # as the host's executor loads models: newer hosts' quantised layers fail to move otherwise
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})


def _is_quantized_tensor(weight) -> bool:
    """The host's QuantizedTensor (newer hosts): a wrapper subclass reporting the logical dtype."""
    return callable(getattr(weight, "dequantize", None)) and "Quantized" in type(weight).__name__


def _inner_tensors(weight) -> list[torch.Tensor]:
    """The stored tensors of a wrapper tensor subclass (the weight itself for plain tensors)."""
    flatten = getattr(weight, "__tensor_flatten__", None)
    return [getattr(weight, n) for n in flatten()[0]] if callable(flatten) else [weight]


def is_fp8_storage(weight) -> bool:
    """Stored as fp8: a plain fp8 tensor (older hosts) or the host's QuantizedTensor (newer hosts)."""
    return weight.dtype == torch.float8_e4m3fn or _is_quantized_tensor(weight)


def stored_bytes(weight) -> torch.Tensor:
    """The raw stored values of a weight (every inner tensor of a tensor subclass), to check that
    nothing rewrote them."""
    return torch.cat([t.detach().reshape(-1).view(torch.uint8) for t in _inner_tensors(weight)]).clone()


def raw_fp8_values(weight) -> torch.Tensor:
    """The stored fp8 values as fp32, without any scale."""
    with torch.inference_mode():
        return _inner_tensors(weight)[0].float()


def fp8_dense(module) -> torch.Tensor:
    """The fp32 weight a scaled-fp8 layer computes with, by the host's own means: the
    QuantizedTensor's dequantize() (newer hosts) or stored values x scale_weight (older hosts)."""
    weight = module.weight
    with torch.inference_mode():  # the host loads models in inference mode
        if _is_quantized_tensor(weight):
            return weight.dequantize().float()
        return weight.float() * module.scale_weight.float()
