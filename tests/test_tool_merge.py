"""`merge`: adapters of every name style baked into a small single-file checkpoint, and LoRAs
merged into one LoRA; the expected weights are computed here from the factors with plain torch."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from lycoris_core.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore")

UNET = "model.diffusion_model."
CHECKPOINT = {
    UNET + "input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
    UNET + "input_blocks.4.0.in_layers.2.weight": (64, 32, 3, 3),
    UNET + "input_blocks.4.0.in_layers.2.bias": (64,),
    UNET + "output_blocks.3.1.proj_out.weight": (64, 64, 1, 1),
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 32),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
}
# module name (one per style) -> (checkpoint key, rows, strength multiplier of BLOCKS)
MODULES = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": (UNET + "input_blocks.1.1.proj_in.weight", None, 0.5),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q":
        (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", None, 0.5),
    "unet.down_blocks.1.resnets.0.conv1": (UNET + "input_blocks.4.0.in_layers.2.weight", None, 1.0),
    "lycoris_up_blocks_1_attentions_0_proj_out": (UNET + "output_blocks.3.1.proj_out.weight", None, 0.0),
    "lora_te_text_model_encoder_layers_0_mlp_fc1":
        ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", None, 2.0),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj":
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", slice(32, 64), 2.0),
}
BLOCKS = "IN01=0.5, OUT03=0, BASE=2"


def checkpoint(path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.1).half() for k, s in CHECKPOINT.items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(path), metadata={"modelspec.title": "tiny"})
    return sd


def lora(shape, rank: int, seed: int, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank,) + tuple(shape[1:]), generator=g) * 0.1
    up = torch.randn((shape[0], rank) + (1,) * (len(shape) - 2), generator=g) * 0.1
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}


def lora_change(t: dict) -> torch.Tensor:
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    rank = down.shape[0]
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * float(t["alpha"]) / rank


def adapter_file(path, modules: dict[str, dict]) -> None:
    tensors = {}
    for name, t in modules.items():
        if name.startswith("unet."):  # PEFT spelling, alpha left to the default (alpha = rank)
            tensors[f"{name}.lora_A.weight"] = t["lora_down.weight"]
            tensors[f"{name}.lora_B.weight"] = t["lora_up.weight"]
            t["alpha"] = torch.tensor(float(t["lora_down.weight"].shape[0]))
        else:
            tensors.update({f"{name}.{k}": v for k, v in t.items()})
    save_file(tensors, str(path))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path):
    base = tmp_path / "ckpt.safetensors"
    sd = checkpoint(base)
    modules = {}
    for i, (name, (key, rows, _)) in enumerate(MODULES.items()):
        shape = CHECKPOINT[key]
        if rows is not None:
            shape = (rows.stop - rows.start,) + shape[1:]
        modules[name] = lora(shape, rank=2 + i % 3, seed=i)
    adapter = tmp_path / "styles.safetensors"
    adapter_file(adapter, {**modules, "lora_unet_not_a_layer": lora((8, 8), 2, 99)})
    return base, sd, adapter, modules


def test_every_name_style_lands_on_its_key_with_strength_and_block_weights(files, tmp_path, capsys):
    base, sd, adapter, modules = files
    before = sha(base)
    out = tmp_path / "baked.safetensors"
    assert main(["merge", "--base", str(base), "--adapter", f"{adapter}:0.8", "--blocks", BLOCKS,
                 "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "lora_unet_not_a_layer" in captured.err and str(adapter) in captured.err
    assert sha(base) == before
    baked = read_safetensors(str(out))
    assert set(baked) == set(sd)
    for name, (key, rows, multiplier) in MODULES.items():
        want = sd[key].float().clone()
        rows = rows or slice(None)
        change = lora_change(modules[name]).reshape(want[rows].shape)
        want[rows] += 0.8 * multiplier * change
        assert baked[key].dtype == torch.float16
        assert torch.allclose(baked[key].float(), want.half().float(), rtol=0, atol=1e-3), name
        assert multiplier == 0 or not torch.equal(baked[key], sd[key]), name
    for key in ("first_stage_model.decoder.conv_in.weight", UNET + "input_blocks.4.0.in_layers.2.bias",
                "cond_stage_model.transformer.text_model.embeddings.position_ids"):
        assert torch.equal(baked[key], sd[key])
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny" and "lycoris_baked" in f.metadata()


def test_several_adapters_stack_in_order_and_dtype_casts_floats_only(files, tmp_path):
    base, sd, adapter, modules = files
    key = UNET + "input_blocks.4.0.in_layers.2.weight"
    second = tmp_path / "second.safetensors"
    extra = lora(CHECKPOINT[key], 3, seed=7, alpha=1.5)
    adapter_file(second, {"lora_unet_input_blocks_4_0_in_layers_2": extra})
    out = tmp_path / "baked32.safetensors"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--adapter", f"{second}:-0.5",
                 "--out", str(out), "--dtype", "fp32", "--quiet"]) == 0
    baked = read_safetensors(str(out))
    want = sd[key].float() + lora_change(modules["unet.down_blocks.1.resnets.0.conv1"]).reshape(sd[key].shape) \
        - 0.5 * lora_change(extra).reshape(sd[key].shape)
    assert baked[key].dtype == torch.float32 and torch.allclose(baked[key], want, atol=1e-6)
    assert baked["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_refusals_name_the_file_and_key_and_write_nothing(files, tmp_path, capsys):
    base, _, adapter, _ = files
    out = tmp_path / "out.safetensors"
    wrong = tmp_path / "wrong.safetensors"
    adapter_file(wrong, {"lora_unet_down_blocks_0_attentions_0_proj_in": lora((16, 32, 1, 1), 2, 1)})
    assert main(["merge", "--base", str(base), "--adapter", str(wrong), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(wrong) in err and "lora_unet_down_blocks_0_attentions_0_proj_in" in err and "input_blocks.1.1.proj_in" in err
    other = tmp_path / "other.safetensors"
    adapter_file(other, {"lora_unet_double_blocks_0_img_attn_qkv": lora((96, 32), 2, 1)})
    assert main(["merge", "--base", str(base), "--adapter", str(other), "--out", str(out)]) == 1
    assert "no module of the adapters matches" in capsys.readouterr().err
    out.write_bytes(b"keep")
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 1
    assert "file exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(base), "--force"]) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lycoris-")]


def test_loras_merge_into_one_lora_exactly_at_full_rank_and_optimally_below(tmp_path, capsys):
    from lycoris_core import load_file

    shape = (48, 32)
    a, b = lora(shape, 3, seed=1), lora(shape, 2, seed=2, alpha=4.0)
    conv = lora((16, 8, 3, 3), 2, seed=3)
    fa, fb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    adapter_file(fa, {"lora_unet_mid_block_attentions_0_proj_in": a, "lora_unet_conv_in": conv})
    adapter_file(fb, {"diffusion_model.middle_block.1.proj_in": b})  # the same layer, ComfyUI's name
    dense = 0.5 * lora_change(a) - 2.0 * lora_change(b)
    for rank, exact in ((8, True), (1, False)):
        out = tmp_path / f"r{rank}.safetensors"
        assert main(["merge", "--adapter", f"{fa}:0.5", "--adapter", f"{fb}:-2", "--rank", str(rank),
                     "--out", str(out), "--quiet"]) == 0
        merged = load_file(str(out))
        assert len(merged) == 2
        got = merged["lora_unet_mid_block_attentions_0_proj_in"].merge(torch.zeros(shape))
        s = torch.linalg.svdvals(dense)
        if exact:
            assert torch.allclose(got, dense, atol=1e-6)
            assert torch.allclose(merged["lora_unet_conv_in"].merge(torch.zeros(16, 8, 3, 3)),
                                  0.5 * lora_change(conv).reshape(16, 8, 3, 3), atol=1e-6)
        else:
            optimal = float(s[1:].norm() / s.norm())
            assert abs(float((got - dense).norm() / dense.norm()) - optimal) < 1e-4
            assert f"{optimal:.3e}" in capsys.readouterr().out


def test_lora_merge_refuses_changes_that_need_the_base_weight(tmp_path, capsys):
    t = lora((32, 32), 2, seed=1)
    t["dora_scale"] = torch.ones(32, 1)
    f = tmp_path / "dora.safetensors"
    adapter_file(f, {"lora_unet_conv_in": t})
    assert main(["merge", "--adapter", str(f), "--rank", "4", "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "lora_unet_conv_in" in err and str(f) in err and "--base" in err


def test_diffusers_dit_names_resolve_to_native_keys_pieces_and_swaps_by_shape():
    """Flux and SD3 diffusers names on native checkpoints (bare and `diffusion_model.`): q/k/v rows
    of qkv (as `comfy.utils.flux_to_diffusers` places them), linear1's mlp rows, and SD3's context
    adaLN swapped only in the pre-only last block (two chunks)."""
    from lycoris_core.checkpoint_names import CheckpointNames

    h = 16
    flux = CheckpointNames.from_shapes({
        "diffusion_model.double_blocks.0.img_attn.qkv.weight": (3 * h, h),
        "diffusion_model.single_blocks.0.linear1.weight": (7 * h, h),
        "diffusion_model.img_in.weight": (h, 8),
        "diffusion_model.final_layer.adaLN_modulation.1.weight": (2 * h, h)})
    resolved = {name: flux.resolve(name) for name in (
        "transformer.transformer_blocks.0.attn.to_k", "transformer.single_transformer_blocks.0.proj_mlp",
        "transformer.x_embedder", "transformer.norm_out.linear", "transformer.transformer_blocks.0.attn.to_out.0")}
    assert [(t.key, t.offset, t.swap_halves) if t else None for t in resolved.values()] == [
        ("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, h, h), False),
        ("diffusion_model.single_blocks.0.linear1.weight", (0, 3 * h, 4 * h), False),
        ("diffusion_model.img_in.weight", None, False),
        ("diffusion_model.final_layer.adaLN_modulation.1.weight", None, True),
        None]
    sd3 = CheckpointNames.from_shapes({f"joint_blocks.{i}.context_block.adaLN_modulation.1.weight": (rows * h, h)
                                       for i, rows in ((0, 6), (1, 2))} | {"x_embedder.proj.weight": (h, 4, 2, 2)})
    last, first = (sd3.resolve(f"transformer.transformer_blocks.{i}.norm1_context.linear") for i in (1, 0))
    assert (last.key, last.swap_halves, first.key, first.swap_halves) == (
        "joint_blocks.1.context_block.adaLN_modulation.1.weight", True,
        "joint_blocks.0.context_block.adaLN_modulation.1.weight", False)
    assert sd3.resolve("transformer.pos_embed.proj").key == "x_embedder.proj.weight"
