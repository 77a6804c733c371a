"""`python -m lycoris_core extract`: exact recovery of low-rank differences, the rank rules against
lycoris-lora's `extract_diff` and a plain SVD, and the command's file handling."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save
from torch import nn

import lycoris_core
from lycoris_core.__main__ import main
from lycoris_core.tools.extract import extract, module_name
from lycoris_core.tools.lowrank import RankRule, Solver, low_rank

pytestmark = pytest.mark.filterwarnings("ignore::lycoris_core.LycorisWarning")


def _spectrum_delta(out: int, inner: int, rank: int, g: torch.Generator, decay: float = 0.7):
    """A matrix of exactly `rank` with singular values decaying geometrically."""
    u = torch.linalg.qr(torch.randn(out, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(inner, rank, generator=g)).Q
    s = decay ** torch.arange(rank, dtype=torch.float32)
    return (u * s) @ v.T


def _checkpoints(tmp_path, rank: int = 3):
    """(base path, tuned path, base dict, exact deltas) for a tiny SD-style checkpoint."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (48, 40, 1, 1),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 16, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (40, 40),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (64, 32),
    }
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["model.diffusion_model.out.0.weight"] = torch.ones(32)  # 1-d: skipped
    base["model.diffusion_model.input_blocks.1.1.proj_in.bias"] = torch.zeros(48)
    base["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(50, 32, generator=g)
    base["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    base["model.diffusion_model.out.2.weight"] = torch.randn(4, 32, 3, 3, generator=g).half()
    tuned = {k: v.clone() for k, v in base.items()}
    # the same values stored in another dtype: unchanged, not a zero module
    tuned["model.diffusion_model.out.2.weight"] = base["model.diffusion_model.out.2.weight"].float()
    deltas = {}
    for k, s in shapes.items():
        d = _spectrum_delta(s[0], math.prod(s[1:]), rank, g).reshape(s)
        tuned[k] = base[k] + d
        deltas[k] = d
    tuned["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] += 1
    tuned["first_stage_model.decoder.conv_in.weight"] += 1
    tuned["model.diffusion_model.out.0.weight"] += 1
    st_save(base, str(tmp_path / "base.safetensors"))
    st_save(tuned, str(tmp_path / "tuned.safetensors"))
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), base, deltas


def _merged_delta(adapter, shape):
    zero = torch.zeros(shape)
    return adapter.merge(zero)


@pytest.mark.parametrize("randomized", [False, True], ids=["exact", "randomized"])
def test_extract_recovers_an_exact_low_rank_difference(tmp_path, capsys, randomized):
    base, tuned, _, deltas = _checkpoints(tmp_path)
    out = tmp_path / "x.safetensors"
    args = ["extract", "--base", base, "--tuned", tuned, "--out", str(out), "--algo", "locon",
            "--rank", "3", "--dtype", "fp32", "--device", "cpu"]
    assert main(args + (["--randomized"] if randomized else [])) == 0
    adapters = lycoris_core.load_file(str(out))
    assert not adapters.problems
    assert len(adapters) == len(deltas)
    for key, d in deltas.items():
        name, _ = module_name(key)
        got = _merged_delta(adapters[name], d.shape)
        assert adapters[name].rank == 3
        assert float((got - d).norm() / d.norm()) < 1e-4, name
    printed = capsys.readouterr().out
    assert "4 modules extracted" in printed
    assert "skipped: embedding table" in printed and "skipped: VAE" in printed
    assert "skipped: 1-d" in printed and "skipped: not a weight" in printed
    assert "1 tensor skipped: unchanged" in printed


def test_module_names_are_the_kohya_names_comfyui_maps():
    assert module_name("model.diffusion_model.input_blocks.4.1.proj_in.weight") == (
        "lora_unet_input_blocks_4_1_proj_in", None)
    assert module_name("cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight") == (
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj", None)
    assert module_name("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.weight")[0] == (
        "lora_te1_text_model_encoder_layers_0_mlp_fc2")
    assert module_name("double_blocks.0.img_attn.qkv.weight")[0] == "lora_unet_double_blocks_0_img_attn_qkv"
    assert module_name("model.diffusion_model.out.0.bias")[0] is None


class _Net(nn.Module):
    """Linear, 1x1 conv and 3x3 conv layers, as lycoris-lora's extract_diff walks them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(48, 64)
        self.proj = nn.Conv2d(40, 56, 1)
        self.conv = nn.Conv2d(24, 40, 3)


def _net_pair(seed: int = 1):
    torch.manual_seed(seed)
    base, tuned = _Net(), _Net()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (_, p) in [(n, p) for n, p in tuned.named_parameters() if n.endswith("weight")]:
            shape = p.shape
            noise = torch.randn(shape[0], math.prod(shape[1:]), generator=g)
            # decaying spectrum: distinct singular values, so the truncation is unique
            u, s, vh = torch.linalg.svd(noise, full_matrices=False)
            s = 0.8 ** torch.arange(s.numel(), dtype=torch.float32)
            p += ((u * s) @ vh).reshape(shape)
    return base, tuned


def _lycoris_delta(state: dict, name: str, shape) -> torch.Tensor:
    up = state[f"{name}.lora_up.weight"].float()
    down = state[f"{name}.lora_down.weight"].float()
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def test_fixed_rank_matches_lycoris_extract_diff():
    from lycoris.utils import extract_diff

    base, tuned = _net_pair()
    ref = extract_diff([], [], base, tuned, mode="fixed", linear_mode_param=6, conv_mode_param=5,
                       small_conv=False)
    ours = extract({k: v for k, v in base.state_dict().items()},
                   {k: v for k, v in tuned.state_dict().items()},
                   rule=RankRule("fixed", 6), conv_rule=RankRule("fixed", 5), algo="locon").adapters
    ref_names = {k.rsplit(".", 2)[0] for k in ref if k.endswith("lora_down.weight")}
    assert set(ours) == ref_names == {"lora_unet_lin", "lora_unet_proj", "lora_unet_conv"}
    for name, module in [("lora_unet_lin", tuned.lin), ("lora_unet_proj", tuned.proj),
                         ("lora_unet_conv", tuned.conv)]:
        shape = module.weight.shape
        want = _lycoris_delta(ref, name, shape)  # lycoris stores fp16 factors
        got = _merged_delta(ours[name], shape)
        assert ours[name].rank == ref[f"{name}.lora_down.weight"].shape[0]
        assert float((got - want).norm() / want.norm()) < 2e-3, name


@pytest.mark.parametrize("mode, value, ours, offset", [
    ("ratio", 0.25, RankRule("sv_ratio", 4.0), 0),
    ("threshold", 0.3, RankRule("sv_threshold", 0.3), 0),
    # lycoris `quantile` keeps the values whose running sum is still below X; sv_cumulative
    # keeps the smallest rank that reaches X, one more
    ("quantile", 0.5, RankRule("sv_cumulative", 0.5), 1),
])
def test_dynamic_rules_match_lycoris_extract_modes(mode, value, ours, offset):
    from lycoris.utils import extract_diff

    base, tuned = _net_pair(2)
    ref = extract_diff([], [], base, tuned, mode=mode, linear_mode_param=value,
                       conv_mode_param=value, small_conv=False)
    got = extract(base.state_dict(), tuned.state_dict(), rule=ours, algo="locon").adapters
    for name in ("lora_unet_lin", "lora_unet_proj", "lora_unet_conv"):
        assert got[name].rank == ref[f"{name}.lora_down.weight"].shape[0] + offset, name


@pytest.mark.parametrize("randomized", [False, True], ids=["exact", "randomized"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_sv_fro_keeps_the_smallest_rank_reaching_the_fraction(randomized, target):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(120, 200, generator=g) @ torch.diag(0.97 ** torch.arange(200.0)) \
        @ torch.linalg.qr(torch.randn(200, 200, generator=g)).Q
    s = torch.linalg.svdvals(a.double())
    kept = (torch.cumsum(s ** 2, 0) / (s ** 2).sum()).sqrt()
    want = int((kept < target).sum()) + 1
    f = low_rank(a, RankRule("sv_fro", target), Solver(randomized=randomized, power_iters=4))
    assert f.rank == want
    assert f.kept >= target - 1e-6
    assert abs(f.kept - float(kept[want - 1])) < 1e-4


def test_randomized_reaches_the_exact_error_on_a_decaying_spectrum():
    g = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(300, 300, generator=g)).Q
    v = torch.linalg.qr(torch.randn(500, 300, generator=g)).Q
    a = (u * 0.9 ** torch.arange(300.0)) @ v.T
    exact = low_rank(a, RankRule("fixed", 16))
    fast = low_rank(a, RankRule("fixed", 16), Solver(randomized=True))
    assert fast.rank == exact.rank == 16
    err = float((a - fast.up @ fast.down).norm() / a.norm())
    assert abs(err - fast.rel_error) < 1e-4  # the reported error is the real one
    assert fast.rel_error <= exact.rel_error * 1.01


def test_extract_writes_kohya_metadata_and_alpha(tmp_path):
    base, tuned, _, deltas = _checkpoints(tmp_path)
    out = tmp_path / "a.safetensors"
    assert main(["extract", "--base", base, "--tuned", tuned, "--out", str(out), "--rank", "2",
                 "--alpha", "1", "--quiet", "--device", "cpu"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert f.get_tensor("lora_unet_input_blocks_1_1_proj_in.lora_down.weight").dtype == torch.float16
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 1.0
    assert json.loads(meta["ss_network_args"])["algo"] == "lora"
    # --algo lora leaves the 3x3 conv out
    assert not any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in keys)
    adapters = lycoris_core.load_file(str(out))
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    d = deltas["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    best = torch.linalg.svd(d)
    want = (best.U[:, :2] * best.S[:2]) @ best.Vh[:2]
    assert adapters[name].alpha == 1.0
    assert float((_merged_delta(adapters[name], d.shape) - want).norm() / want.norm()) < 2e-3


def test_extract_refuses_to_overwrite_and_names_file_and_key(tmp_path, capsys):
    base, tuned, base_sd, _ = _checkpoints(tmp_path)
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    assert main(["extract", "--base", base, "--tuned", tuned, "--out", str(out), "--rank", "2"]) == 1
    assert "pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["extract", "--base", base, "--tuned", base, "--out", str(tmp_path / "n.safetensors"),
                 "--rank", "2", "--quiet"]) == 1
    assert "no weight differs" in capsys.readouterr().err
    other = dict(base_sd)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    other[key] = torch.zeros(8, 40, 1, 1)
    st_save(other, str(tmp_path / "other.safetensors"))
    assert main(["extract", "--base", str(tmp_path / "other.safetensors"), "--tuned", tuned,
                 "--out", str(tmp_path / "m.safetensors"), "--rank", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert tuned in err and key in err and "other.safetensors" in err
    assert main(["extract", "--base", base, "--tuned", tuned, "--out", str(tmp_path / "r.safetensors"),
                 "--sv-fro", "1.5"]) == 1
    assert "sv_fro needs a value in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(30, 200), (200, 30), (60, 70)], ids=["wide", "tall", "square"])
def test_svd_through_qr_equals_lapack_svd(shape):
    from lycoris_core.tools.lowrank import svd

    a = torch.randn(*shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    u, s, vh = svd(a)
    assert torch.allclose(s, torch.linalg.svdvals(a), atol=1e-10)
    assert torch.allclose((u * s) @ vh, a, atol=1e-10)
    eye = torch.eye(s.numel(), dtype=a.dtype)
    assert torch.allclose(u.T @ u, eye, atol=1e-10) and torch.allclose(vh @ vh.T, eye, atol=1e-10)


WIDTH = 24  # OpenCLIP layer width of the synthetic text encoders
OPENCLIP_CASES = {  # family -> (OpenCLIP prefix, its kohya prefix, CLIP-L prefix and its kohya prefix or None)
    "sd2": ("cond_stage_model.model.", "lora_te_", None),
    "sdxl": ("conditioner.embedders.1.model.", "lora_te2_",
             ("conditioner.embedders.0.transformer.text_model.encoder.layers.", "lora_te1_")),
}


def _openclip_pair(family: str, g: torch.Generator):
    """(base, tuned, {kohya name: (checkpoint key, row block, exact delta)}): two OpenCLIP layers
    whose in_proj thirds, out_proj, c_fc and c_proj change by rank-2 deltas (layer 1's v third
    not at all), beside the tensors no module takes, and SDXL's CLIP-L with one changed layer."""
    prefix, kohya, clip_l = OPENCLIP_CASES[family]
    base = {f"{prefix}token_embedding.weight": torch.randn(40, WIDTH, generator=g),
            f"{prefix}positional_embedding": torch.randn(8, WIDTH, generator=g),
            f"{prefix}text_projection": torch.randn(WIDTH, WIDTH, generator=g),
            f"{prefix}ln_final.weight": torch.ones(WIDTH)}
    tuned, want = {}, {}

    def change(key: str, name: str, block: int, rows: int, cols: int, delta: bool = True):
        d = _spectrum_delta(rows, cols, 2, g) if delta else torch.zeros(rows, cols)
        tuned.setdefault(key, base[key].clone())[block * rows:(block + 1) * rows] += d
        if delta:
            want[name] = (key, block, d)

    for layer in range(2):
        block = f"{prefix}transformer.resblocks.{layer}."
        te = f"{kohya}text_model_encoder_layers_{layer}_"
        base[block + "attn.in_proj_weight"] = torch.randn(3 * WIDTH, WIDTH, generator=g)
        base[block + "attn.in_proj_bias"] = torch.zeros(3 * WIDTH)
        base[block + "ln_1.weight"] = torch.ones(WIDTH)
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            change(block + "attn.in_proj_weight", te + f"self_attn_{proj}", i, WIDTH, WIDTH,
                   delta=(layer, proj) != (1, "v_proj"))
        for sub, name, rows, cols in (("attn.out_proj", "self_attn_out_proj", WIDTH, WIDTH),
                                      ("mlp.c_fc", "mlp_fc1", 4 * WIDTH, WIDTH),
                                      ("mlp.c_proj", "mlp_fc2", WIDTH, 4 * WIDTH)):
            base[f"{block}{sub}.weight"] = torch.randn(rows, cols, generator=g)
            change(f"{block}{sub}.weight", te + name, 0, rows, cols)
    if clip_l:
        key = clip_l[0] + "0.self_attn.q_proj.weight"
        base[key] = torch.randn(16, 16, generator=g)
        change(key, f"{clip_l[1]}text_model_encoder_layers_0_self_attn_q_proj", 0, 16, 16)
    for key, value in base.items():
        tuned.setdefault(key, value.clone() + 1)  # changed, but no module takes it
    return base, tuned, want


@pytest.mark.parametrize("family", sorted(OPENCLIP_CASES))
def test_openclip_text_encoder_extracts_as_hugging_face_clip_modules(tmp_path, capsys, family):
    from lycoris_core.checkpoint_names import CheckpointNames, KeyTarget

    base, tuned, want = _openclip_pair(family, torch.Generator().manual_seed(7))
    st_save(base, str(tmp_path / "base.safetensors"))
    st_save(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "te.safetensors"
    assert main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned",
                 str(tmp_path / "tuned.safetensors"), "--out", str(out), "--rank", "2",
                 "--dtype", "fp32", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "1 tensor skipped: unchanged block of a fused weight" in printed
    adapters = lycoris_core.load_file(str(out))
    assert not adapters.problems and set(adapters) == set(want)
    # the bake's own map (name -> key and rows) sends every module back where it came from
    names = CheckpointNames.from_shapes({k: tuple(v.shape) for k, v in base.items()})
    for name, (key, block, d) in want.items():
        got = _merged_delta(adapters[name], d.shape)
        assert adapters[name].rank == 2
        assert float((got - d).norm() / d.norm()) < 1e-4, name
        offset = (0, block * d.shape[0], d.shape[0]) if key.endswith("in_proj_weight") else None
        assert names.resolve(name) == KeyTarget(key, offset), name


def test_openclip_keys_name_the_modules_comfyui_maps():
    from lycoris_core.tools.extract import module_pieces

    def names(key):
        return [(p.name, p.block, p.of) for p in module_pieces(key)[0]]

    assert names("cond_stage_model.model.transformer.resblocks.11.attn.in_proj_weight") == [
        ("lora_te_text_model_encoder_layers_11_self_attn_q_proj", 0, 3),
        ("lora_te_text_model_encoder_layers_11_self_attn_k_proj", 1, 3),
        ("lora_te_text_model_encoder_layers_11_self_attn_v_proj", 2, 3)]
    assert module_name("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight") == (
        "lora_te2_text_model_encoder_layers_0_mlp_fc2", None)
    # SDXL refiner (its only text encoder is OpenCLIP-G) and SD2 in the sgm layout
    assert module_name("conditioner.embedders.0.model.transformer.resblocks.3.attn.out_proj.weight")[0] == (
        "lora_te_text_model_encoder_layers_3_self_attn_out_proj")
    assert module_name("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")[0] is None
    for key in ("cond_stage_model.model.text_projection", "cond_stage_model.model.ln_final.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"):
        assert module_pieces(key)[0] == () and "OpenCLIP" in module_pieces(key)[1]


def test_fused_weight_whose_rows_do_not_split_in_three_names_file_and_key(tmp_path):
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    base = {key: torch.zeros(70, 8)}
    with pytest.raises(lycoris_core.LycorisShapeError, match="70 rows do not split into 3") as info:
        extract(base, {key: torch.ones(70, 8)}, rule=RankRule("fixed", 2))
    assert key in str(info.value)
