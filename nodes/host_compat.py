"""What differs between the ComfyUI versions we run on, detected by feature (never by version).

Everything else in `nodes/` asks this module instead of probing the host itself, so the next host
change is one place to edit. Each function says which hosts have the feature it looks for.
"""
from __future__ import annotations

import contextlib
import importlib
import sys

import torch

STANDARD_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _optional(module: str, name: str):
    """`module.name` when the host has it, else None."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(found, name, None)


# ----- files -----------------------------------------------------------------------------------------
def key_converter():
    """The host's LoRA state-dict conversion run before its own key mapping (`comfy.lora_convert.
    convert_lora`: BFL Flux control, Wan-Fun, USO; newer hosts add fused-qkv splits), or None."""
    convert = _optional("comfy.lora_convert", "convert_lora")
    return convert if callable(convert) else None


def read_adapters(path: str):
    """An adapter file as the host would see it: its key conversion first, then ours."""
    from ..lycoris_core import load_file

    return load_file(path, convert=key_converter())


# ----- weight storage --------------------------------------------------------------------------------
def quantized_tensor_type():
    """comfy-kitchen's QuantizedTensor as the host uses it (v0.8.0 and later), or None."""
    return _optional("comfy.quant_ops", "QuantizedTensor")


def storage_reason(module: torch.nn.Module, name: str = "weight") -> str | None:
    """Why `module`'s stored `name` is not the tensor it computes with (fp8, scaled fp8 as custom
    weight ops or as the host's QuantizedTensor, GGUF and other tensor subclasses), or None for
    plain float storage."""
    if any(callable(getattr(module, f"{op}_{name}", None)) for op in ("set", "convert")):
        return "custom weight op"
    weight = getattr(module, name, None)
    if weight is None:
        return None
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"{type(weight).__name__} storage"
    if weight.dtype not in STANDARD_FLOATS:
        return f"{str(weight.dtype).replace('torch.', '')} storage"
    return None


def stored_float_dtype(root: torch.nn.Module, key: str) -> torch.dtype | None:
    """The dtype of the weight at `key` when it is plain float storage (what a merged weight is
    cast back to, and what the layer computes in), else None (other storage, or no such weight)."""
    import comfy.utils

    path, _, name = key.rpartition(".")
    try:
        module = comfy.utils.get_attr(root, path)
    except AttributeError:
        return None
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor) or storage_reason(module, name) is not None:
        return None
    return weight.dtype


def dequantiser(module: torch.nn.Module):
    """device -> the fp32 weight `module` computes with, the way the host gets it: the layer's own
    `cast_bias_weight` (GGUF-style layers dequantise and apply their patches there), else the host's
    cast with the module's weight functions (QuantizedTensor weights dequantise there), then the
    op's `convert_weight` (a125cd8's scaled fp8)."""
    import comfy.ops

    quantized = quantized_tensor_type()  # looked up once, not on every forward

    def dense(device: torch.device) -> torch.Tensor:
        own = getattr(type(module), "cast_bias_weight", None)
        if callable(own):
            weight = module.cast_bias_weight(dtype=torch.float32, device=device)[0]
        elif hasattr(module, "weight_function"):
            weight = comfy.ops.cast_bias_weight(module, dtype=torch.float32, device=device)[0]
        else:
            weight = module.weight.to(device=device, dtype=torch.float32)
        if quantized is not None and isinstance(weight, quantized):
            weight = weight.dequantize()
        convert = getattr(module, "convert_weight", None)
        if callable(convert):
            if weight.data_ptr() == module.weight.data_ptr():
                weight = weight.clone()  # never scale the stored weight in place
            weight = convert(weight, inplace=True)
        return weight.to(torch.float32)

    return dense


def weight_is_cast_per_forward(module: torch.nn.Module) -> bool:
    """Whether the host builds this layer's weight on each forward instead of storing it patched:
    lowvram puts other loaders' merge patches in `weight_function`; dynamic VRAM (newer hosts on
    NVIDIA) streams weights through a VRAM buffer it marks with `_v`."""
    return bool(getattr(module, "weight_function", None)) or hasattr(module, "_v")


def cast_bias(module: torch.nn.Module, device: torch.device) -> torch.Tensor | None:
    """The bias a layer computes with, through the host's cast (its `bias_function` patches, a
    dynamic-VRAM layer's streamed copy) when it casts per forward; else the stored bias."""
    bias = getattr(module, "bias", None)
    if bias is None or not (getattr(module, "bias_function", None) or hasattr(module, "_v")):
        return bias
    import comfy.ops

    return comfy.ops.cast_bias_weight(module, dtype=torch.float32, device=device)[1]


def dequantiser_for(module: torch.nn.Module):
    """`dequantiser(module)` where the stored weight is not what the layer computes with (quantised
    storage, or a weight the host casts per forward), None for plain float weights used as stored."""
    if storage_reason(module) or weight_is_cast_per_forward(module):
        return dequantiser(module)
    return None


# ----- training --------------------------------------------------------------------------------------
@contextlib.contextmanager
def training_flag():
    """The host's "a training run is on" flag (`comfy.model_management.in_training`, newer hosts)
    set for the duration, restored after; a no-op on hosts without it."""
    mm = importlib.import_module("comfy.model_management")
    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


# comfy_kitchen's fused interleaved RoPE: out = F x per channel pair, F a 2x2 block of freqs_cis
KITCHEN_ROPE_OPS = {"apply_rope": 2, "apply_rope1": 1}  # op -> number of rotated inputs
_rope_checked: set[str] = set()


def _rope_backward(ctx, *grads):
    """Input gradients of a pairwise rotation: the same op with each 2x2 block transposed."""
    op = getattr(torch.ops.comfy_kitchen, ctx.op_name)
    out = op(*grads, ctx.freqs.transpose(-1, -2).contiguous())
    return (*(out if isinstance(out, (tuple, list)) else (out,)), None)


def _lacks_backward(op, inputs: int) -> bool:
    """Whether backpropagating through `op` fails for want of an autograd formula."""
    x = torch.randn(1, 1, 2, 4, requires_grad=True)
    freqs = torch.randn(1, 1, 2, 2, 2, 2)
    with torch.inference_mode(False), torch.enable_grad():
        out = op(*([x] * inputs), freqs)
        first = out[0] if isinstance(out, (tuple, list)) else out
        try:
            torch.autograd.grad(first.sum(), x)
        except RuntimeError as e:
            if "autograd" not in str(e):
                raise
            return True
    return False


def differentiable_rope() -> list[str]:
    """Give comfy_kitchen's fused RoPE ops a backward where the installed version has none (hosts
    around v0.8.0 call them unconditionally; newer hosts use plain torch while `in_training`).
    RoPE is a fixed rotation of the input, so its input gradient is the transposed rotation.
    Returns the ops given one; a no-op without comfy_kitchen or when its ops already have one."""
    kitchen = getattr(torch.ops, "comfy_kitchen", None)
    added = []
    for name, inputs in KITCHEN_ROPE_OPS.items():
        if name in _rope_checked:
            continue
        _rope_checked.add(name)
        try:
            op = getattr(kitchen, name)
        except (AttributeError, RuntimeError):
            continue
        if not _lacks_backward(op, inputs):
            continue

        def setup_context(ctx, inputs, output, name=name):
            ctx.op_name = name
            ctx.freqs = inputs[-1]

        torch.library.register_autograd(f"comfy_kitchen::{name}", _rope_backward, setup_context=setup_context)
        added.append(name)
    return added


# ----- UI --------------------------------------------------------------------------------------------
def send_progress_text(text: str, unique_id) -> None:
    """Text under the node (the host's progress text, where the server has it); a no-op in scripts."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and unique_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, unique_id)


def latent_rgb_previewer(latent_format):
    """The host's linear latent-to-RGB previewer for a latent format (None when the format has no
    factors). Newer hosts (v0.8.0) also take `latent_rgb_factors_reshape`, for packed latents."""
    import latent_preview

    if latent_format.latent_rgb_factors is None:
        return None
    args = [latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias]
    reshape = getattr(latent_format, "latent_rgb_factors_reshape", None)
    if reshape is not None:
        args.append(reshape)
    return latent_preview.Latent2RGBPreviewer(*args)
