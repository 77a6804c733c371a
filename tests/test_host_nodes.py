"""The Load LyCORIS nodes inside a real ComfyUI: definitions, bad input, reports, key spellings."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from host.adapters import Case, build_case
from host.helpers import load, pack_module, unload_all, weights

NODE_IDS = ("LycorisLoader", "LycorisLoaderModelOnly")


pytestmark = pytest.mark.usefixtures("quiet_warnings")


@pytest.fixture(scope="module")
def lora_files(sd15):
    """kohya-named LoRA files (UNet + CLIP) for the SD1.5 test model."""
    return build_case(Case("lora"), sd15[0], sd15[1])


def _save(loras_dir, name, tensors) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(loras_dir, name))
    return name


def _node(cls_name="LoadLycoris"):
    return getattr(pack_module("nodes.loaders"), cls_name)()


def test_nodes_are_registered_with_tooltips_on_every_input(lycoris_pack, loras_dir):
    mappings = lycoris_pack.NODE_CLASS_MAPPINGS
    for node_id in NODE_IDS:
        cls = mappings[node_id]
        assert lycoris_pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Load LyCORIS")
        assert cls.CATEGORY == "loaders/lycoris" and cls.DESCRIPTION
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (kind, options) in types.get(section, {}).items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert types["optional"]["block_weights"][0] == "LYCORIS_BLOCK_WEIGHTS"
        assert types["required"]["mode"][0] == ["auto", "merge", "bypass"]
        assert cls.RETURN_TYPES[-1] == "STRING" and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION))
    assert mappings["LycorisLoader"].RETURN_TYPES == ("MODEL", "CLIP", "STRING")
    assert mappings["LycorisLoaderModelOnly"].RETURN_TYPES == ("MODEL", "STRING")


def test_missing_file_is_a_clear_error(sd15, loras_dir):
    model, clip, _ = sd15
    with pytest.raises(FileNotFoundError, match="no_such_lycoris"):
        _node().load(model, clip, "no_such_lycoris.safetensors", 1.0, 1.0, "auto")


def test_corrupt_file_is_a_clear_error(sd15, loras_dir):
    from lycoris_core import LycorisFormatError

    model, clip, _ = sd15
    with open(os.path.join(loras_dir, "corrupt.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LycorisFormatError, match="corrupt.safetensors"):
        _node().load(model, clip, "corrupt.safetensors", 1.0, 1.0, "auto")


def test_file_for_another_architecture_names_the_unmatched_keys(sd15, loras_dir):
    """Flux-style names: nothing matches, the error lists them grouped; inputs stay untouched."""
    from lycoris_core import LycorisError

    model, clip, _ = sd15
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(3):
        for part in ("img_attn_qkv", "txt_mlp_0"):
            name = f"lora_unet_double_blocks_{i}_{part}"
            tensors[f"{name}.lora_up.weight"] = torch.randn(64, 4, generator=g)
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, 64, generator=g)
    _save(loras_dir, "flux_like.safetensors", tensors)
    with pytest.raises(LycorisError) as err:
        _node().load(model, clip, "flux_like.safetensors", 1.0, 1.0, "merge")
    text = str(err.value)
    assert "flux_like.safetensors" in text and "no module of this file matches" in text
    assert "3 x lora_unet_double_blocks_#_img_attn_qkv" in text
    assert not model.patches and not model.injections


def test_wrong_shapes_fail_before_any_patch(sd15, loras_dir, lora_files):
    """SD2-width cross attention on SD1.5: one bad module and nothing at all is applied."""
    from lycoris_core import LycorisShapeError

    model, clip, _ = sd15
    tensors = dict(lora_files.tensors)
    bad = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"
    tensors[f"{bad}.lora_up.weight"] = torch.zeros(320, 4)
    tensors[f"{bad}.lora_down.weight"] = torch.zeros(4, 1024)  # SD2 text width
    _save(loras_dir, "sd2_width.safetensors", tensors)
    for mode in ("merge", "bypass"):
        with pytest.raises(LycorisShapeError) as err:
            _node().load(model, clip, "sd2_width.safetensors", 1.0, 1.0, mode)
        assert bad in str(err.value) and "nothing was applied" in str(err.value)
    assert not model.patches and not model.injections and not clip.patcher.patches


def test_partly_unmatched_file_warns_once_and_reports_counts(sd15, loras_dir, lora_files, caplog):
    model, clip, _ = sd15
    tensors = dict(lora_files.tensors)
    for i in range(4):
        tensors[f"lora_unet_not_a_block_{i}_proj.lora_up.weight"] = torch.zeros(8, 2)
        tensors[f"lora_unet_not_a_block_{i}_proj.lora_down.weight"] = torch.zeros(2, 8)
    _save(loras_dir, "partly.safetensors", tensors)
    with caplog.at_level(logging.INFO, logger="comfyui-lycoris"):
        out = _node().load(model, clip, "partly.safetensors", 1.0, 1.0, "merge")
    new_model, new_clip, report = out["result"]
    assert out["ui"]["text"] == [report]
    assert "UNMATCHED: 4 modules" in report and "4 x lora_unet_not_a_block_#_proj" in report
    unet = [k for k in lora_files.targets.values() if not k.startswith("clip_")]
    assert f"model (strength 1): {len(unet)} merged" in report
    warnings_logged = [r for r in caplog.records
                       if r.levelno == logging.WARNING and "UNMATCHED" in r.getMessage()]
    assert len(warnings_logged) == 1
    assert new_model is not model and new_clip is not clip and not model.patches


def test_model_only_loader_skips_text_encoder_modules_quietly(sd15, loras_dir, lora_files):
    model = sd15[0]
    name = _save(loras_dir, "with_te.safetensors", lora_files.tensors)
    new_model, report = _node("LoadLycorisModelOnly").load_model_only(model, name, 1.0, "merge")["result"]
    te = [n for n in lora_files.targets if n.startswith("lora_te_")]
    assert te and "UNMATCHED" not in report
    assert f"skipped: {len(te)} text-encoder modules (no CLIP input)" in report
    assert new_model is not model


def _renamed(tensors, rename):
    return {rename(k): v for k, v in tensors.items()}


def test_other_spellings_of_module_names_map_to_the_same_weights(sd15, originals):
    """peft/diffusers (`unet.…lora_A`, magnitude vector), SimpleTuner `lycoris_`, OneTrainer
    `lora_transformer_` names give exactly the kohya result."""
    import comfy.utils

    model, clip, _ = sd15
    files = build_case(Case("lora", (("dora", "out"),)), model, None)
    kohya = {k: v for k, v in files.tensors.items() if not k.endswith(".alpha")}
    reference = pack_module("nodes.apply").apply_lycoris
    # the host's diffusers <-> LDM table; peft paths keep `to_out.0`, which the host map lacks
    to_diffusers = {"diffusion_model." + ldm: d for d, ldm in
                    comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}

    def peft(key):
        name, suffix = key.split(".", 1)
        diffusers = "unet." + to_diffusers[files.targets[name]][: -len(".weight")]
        suffix = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight",
                  "dora_scale": "lora_magnitude_vector"}[suffix]
        return f"{diffusers}.{suffix}"

    peft_tensors = _renamed(kohya, peft)
    for k in [k for k in peft_tensors if k.endswith("lora_magnitude_vector")]:
        peft_tensors[k] = peft_tensors[k].reshape(-1)  # peft stores the magnitude 1-d
    spellings = {
        "peft": peft_tensors,
        "lycoris_": _renamed(kohya, lambda k: k.replace("lora_unet_", "lycoris_", 1)),
        "lora_transformer_": _renamed(kohya, lambda k: k.replace("lora_unet_", "lora_transformer_", 1)),
    }
    from lycoris_core import load_file

    keys = list(files.targets.values())
    base = {key: originals[key] for key in keys}  # read before loading
    expected_model = reference(model, None, load_file(kohya), 1.0, 0.0, "merge")[0]
    load(expected_model)
    expected = weights(expected_model.model, keys)
    for label, tensors in spellings.items():
        new_model, _, report = reference(model, None, load_file(tensors), 1.0, 0.0, "merge")
        assert "UNMATCHED" not in report, f"{label}: {report}"
        load(new_model)
        got = weights(new_model.model, keys)
        for key in keys:
            assert torch.equal(got[key], expected[key]), f"{label} {key}"
            assert not torch.equal(got[key], base[key])
    unload_all()


def test_block_weights_multiply_the_strength_per_module(sd15, originals, lora_files):
    from lycoris_core import load_file

    model, clip, _ = sd15
    adapters = load_file(lora_files.tensors)
    half = next(n for n in lora_files.targets if "resnets" in n)
    seen = []

    class Blocks:
        def strength(self, module_name, model_key):
            seen.append((module_name, model_key))
            return 0.5 if module_name == half else 1.0

    new_model, new_clip, report = pack_module("nodes.apply").apply_lycoris(
        model, clip, adapters, 0.8, 1.0, "merge", Blocks())
    assert sorted(seen) == sorted(lora_files.targets.items())
    base = {key: originals[key] for key in lora_files.targets.values()}  # read before loading
    load(new_model, new_clip.patcher)
    for name, key in lora_files.targets.items():
        root = new_clip.cond_stage_model if key.startswith("clip_") else new_model.model
        strength = (1.0 if key.startswith("clip_") else 0.8) * (0.5 if name == half else 1.0)
        w0 = base[key]
        assert torch.equal(weights(root, [key])[key], adapters[name].merge(w0.float(), strength).to(w0.dtype))
    unload_all()


def test_node_reuses_the_parsed_file_until_it_changes(sd15, loras_dir, lora_files):
    model, clip, _ = sd15
    name = _save(loras_dir, "cached.safetensors", lora_files.tensors)
    node = _node()
    first = node.adapters(name)
    assert node.adapters(name) is first
    signature = type(node).IS_CHANGED(lycoris_name=name)
    path = os.path.join(loras_dir, name)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert type(node).IS_CHANGED(lycoris_name=name) != signature
    assert node.adapters(name) is not first
