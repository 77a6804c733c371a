"""`python -m lycoris_core inspect`: content of the report, JSON form, exit codes, model parts."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from lycoris_core import REGISTRY, LycorisWarning, load_file, save_file
from lycoris_core.inspect import EXAMPLE_FILE, classify, guess_base_model, inspect_file, run, trigger_words

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
                 "text encoder", "UNet down", "UNet mid", "UNet up", "rank 4", "alpha 2",
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
    assert lora["ranks"] == {"4": 2, "8": 2} and lora["parts"]["text encoder"]["blocks"] == [0]
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
    good = "lora_unet_up_blocks_1_attentions_0_proj_in"
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
    assert "sdxl" in reasons[("warning", "ss_base_model_version")]  # lora_te1_ names: SDXL
    assert "not the expected JSON" in reasons[("warning", "ss_tag_frequency")]
    out = io.StringIO()
    assert run(path, as_json=False, out=out, err=io.StringIO()) == 0
    text = out.getvalue()
    assert f"Problems: {len(report['problems'])}" in text
    assert f"error: {nan}.lora_down.weight:" in text and "text encoder 1" in text


def test_no_metadata_and_no_modules(tmp_path):
    path = save_file({"lora_unet_x.mystery": torch.zeros(2)}, tmp_path / "empty.safetensors")
    report = inspect_file(path)
    assert report["modules"] == 0 and report["training_metadata"] == {}
    assert any(p["level"] == "error" and "no usable adapter module" in p["reason"]
               for p in report["problems"])


@pytest.mark.parametrize("name, part, index", [
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", "text encoder", 11),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text encoder 1", 0),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc2", "text encoder 2", 31),
    ("lora_te3_encoder_block_5_layer_1_DenseReluDense_wi_0", "text encoder 3", 5),
    ("text_encoder_2.text_model.encoder.layers.5.self_attn.k_proj", "text encoder 2", 5),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "UNet down", 1),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", "UNet down", 4),
    ("lora_unet_mid_block_resnets_0_conv1", "UNet mid", None),
    ("lora_unet_middle_block_1_proj_in", "UNet mid", None),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", "UNet up", 3),
    ("lora_unet_output_blocks_8_0_in_layers_2", "UNet up", 8),
    ("lycoris_down_blocks_0_resnets_1_conv2", "UNet down", 0),
    ("unet.up_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", "UNet up", 2),
    ("lora_unet_conv_in", "UNet in/out", None),
    ("lora_unet_time_embedding_linear_1", "UNet in/out", None),
    ("lora_unet_double_blocks_7_img_attn_qkv", "DiT double", 7),
    ("lora_unet_single_blocks_30_linear1", "DiT single", 30),
    ("transformer.single_transformer_blocks.2.attn.to_q", "DiT single", 2),
    ("lora_transformer_single_transformer_blocks_0_proj_out", "DiT single", 0),
    ("lora_unet_joint_blocks_12_x_block_attn_qkv", "DiT joint", 12),
    ("transformer.transformer_blocks.4.attn.to_k", "DiT blocks", 4),
    ("lycoris_transformer_blocks_1_attn_add_q_proj", "DiT blocks", 1),
    ("diffusion_model.double_blocks.0.txt_mlp.0", "DiT double", 0),
    ("base_model.model.blocks.9.cross_attn.q", "DiT blocks", 9),
    ("lora_unet_final_layer_linear", "DiT in/out", None),
    ("lora_unet_some_new_thing", "diffusion model (other)", None),
    ("my_layer", "unknown", None),
])
def test_classify(name, part, index):
    assert classify(name) == (part, index)


def test_guess_base_model_from_names():
    assert guess_base_model({"lora_unet_double_blocks_0_img_attn_qkv": None}) == "flux1"
    assert guess_base_model({"lora_unet_joint_blocks_0_x_block_attn_qkv": None}) == "sd3"
    assert guess_base_model({"lora_te2_text_model_encoder_layers_0_mlp_fc1": None}) == "sdxl_base_v1-0"
    assert guess_base_model({"lora_unet_down_blocks_0_resnets_0_conv1": None}) is None
    assert guess_base_model(load_file(EXAMPLE_FILE)) == "sd_v1"


def test_trigger_words_sum_over_folders():
    meta = {"ss_tag_frequency": json.dumps({"10_a": {" tok": 5, "cat": 3}, "5_b": {"cat": 4, "dog": 1}})}
    assert trigger_words(meta) == ["cat", "tok", "dog"]
    assert trigger_words(meta, limit=1) == ["cat"]
    assert trigger_words({}) == []
