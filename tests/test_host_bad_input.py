"""Broken and hostile files through the Load LyCORIS node inside a real ComfyUI: the node raises a
clear error (ComfyUI shows it on the node), never blocks, never patches half a model."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from host.helpers import load, pack_module, unload_all, weights

pytestmark = pytest.mark.usefixtures("quiet_warnings")

UNET = "lora_unet_down_blocks_0_attentions_0_proj_in"
UNET_KEY = "diffusion_model.input_blocks.1.1.proj_in.weight"
CLIP = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
CLIP_KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def _lora(name: str, shape, value: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rank-1 LoRA tensors for a weight of `shape`: random, or every factor entry `value`."""
    out_dim, in_dim = shape[0], int(torch.tensor(shape[1:]).prod())
    g = torch.Generator().manual_seed(seed)
    up, down = torch.randn(out_dim, 1, generator=g) * 0.01, torch.randn(1, in_dim, generator=g)
    if value is not None:
        up, down = torch.full_like(up, value), torch.full_like(down, value)
    return {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
            f"{name}.alpha": torch.tensor(1.0)}


def _shape(root, key):
    import comfy.utils

    return tuple(comfy.utils.get_attr(root, key).shape)


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _node():
    return pack_module("nodes.loaders").LoadLycoris()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_named_pipe_in_the_loras_folder_is_refused_without_blocking(sd15, loras_dir):
    from lycoris_core import LycorisFormatError

    model, clip, _ = sd15
    os.mkfifo(os.path.join(loras_dir, "pipe.safetensors"))
    result: dict = {}

    def call():
        try:
            _node().load(model, clip, "pipe.safetensors", 1.0, 1.0, "auto")
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the loader blocked on a named pipe"
    error = result.get("error")
    # hosts list only regular files in the loras folder: theirs says "not found", ours (reached
    # when a host resolves the name anyway) says what the path is
    assert type(error) in (FileNotFoundError, LycorisFormatError), error
    assert "pipe.safetensors" in str(error)
    if type(error) is LycorisFormatError:
        assert "is a named pipe, not a regular file" in str(error)
    assert not model.patches and not clip.patcher.patches


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_products_that_overflow_are_refused_before_any_patch(sd15, loras_dir, mode):
    """Finite factors: one CLIP module beyond fp16 (the CLIP weights' dtype), one UNet module
    beyond fp32; a good module beside them. Nothing is applied, both bad modules are named."""
    from lycoris_core import LycorisOverflowError

    model, clip, _ = sd15
    clip_root = clip.patcher.model
    good = "lora_unet_down_blocks_0_attentions_0_proj_out"
    good_key = "diffusion_model.input_blocks.1.1.proj_out.weight"
    tensors = (_lora(CLIP, _shape(clip_root, CLIP_KEY), 300.0)
               | _lora(UNET, _shape(model.model, UNET_KEY), 1e20)
               | _lora(good, _shape(model.model, good_key)))
    path = os.path.join(loras_dir, "overflow.safetensors")
    save_file(tensors, path)
    before = _digest(path)
    with pytest.raises(LycorisOverflowError) as err:
        _node().load(model, clip, "overflow.safetensors", 1.0, 1.0, mode)
    text = str(err.value)
    assert "overflow.safetensors" in text and "nothing was applied" in text
    assert UNET in text and "NaN or Inf" in text
    clip_dtype = weights(clip_root, [CLIP_KEY])[CLIP_KEY].dtype
    if clip_dtype == torch.float16:
        assert CLIP in text and "beyond the range of float16" in text
    assert good not in text
    assert not model.patches and not model.injections and not clip.patcher.patches
    assert _digest(path) == before


def test_merge_patch_beyond_the_weight_dtype_keeps_the_models_weight(sd15, originals):
    """Past the node's check (a patch added directly): the host's load raises naming file and
    module, and the model's weight at that key is the original one."""
    from lycoris_core import LycorisOverflowError, load_file

    model = sd15[0]
    Target = pack_module("nodes.keymap").Target
    add_merge_patches = pack_module("nodes.merge_patch").add_merge_patches
    shape = _shape(model.model, UNET_KEY)
    adapter = load_file(_lora(UNET, shape, 1e20))[UNET]
    clone = model.clone()
    add_merge_patches(clone, [(Target(UNET, adapter, "model", UNET_KEY), 1.0, False)], "model")
    with pytest.raises(LycorisOverflowError) as err:
        load(clone)
    assert UNET in str(err.value) and "NaN or Inf" in str(err.value)
    assert torch.equal(weights(model.model, [UNET_KEY])[UNET_KEY], originals[UNET_KEY])
    unload_all()
    assert torch.equal(weights(model.model, [UNET_KEY])[UNET_KEY], originals[UNET_KEY])


def test_module_named_only_dots_is_reported_as_matching_no_layer(sd15, loras_dir):
    model, clip, _ = sd15
    tensors = {f"..{k.split('.', 1)[1]}": v for k, v in _lora(UNET, (4, 4)).items()}
    tensors |= _lora(UNET, _shape(model.model, UNET_KEY))
    save_file(tensors, os.path.join(loras_dir, "dots.safetensors"))
    out = _node().load(model, clip, "dots.safetensors", 1.0, 1.0, "merge")
    report = out["result"][-1]
    assert "module name '.'" in report and "matches no layer" in report, report
    assert "1 merged" in report
    unload_all()


def _weight_dependent(algo: str, name: str, shape) -> dict[str, torch.Tensor]:
    """Finite fp32 factors whose change, computed from the layer's weight, is ~1e8 times it: GLoRA
    with A1 A2 = 1e8 (every entry), or Diag-OFT with no rotation and a rescale of 1e8."""
    out_dim, in_dim = shape
    if algo == "glora":
        return {f"{name}.a1.weight": torch.full((in_dim, 1), 1e4),
                f"{name}.a2.weight": torch.full((1, in_dim), 1e4),
                f"{name}.b1.weight": torch.zeros(out_dim, 1), f"{name}.b2.weight": torch.zeros(1, in_dim),
                f"{name}.alpha": torch.tensor(1.0)}
    return {f"{name}.oft_blocks": torch.zeros(out_dim // 8, 8, 8),
            f"{name}.rescale": torch.full((out_dim,), 1e8), f"{name}.alpha": torch.tensor(0.0)}


@pytest.mark.parametrize("algo", ["glora", "diag-oft"])
def test_bypass_of_a_weight_dependent_change_beyond_fp16_is_refused_before_any_patch(
        sd15, loras_dir, algo):
    """GLoRA and OFT changes depend on the layer's weight: the node bounds them with its max |W|,
    so on the fp16 CLIP a bypass whose output would leave fp16 is refused, naming the module,
    and nothing is patched."""
    from lycoris_core import LycorisOverflowError

    model, clip, _ = sd15
    clip_root = clip.patcher.model
    assert weights(clip_root, [CLIP_KEY])[CLIP_KEY].dtype == torch.float16
    good = "lora_unet_down_blocks_0_attentions_0_proj_out"
    good_key = "diffusion_model.input_blocks.1.1.proj_out.weight"
    tensors = (_weight_dependent(algo, CLIP, _shape(clip_root, CLIP_KEY))
               | _lora(good, _shape(model.model, good_key)))
    path = os.path.join(loras_dir, f"{algo}-overflow.safetensors")
    save_file(tensors, path)
    with pytest.raises(LycorisOverflowError) as err:
        _node().load(model, clip, f"{algo}-overflow.safetensors", 1.0, 1.0, "bypass")
    text = str(err.value)
    assert f"{algo}-overflow.safetensors" in text and "nothing was applied" in text
    assert CLIP in text and "beyond the range of float16" in text and good not in text
    assert not model.patches and not model.injections and not clip.patcher.patches
    assert not clip.patcher.injections
