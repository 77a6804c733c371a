"""`python -m lycoris_core resize`: lossless at full rank, the best rank-r approximation below it
(Eckart-Young, checked against torch.linalg.svd of the dense change), DoRA kept, LoHa/LoKr
converted, other algorithms refused or copied."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save

import lycoris_core
from lycoris_core.__main__ import main
from lycoris_core.tools.lowrank import RankRule
from lycoris_core.tools.resize import resize

pytestmark = pytest.mark.filterwarnings("ignore::lycoris_core.LycorisWarning")

EXAMPLE = lycoris_core.adapter_file.__file__.replace("adapter_file.py", "examples/example_sd15_mixed.safetensors")
RESIZABLE = {"lora", "loha", "lokr"}


def _base_weight(adapter, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(adapter.target_shape, generator=g)


def _change(adapter, weight: torch.Tensor) -> torch.Tensor:
    return adapter.merge(weight) - weight


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_resize_to_full_rank_is_lossless_for_every_resizable_module(tmp_path):
    out = tmp_path / "full.safetensors"
    assert main(["resize", EXAMPLE, "--out", str(out), "--rank", "1000", "--keep-unsupported",
                 "--dtype", "fp32", "--quiet", "--device", "cpu"]) == 0
    src, new = lycoris_core.load_file(EXAMPLE), lycoris_core.load_file(str(out))
    assert set(new) == set(src) and not new.problems
    resized = [n for n, a in src.items() if a.algo in RESIZABLE]
    assert len(resized) >= 9  # LoRA, LoCon, Tucker, LoHa, LoKr, DoRA on both axes
    for name in src:
        w = _base_weight(src[name]) if src[name].target_shape else None
        if name in resized:
            assert new[name].algo == "lora" and new[name].alpha == new[name].rank
            assert (new[name].dora_axis == src[name].dora_axis)
            # DoRA included: the whole patched weight is unchanged
            assert _rel(new[name].merge(w), src[name].merge(w)) < 1e-5, name
        else:
            assert new[name].algo == src[name].algo  # copied unchanged
            if w is not None:
                assert torch.equal(new[name].merge(w), src[name].merge(w)), name


def _small_file(path) -> str:
    """LoRA, LoCon, Tucker LoCon, LoHa, LoKr and LoRA+DoRA modules of small layers."""
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    tensors = {
        "lora_unet_lin.lora_up.weight": r(48, 6), "lora_unet_lin.lora_down.weight": r(6, 40),
        "lora_unet_lin.alpha": torch.tensor(3.0),
        "lora_unet_conv.lora_up.weight": r(24, 5, 1, 1), "lora_unet_conv.lora_down.weight": r(5, 16, 3, 3),
        "lora_unet_tucker.lora_up.weight": r(24, 4, 1, 1), "lora_unet_tucker.lora_down.weight": r(4, 16, 1, 1),
        "lora_unet_tucker.lora_mid.weight": r(4, 4, 3, 3), "lora_unet_tucker.alpha": torch.tensor(2.0),
        "lora_unet_loha.hada_w1_a": r(40, 3), "lora_unet_loha.hada_w1_b": r(3, 30),
        "lora_unet_loha.hada_w2_a": r(40, 3), "lora_unet_loha.hada_w2_b": r(3, 30),
        "lora_unet_loha.alpha": torch.tensor(3.0),
        "lora_unet_lokr.lokr_w1": r(4, 5), "lora_unet_lokr.lokr_w2": r(10, 6),
        "lora_unet_dora.lora_up.weight": r(48, 4), "lora_unet_dora.lora_down.weight": r(4, 40),
        "lora_unet_dora.dora_scale": r(48, 1).abs() + 1,
    }
    st_save(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_resize_to_lower_rank_is_the_best_approximation(tmp_path, rank):
    src = lycoris_core.load_file(_small_file(tmp_path / "small.safetensors"))
    assert {a.algo for a in src.values()} == {"lora", "loha", "lokr"}
    _, result = resize(src, rule=RankRule("fixed", rank))
    rows = {r.name: r for r in result.rows}
    for name, adapter in src.items():
        zero = torch.zeros(adapter.target_shape)
        true = (adapter.diff(zero, None, adapter.prepare("cpu", torch.float32))
                .reshape(zero.shape[0], -1).double())  # the change without DoRA
        u, s, vh = torch.linalg.svd(true, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        new = result.adapters[name]
        got = new.diff(zero, None, new.prepare("cpu", torch.float32)).reshape(zero.shape[0], -1).double()
        want_err = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        assert new.rank == rank and new.dora_axis == adapter.dora_axis, name
        assert float((got - best).norm() / best.norm()) < 1e-4, name
        assert abs(float((got - true).norm() / true.norm()) - want_err) < 1e-4, name
        assert abs(rows[name].rel_error - want_err) < 1e-4, name


def test_resize_dynamic_rule_and_metadata(tmp_path):
    path = _small_file(tmp_path / "small.safetensors")
    out = tmp_path / "fro.safetensors"
    assert main(["resize", path, "--out", str(out), "--sv-fro", "0.9", "--quiet"]) == 0
    src, new = lycoris_core.load_file(path), lycoris_core.load_file(str(out))
    for name, adapter in src.items():
        zero = torch.zeros(adapter.target_shape)
        true = adapter.diff(zero, None, adapter.prepare("cpu", torch.float32))
        s = torch.linalg.svdvals(true.reshape(zero.shape[0], -1).double())
        kept = (torch.cumsum(s ** 2, 0) / (s ** 2).sum()).sqrt()
        assert new[name].rank == int((kept < 0.9).sum()) + 1, name
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("lora_up.weight")}
    assert meta["ss_network_dim"] == "Dynamic" and "resized from" in meta["ss_training_comment"]
    assert dtypes == {torch.float32}  # the input file's dtype


def test_resize_refuses_unsupported_modules_naming_the_key(tmp_path, capsys):
    assert main(["resize", EXAMPLE, "--out", str(tmp_path / "x.safetensors"), "--rank", "2"]) == 1
    err = capsys.readouterr().err
    assert EXAMPLE in err and "cannot be expressed as a LoRA" in err and "--keep-unsupported" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_resize_of_a_kohya_lora_keeps_alpha_scale_and_refuses_overwrite(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    path = tmp_path / "k.safetensors"
    st_save({"lora_unet_a.lora_up.weight": up, "lora_unet_a.lora_down.weight": down,
             "lora_unet_a.alpha": torch.tensor(3.0)}, str(path))
    out = tmp_path / "k4.safetensors"
    assert main(["resize", str(path), "--out", str(out), "--rank", "6", "--quiet"]) == 0
    new = lycoris_core.load_file(str(out))["lora_unet_a"]
    w = torch.zeros(40, 30)
    assert _rel(new.merge(w), up @ down * 0.5) < 1e-5
    assert main(["resize", str(path), "--out", str(out), "--rank", "2"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert main(["resize", str(path), "--out", str(path), "--rank", "2", "--force"]) == 1
    assert "also an input file" in capsys.readouterr().err
