"""`convert`: a LoRA/DoRA file written by PEFT + diffusers, renamed to kohya and back, loads in
diffusers and PEFT with the same weights; other algorithms keep their tensors under new names.

Oracles: diffusers' own loaders (`StableDiffusionPipeline.lora_state_dict` converts kohya files
itself; `load_lora_into_unet` reads the `lora_adapter_metadata` config) and PEFT
(`set_peft_model_state_dict`), compared on the fused weights of a tiny UNet2DConditionModel.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as read_safetensors
from safetensors.torch import save_file

from lycoris_core import load_file
from lycoris_core.__main__ import main

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET_CONFIG = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
    "attention_head_dim": 8, "norm_num_groups": 8}
RANK, ALPHA = 4, 2.0
pytestmark = pytest.mark.filterwarnings("ignore")


_BASE: dict[str, torch.Tensor] = {}


def base_unet() -> torch.nn.Module:
    """The tiny UNet with the same seeded weights every time."""
    if not _BASE:
        torch.manual_seed(0)
        _BASE.update(diffusers.UNet2DConditionModel(**UNET_CONFIG).state_dict())
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict({k: v.clone() for k, v in _BASE.items()}, assign=True)  # fusing writes in place
    return unet.eval()


def _targets(unet) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [n for n, m in unet.named_modules() if isinstance(m, kinds) and ("attentions" in n or "resnets" in n)]


def peft_file(path, dora: bool = False, patterns: bool = True):
    """A LoRA file as diffusers writes it (`save_lora_weights` with its LoraConfig, one module of
    another rank and one of another alpha with `patterns`); returns the fused weights PEFT gives
    (the oracle)."""
    unet = base_unet()
    targets = _targets(unet)
    more = {"rank_pattern": {targets[0]: 2}, "alpha_pattern": {targets[1]: 5.0}} if patterns else {}
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False,
                             use_dora=dora, **more)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    layers = peft.get_peft_model_state_dict(unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=layers, weight_name=path.name, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    unet.fuse_lora()
    return _plain_weights(unet)


def _plain_weights(unet) -> dict[str, torch.Tensor]:
    """Weights of the base layers (PEFT's wrapper names `base_layer.` removed, LoRA tensors dropped)."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items()
            if "lora_" not in k}


def diffusers_loaded(path) -> dict[str, torch.Tensor]:
    """The file loaded by diffusers' own loader into a fresh UNet and fused."""
    unet = base_unet()
    state_dict, alphas, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)
    unet.fuse_lora()
    return _plain_weights(unet)


def peft_loaded(path) -> dict[str, torch.Tensor]:
    """A `--to peft` file through PEFT alone: its config from the metadata, its state dict."""
    with safe_open(str(path), "pt") as f:
        config = peft.LoraConfig(**json.loads(f.metadata()["lora_adapter_metadata"]))
    unet = base_unet()
    peft.inject_adapter_in_model(config, unet)
    result = peft.set_peft_model_state_dict(unet, read_safetensors(str(path)))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    merged = {}
    for name, module in unet.named_modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()
    merged = {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items()
              if "lora_" not in k}
    return merged


def assert_same_weights(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    base = _plain_weights(base_unet())
    changed = 0
    for key, value in want.items():
        assert torch.allclose(got[key], value, rtol=1e-5, atol=1e-6), key
        changed += not torch.equal(value, base[key])
    assert changed > 10


def convert(src, style, out) -> None:
    assert main(["convert", str(src), "--to", style, "--out", str(out), "--quiet"]) == 0


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_file_to_kohya_and_back_loads_with_the_same_weights(tmp_path, dora):
    original = tmp_path / "peft.safetensors"
    want = peft_file(original, dora)
    kohya, back, alone = (tmp_path / f"{n}.safetensors" for n in ("kohya", "diffusers", "peft_alone"))
    convert(original, "kohya", kohya)
    keys = read_safetensors(str(kohya))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    convert(kohya, "diffusers", back)
    assert all(k.startswith("unet.") for k in read_safetensors(str(back)))
    assert_same_weights(diffusers_loaded(back), want)
    convert(kohya, "peft", alone)
    assert_same_weights(peft_loaded(alone), want)


def test_kohya_file_loads_in_diffusers_own_kohya_reader(tmp_path):
    """diffusers converts kohya files itself (one alpha for all: its reader loses a per-module
    alpha of attention layers, which it renames to the old `processor.to_q_lora` spelling)."""
    original = tmp_path / "peft.safetensors"
    want = peft_file(original, patterns=False)
    kohya = tmp_path / "kohya.safetensors"
    convert(original, "kohya", kohya)
    assert_same_weights(diffusers_loaded(kohya), want)


def test_kohya_and_comfy_files_keep_every_tensor_and_the_same_modules(tmp_path):
    original = tmp_path / "peft.safetensors"
    peft_file(original)
    kohya, comfy = tmp_path / "kohya.safetensors", tmp_path / "comfy.safetensors"
    convert(original, "kohya", kohya)
    convert(kohya, "comfy", comfy)
    names = list(read_safetensors(str(comfy)))
    assert all(k.startswith("diffusion_model.input_blocks.") or k.startswith("diffusion_model.middle_block.")
               or k.startswith("diffusion_model.output_blocks.") for k in names), names[:3]
    from lycoris_core.checkpoint_names import parse_name

    ours = [{parse_name(n): a for n, a in load_file(str(p)).items()} for p in (original, kohya, comfy)]
    assert ours[0].keys() == ours[1].keys() == ours[2].keys() and len(ours[0]) > 50
    for ref, a in ours[0].items():
        w = torch.randn(a.target_shape)
        assert all(torch.equal(a.merge(w, 0.7), other[ref].merge(w, 0.7)) for other in ours[1:]), ref


def test_other_algorithms_convert_between_kohya_and_comfy_but_refuse_peft(tmp_path, capsys):
    from lycoris_core import REGISTRY, LayerSpec

    loha = REGISTRY["loha"].create(LayerSpec.from_module(torch.nn.Linear(32, 32)), rank=4)
    with torch.no_grad():
        for p in loha.parameters():
            p.normal_()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    src = tmp_path / "loha.safetensors"
    save_file({f"{name}.{k}": v for k, v in loha.export().items()}, str(src))
    comfy = tmp_path / "comfy.safetensors"
    convert(src, "comfy", comfy)
    keys = set(read_safetensors(str(comfy)))
    assert keys == {f"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.{k}" for k in loha.export()}
    assert main(["convert", str(src), "--to", "peft", "--out", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "loha has no PEFT/diffusers layout" in err and name in err and str(src) in err
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_never_overwrites_without_force(tmp_path, capsys):
    original = tmp_path / "peft.safetensors"
    peft_file(original)
    out = tmp_path / "kohya.safetensors"
    out.write_bytes(b"keep")
    assert main(["convert", str(original), "--to", "kohya", "--out", str(out)]) == 1
    assert "file exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["convert", str(original), "--to", "kohya", "--out", str(out), "--force", "--quiet"]) == 0
    assert main(["convert", str(original), "--to", "kohya", "--out", str(original), "--force"]) == 1


# ----- diffusers DiT names -> ComfyUI's native ones (no host) ------------------------------------

H = 16  # hidden width of the made-up Flux/SD3 shapes below


def _kohya_lora(out_dim: int, in_dim: int, rank: int, alpha: float, g) -> dict[str, torch.Tensor]:
    return {"lora_down.weight": torch.randn(rank, in_dim, generator=g),
            "lora_up.weight": torch.randn(out_dim, rank, generator=g), "alpha": torch.tensor(alpha)}


def _change(t: dict) -> torch.Tensor:
    """A LoRA's weight change by its definition: up @ down * alpha / rank."""
    down = t["lora_down.weight"].double()
    return t["lora_up.weight"].double() @ down * float(t["alpha"]) / down.shape[0]


def _dit_file(path, modules: dict[str, dict]) -> None:
    save_file({f"{name}.{k}": v.clone() for name, t in modules.items() for k, v in t.items()}, str(path))


def test_diffusers_flux_pieces_become_one_comfy_lora_per_fused_weight(tmp_path):
    """q/k/v (and a single block's mlp) LoRAs of different ranks and alphas fuse into one LoRA on
    ComfyUI's qkv/linear1 whose change is theirs stacked in q, k, v(, mlp) row order (the order
    of `comfy.utils.flux_to_diffusers`); the final norm's change has its halves swapped."""
    g = torch.Generator().manual_seed(0)
    pieces = {
        "img": {f"lora_transformer_transformer_blocks_0_attn_to_{p}": _kohya_lora(H, H, r, a, g)
                for p, r, a in (("q", 2, 1.0), ("k", 3, 3.0), ("v", 4, 8.0))},
        "single": {**{f"lora_transformer_single_transformer_blocks_0_attn_to_{p}": _kohya_lora(H, H, 2, 2.0, g)
                      for p in "qkv"},
                   "lora_transformer_single_transformer_blocks_0_proj_mlp": _kohya_lora(4 * H, H, 3, 1.5, g)},
    }
    whole = {"lora_transformer_norm_out_linear": _kohya_lora(2 * H, H, 2, 2.0, g),
             "lora_transformer_x_embedder": _kohya_lora(H, 8, 2, 2.0, g)}
    src, out = tmp_path / "flux.safetensors", tmp_path / "comfy.safetensors"
    _dit_file(src, {**pieces["img"], **pieces["single"], **whole})
    convert(src, "comfy", out)
    written = read_safetensors(str(out))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in written}
    assert modules == {"diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.single_blocks.0.linear1",
                       "diffusion_model.final_layer.adaLN_modulation.1", "diffusion_model.img_in"}

    def got(name):
        return _change({k[len(name) + 1:]: v for k, v in written.items() if k.startswith(name + ".")})

    want_qkv = torch.cat([_change(t) for t in pieces["img"].values()])
    assert torch.allclose(got("diffusion_model.double_blocks.0.img_attn.qkv"), want_qkv, atol=1e-5)
    want_linear1 = torch.cat([_change(t) for t in pieces["single"].values()])
    assert torch.allclose(got("diffusion_model.single_blocks.0.linear1"), want_linear1, atol=1e-5)
    scale_shift = _change(whole["lora_transformer_norm_out_linear"])
    assert torch.allclose(got("diffusion_model.final_layer.adaLN_modulation.1"),
                          torch.cat((scale_shift[H:], scale_shift[:H])), atol=1e-5)
    assert torch.allclose(got("diffusion_model.img_in"), _change(whole["lora_transformer_x_embedder"]), atol=1e-6)


def test_attention_only_dit_names_need_a_family_and_sd3_swaps_only_its_last_context_adaln(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    attention = {f"transformer.transformer_blocks.0.attn.to_{p}": _kohya_lora(H, H, 2, 2.0, g) for p in "qkv"}
    src = tmp_path / "attn.safetensors"
    _dit_file(src, attention)
    assert main(["convert", str(src), "--to", "comfy", "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 1
    assert "--family" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    # SD3: the last block's context adaLN makes two chunks (swapped), the others six (kept)
    modules = {**attention,
               "transformer.transformer_blocks.0.norm1_context.linear": _kohya_lora(6 * H, H, 2, 2.0, g),
               "transformer.transformer_blocks.1.norm1_context.linear": _kohya_lora(2 * H, H, 2, 2.0, g)}
    _dit_file(src, modules)
    out = tmp_path / "sd3.safetensors"
    assert main(["convert", str(src), "--to", "comfy", "--family", "sd3", "--out", str(out), "--quiet"]) == 0
    written = read_safetensors(str(out))
    prefix = "diffusion_model.joint_blocks."

    def got(name):
        return _change({k[len(name) + 1:]: v for k, v in written.items() if k.startswith(name + ".")})

    qkv = torch.cat([_change(t) for t in attention.values()])
    assert torch.allclose(got(prefix + "0.x_block.attn.qkv"), qkv, atol=1e-5)
    six = _change(modules["transformer.transformer_blocks.0.norm1_context.linear"])
    assert torch.allclose(got(prefix + "0.context_block.adaLN_modulation.1"), six, atol=1e-5)
    two = _change(modules["transformer.transformer_blocks.1.norm1_context.linear"])
    assert torch.allclose(got(prefix + "1.context_block.adaLN_modulation.1"), torch.cat((two[H:], two[:H])), atol=1e-5)


def test_part_of_a_fused_weight_of_unknown_width_and_other_algorithms_on_pieces_are_refused(tmp_path, capsys):
    g = torch.Generator().manual_seed(2)
    src = tmp_path / "part.safetensors"
    # a single block's q alone: linear1's mlp rows are not known without the model
    _dit_file(src, {"lora_transformer_single_transformer_blocks_0_attn_to_q": _kohya_lora(H, H, 2, 2.0, g),
                    "lora_transformer_single_transformer_blocks_0_proj_out": _kohya_lora(H, 5 * H, 2, 2.0, g)})
    assert main(["convert", str(src), "--to", "comfy", "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "width of the rest is unknown" in err and "single_blocks.0.linear1" in err
    lokr = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2": torch.randn(4, 4, generator=g)}
    _dit_file(src, {"lora_transformer_transformer_blocks_0_attn_to_q": lokr,
                    "lora_transformer_transformer_blocks_0_ff_net_2": lokr, "lora_transformer_x_embedder": lokr})
    assert main(["convert", str(src), "--to", "comfy", "--out", str(tmp_path / "x.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 module cannot" in err and "lokr on a piece" in err and "attn_to_q" in err
