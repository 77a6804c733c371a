"""LyCORIS Train with algorithm "dylora" inside a real ComfyUI, on the tiny SDXL UNet of
tests/host/dit.py (the Linear layers and 3x3 convs of its last output block, 8x8 latents, 2 steps).

Oracles: core ComfyUI's LoraLoader on the saved file (a plain LoRA), and the trained adapters'
own training forward at a cut: the file cut to rank 2 patches, in core and in our loader, exactly
the weights DyLoRA trained at rank 2. The metadata says the file was DyLoRA-trained, and with which
block size.
"""
from __future__ import annotations

import json

import pytest
import torch

from host import dit, dit_inputs
from host.helpers import apply, load, pack_module, rel_err, unload_all, weights

pytestmark = pytest.mark.usefixtures("quiet_and_unloaded")

RANK, BLOCK = 4, 2
LATE_BLOCKS = r"output_blocks_[78]_"  # resnet (3x3 convs, Linear) + transformer (Linear): backward stops there


@pytest.fixture(scope="module")
def run(lycoris_pack):
    """(model, trained adapters) of a 2-step DyLoRA run on the Linear layers and 3x3 convs of the
    UNet's last output block."""
    model = dit.load("sdxl")
    train = pack_module("nodes.train")
    with torch.inference_mode():
        _, lycoris, loss, _ = train.LycorisTrain().train(
            model=model, latents=dit_inputs.latents("sdxl", model), conditioning=dit_inputs.conditioning("sdxl"),
            algorithm="dylora", preset="custom", include_regex=LATE_BLOCKS, rank=RANK, alpha=2.0,
            conv_rank=RANK, conv_alpha=2.0,
            steps=2, batch_size=1, learning_rate=1e-2, optimizer="AdamW", lr_schedule="constant",
            warmup_steps=0, seed=0, gradient_checkpointing=True, training_dtype="auto",
            dylora_block_size=BLOCK, use_tucker=True)
    assert len(loss["loss"]) == 2
    return model, lycoris


def patched(model, keys) -> dict[str, torch.Tensor]:
    load(model)
    out = weights(model.model, keys)
    unload_all()
    return {k: v.float() for k, v in out.items()}


def test_node_offers_dylora_with_its_block_size(T):
    inputs = T.LycorisTrain.INPUT_TYPES()
    assert "dylora" in inputs["required"]["algorithm"][0]
    assert inputs["optional"]["dylora_block_size"][1]["default"] == 4


def test_metadata_says_dylora_and_the_block_size(run, tmp_path):
    from lycoris_core import load_file

    _, lycoris = run
    path = pack_module("nodes.save").save_lycoris(lycoris, "dylora/trained", torch.float32, root=str(tmp_path))
    saved = load_file(path, strict=True)
    assert {a.algo for a in saved.values()} == {"lora"} and {a.rank for a in saved.values()} == {RANK}
    assert saved.metadata["ss_network_args"] == lycoris.metadata["ss_network_args"]
    assert {a.algo for a in lycoris.values()} == {"dylora"}
    convs = [a for a in lycoris.values() if len(a.target_shape) == 4 and a.target_shape[2] == 3]
    assert convs and len(convs) < len(lycoris)  # LoCon on 3x3 convs and LoRA on Linear layers
    args = json.loads(lycoris.metadata["ss_network_args"])
    assert args["algo"] == "dylora" and args["block_size"] == str(BLOCK)
    assert "use_tucker" not in args  # an option DyLoRA does not take is not recorded


@pytest.mark.parametrize("rank", [RANK, BLOCK])
def test_file_and_its_cut_patch_alike_in_core_and_ours_as_trained(run, loras_dir, rank):
    import comfy.lora
    import nodes

    from lycoris_core import load_file

    save = pack_module("lycoris_core.save")  # the pack's own classes: its adapters are those
    truncated = pack_module("lycoris_core.train").truncated
    model, lycoris = run
    name = f"dylora_r{rank}.safetensors"
    save.save_file(truncated(save.collect_tensors(lycoris), rank), str(loras_dir / name), lycoris.metadata,
                   overwrite=True)
    loaded = load_file(str(loras_dir / name), strict=True)
    assert set(loaded) == set(lycoris) and {a.algo for a in loaded.values()} == {"lora"}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    keys = {n: key_map[n] for n in lycoris}
    base = weights(model.model, keys.values())
    ours = patched(apply(model, None, loaded, 1.0, 0.0, "merge")[0], keys.values())
    core = patched(nodes.LoraLoader().load_lora(model, None, name, 1.0, 0.0)[0], keys.values())
    changed = 0
    for module, key in keys.items():
        with torch.no_grad():
            p = lycoris[module].cut(rank // BLOCK)
            trained = (p["up_mat"] @ p["down_mat"]).reshape(base[key].shape)
        changed += float(trained.norm()) > 0  # a block no step drew is still zero
        # the change is ~1e-4 of the weight after 2 steps: fp32 rounding of W + dW is ~1e-3 of it
        assert rel_err(ours[key] - base[key].float(), trained) < 5e-3, module
        assert rel_err(core[key] - base[key].float(), trained) < 5e-3, module
    # each module's drawn block moved every step; a cut may hold only blocks no step drew (still 0)
    assert changed == len(keys) if rank == RANK else changed > 0


def test_resuming_the_file_goes_on_as_dylora(run, loras_dir):
    model, lycoris = run
    name = "dylora_resume.safetensors"
    pack_module("lycoris_core.save").save_file(lycoris, str(loras_dir / name), lycoris.metadata, overwrite=True)
    train = pack_module("nodes.train")
    with torch.inference_mode():
        _, resumed, loss, _ = train.LycorisTrain().train(
            model=model, latents=dit_inputs.latents("sdxl", model), conditioning=dit_inputs.conditioning("sdxl"),
            algorithm="lora", preset="custom", rank=8, alpha=1.0, conv_rank=8, conv_alpha=1.0, steps=1,
            batch_size=1, learning_rate=1e-2, optimizer="AdamW", lr_schedule="constant", warmup_steps=0,
            seed=1, gradient_checkpointing=True, training_dtype="auto", resume_file=name)
    assert len(loss["loss"]) == 1 and set(resumed) == set(lycoris)
    assert {a.algo for a in resumed.values()} == {"dylora"} and {a.block_size for a in resumed.values()} == {BLOCK}
    args = json.loads(resumed.metadata["ss_network_args"])
    assert args["algo"] == "dylora" and args["block_size"] == str(BLOCK)
    assert resumed.metadata["ss_steps"] == "3"
