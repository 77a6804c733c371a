"""`python -m lycoris_core inspect`: content of the report, JSON form, exit codes, model parts."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from lycoris_core import REGISTRY, LycorisWarning, load_file, save_file
from lycoris_core.inspect import EXAMPLE_FILE, guess_base_model, inspect_file, run, trigger_words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lycoris_core", "inspect", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_on_shipped_example():
    res = cli()
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert EXAMPLE_FILE in out
    for text in ("LoRA:", "LoCon:", "LoCon (Tucker):", "LoRA + DoRA (out axis)", "LoRA + DoRA (in axis)",
                 "blocks: BASE x2, IN01 x2", "Block map: SD1.x/2.x UNet",
                 "Text encoder: BASE (4 modules)", "Input blocks (IN): IN01, IN04 (4 modules)",
                 "Middle block (M): M00 (2 modules)",
                 "Output blocks (OUT): OUT07, OUT09, OUT10, OUT11 (7 modules)",
                 "Outside every block (OTHER): OTHER (1 module)", "rank 4", "alpha 2",
                 "dtype F16", "Base model: sd_v1", "ss_network_module", "lycoris.kohya",
                 "modelspec.architecture", "stable-diffusion-v1/lora",
                 "Trigger words (most frequent tags): lycoexample, 1girl, solo", "Problems: none"):
        assert text in out, text
    for algo, label in (("loha", "LoHa:"), ("lokr", "LoKr:"), ("diag-oft", "Diag-OFT:"),
                        ("boft", "BOFT:"), ("ia3", "(IA)^3:"), ("glora", "GLoRA:")):
        if algo in REGISTRY:
            assert label in out, label
    assert res.stderr == ""


def test_cli_json_on_example():
    res = cli(EXAMPLE_FILE, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    af = load_file(EXAMPLE_FILE)
    assert report["modules"] == len(af) and report["file_bytes"] == os.path.getsize(EXAMPLE_FILE)
    assert sum(a["modules"] for a in report["algorithms"]) == len(af)
    lora = next(a for a in report["algorithms"] if a["algorithm"] == "LoRA")
    assert lora["ranks"] == {"4": 2, "8": 2} and lora["blocks"] == {"BASE": 2, "IN01": 2}
    assert report["arch"]["name"] == "sd1"
    assert list(report["parts"]) == ["te", "in", "mid", "out", "other"]
    assert report["parts"]["in"] == {"title": "Input blocks (IN)", "modules": 4,
                                     "blocks": {"IN01": 3, "IN04": 1}}
    assert sum(p["modules"] for p in report["parts"].values()) == len(af)
    assert report["training_metadata"]["ss_steps"] == "1200"
    assert report["trigger_words"][0] == "lycoexample"
    assert report["problems"] == []


def test_cli_on_broken_file_fails_with_one_line(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    res = cli(str(path))
    assert res.returncode != 0
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(path) in lines[0] and "header is not valid JSON" in lines[0]
    assert "Traceback" not in res.stderr


def test_missing_file_fails_cleanly(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert run(str(tmp_path / "gone.safetensors"), as_json=False, out=out, err=err) == 1
    assert "gone.safetensors" in err.getvalue() and "No such file" in err.getvalue()
    assert out.getvalue() == ""


def _module(seed: int, out: int = 8, inp: int = 6, alpha: float | None = 1.0, zero: bool = False):
    g = torch.Generator().manual_seed(seed)
    up = torch.zeros(out, 2) if zero else torch.randn(out, 2, generator=g)
    t = {"lora_up.weight": up, "lora_down.weight": torch.randn(2, inp, generator=g)}
    if alpha is not None:
        t["alpha"] = torch.tensor(alpha)
    return t


def test_problems_are_listed(tmp_path):
    good = "lora_unet_output_blocks_1_1_transformer_blocks_2_attn1_to_q"  # an SDXL-only path
    nan = "lora_unet_down_blocks_2_resnets_0_conv1"
    zero = "lora_te1_text_model_encoder_layers_3_mlp_fc1"
    odd = "my_custom_layer"
    tensors = {f"{good}.{k}": v for k, v in _module(0).items()}
    bad = _module(1)
    bad["lora_down.weight"][0, 0] = float("inf")
    tensors |= {f"{nan}.{k}": v for k, v in bad.items()}
    tensors |= {f"{zero}.{k}": v for k, v in _module(2, zero=True).items()}
    tensors |= {f"{odd}.{k}": v for k, v in _module(3).items()}
    tensors["lora_unet_x.mystery"] = torch.zeros(2)
    meta = {"ss_network_args": json.dumps({"algo": "loha"}), "ss_network_dim": "16",
            "ss_base_model_version": "sd_v1", "ss_tag_frequency": "[1, 2"}
    with pytest.warns(LycorisWarning, match="NaN or Inf"):
        path = save_file(tensors, tmp_path / "messy.safetensors", meta)
    report = inspect_file(path)
    reasons = {(p["level"], p["key"]): p["reason"] for p in report["problems"]}
    assert "NaN or Inf" in reasons[("error", f"{nan}.lora_down.weight")]
    assert "unknown key suffix" in reasons[("warning", "lora_unet_x.mystery")]
    assert "all-zero update" in reasons[("warning", zero)]
    assert "no known model part" in reasons[("warning", odd)]
    assert "'loha'" in reasons[("warning", "ss_network_args")]
    assert "16" in reasons[("warning", "ss_network_dim")]
    assert "sdxl" in reasons[("warning", "ss_base_model_version")]
    assert "not the expected JSON" in reasons[("warning", "ss_tag_frequency")]
    out = io.StringIO()
    assert run(path, as_json=False, out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert f"Problems: {len(report['problems'])}" in text
    assert f"error: {nan}.lora_down.weight:" in text and "Text encoder: BASE (1 module)" in text


def test_no_metadata_and_no_modules(tmp_path):
    path = save_file({"lora_unet_x.mystery": torch.zeros(2)}, tmp_path / "empty.safetensors")
    report = inspect_file(path)
    assert report["modules"] == 0 and list(report["training_metadata"]) == ["sshs_model_hash"]
    assert any(p["level"] == "error" and "no usable adapter module" in p["reason"]
               for p in report["problems"])


def _file(tmp_path, names, widths=None):
    """A LoRA file with one module per name (input width from `widths`, else 6)."""
    tensors = {}
    for seed, name in enumerate(names):
        inp = (widths or {}).get(name, 6)
        tensors |= {f"{name}.{k}": v for k, v in _module(seed, inp=inp).items()}
    return save_file(tensors, tmp_path / "family.safetensors")


# family -> (module names, detected arch, base-model guess, [(group, blocks)] in report order, a text line)
FAMILIES = {
    "sd1-kohya": ([
        "lora_te_text_model_encoder_layers_11_mlp_fc1",
        "lora_unet_conv_in",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_mid_block_resnets_0_conv1",
        "lora_unet_up_blocks_3_attentions_2_proj_out",
        "lora_unet_time_embedding_linear_1",
    ], "sd1", "sd_v1", [("te", ["BASE"]), ("in", ["IN00", "IN01"]), ("mid", ["M00"]),
                        ("out", ["OUT11"]), ("other", ["OTHER"])],
        "  Input blocks (IN): IN00, IN01 (2 modules)"),
    "sdxl-kohya": ([
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_8_0_in_layers_2",
        "lora_unet_label_emb_0_0",
    ], "sdxl", "sdxl_base_v1-0", [("te", ["BASE"]), ("in", ["IN04"]), ("mid", ["M00"]),
                                  ("out", ["OUT08"]), ("other", ["OTHER"])],
        "  Text encoder: BASE (2 modules)"),
    "flux-kohya": ([
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te3_encoder_block_5_layer_1_DenseReluDense_wi_0",
        "lora_unet_img_in",
        "lora_unet_double_blocks_7_img_attn_qkv",
        "lora_unet_double_blocks_0_txt_mlp_0",
        "lora_unet_single_blocks_30_linear1",
        "lora_unet_final_layer_linear",
    ], "flux", "flux1", [("te", ["BASE", "T5"]), ("in", ["IN"]), ("double", ["D00", "D07"]),
                         ("single", ["S30"]), ("out", ["OUT"])],
        "  Double-stream blocks (D): D00, D07 (2 modules)"),
    "flux-diffusers": ([
        "clip_l.transformer.text_model.encoder.layers.5.self_attn.k_proj",
        "t5xxl.transformer.encoder.block.3.layer.0.SelfAttention.q",
        "transformer.x_embedder",
        "transformer.transformer_blocks.4.attn.to_k",
        "transformer.single_transformer_blocks.2.attn.to_q",
    ], "flux", "flux1", [("te", ["BASE", "T5"]), ("in", ["IN"]), ("double", ["D04"]),
                         ("single", ["S02"])],
        "  Single-stream blocks (S): S02 (1 module)"),
    "sd3-kohya": ([
        "lora_te2_text_model_encoder_layers_3_mlp_fc1",
        "lora_unet_x_embedder_proj",
        "lora_unet_joint_blocks_12_x_block_attn_qkv",
        "lora_unet_joint_blocks_0_context_block_mlp_fc1",
    ], "sd3", "sd3", [("te", ["BASE"]), ("in", ["IN"]), ("joint", ["J00", "J12"])],
        "  Joint blocks (J): J00, J12 (2 modules)"),
    "wan-peft": ([
        "base_model.model.blocks.9.cross_attn.q",
        "diffusion_model.blocks.0.self_attn.k",
        "diffusion_model.head.head",
    ], "auto", None, [("b", ["B00", "B09"]), ("other", ["OTHER"])],
        "  B blocks: B00, B09 (2 modules)"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parts_are_reported_as_grouped_block_ids(tmp_path, family):
    names, arch, guess, groups, line = FAMILIES[family]
    path = _file(tmp_path, names, {n: 768 for n in names if "attn2_to_k" in n})
    report = inspect_file(path)
    assert report["arch"]["name"] == arch and report["base_model"]["guess"] == guess
    assert [(g, list(p["blocks"])) for g, p in report["parts"].items()] == groups
    assert sum(p["modules"] for p in report["parts"].values()) == len(names)
    assert report["problems"] == []  # every name is a known model part
    out = io.StringIO()
    assert run(path, as_json=False, out=out, err=io.StringIO()) == 0
    assert line + "\n" in out.getvalue()


def test_guess_base_model_from_names_and_widths():
    assert guess_base_model({"lora_unet_double_blocks_0_img_attn_qkv": None}) == "flux1"
    assert guess_base_model({"lora_unet_joint_blocks_0_x_block_attn_qkv": None}) == "sd3"
    assert guess_base_model({"lora_unet_output_blocks_0_1_transformer_blocks_3_attn1_to_q": None}) == "sdxl_base_v1-0"
    assert guess_base_model({"lora_unet_down_blocks_0_resnets_0_conv1": None}) is None
    assert guess_base_model(load_file(EXAMPLE_FILE)) == "sd_v1"
    # SD1.x and SD2.x share their block names: the cross-attention width tells them apart
    for name in ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
        for width, base in ((768, "sd_v1"), (1024, "sd_v2"), (320, None)):
            adapters = load_file({f"{name}.{k}": v for k, v in _module(0, inp=width).items()})
            assert guess_base_model(adapters) == base, (name, width)


def test_trigger_words_sum_over_folders():
    meta = {"ss_tag_frequency": json.dumps({"10_a": {" tok": 5, "cat": 3}, "5_b": {"cat": 4, "dog": 1}})}
    assert trigger_words(meta) == ["cat", "tok", "dog"]
    assert trigger_words(meta, limit=1) == ["cat"]
    assert trigger_words({}) == []
