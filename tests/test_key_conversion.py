"""A host's state-dict key conversion run before grouping (`load_file(convert=...)`).

The oracle for each converter is the file written with the keys it would produce: loading the
original through the converter must give the same modules, merging to the same weights.
"""
import pytest
import torch
from safetensors.torch import save_file

from lycoris_core import LycorisFormatError, load_file
from lycoris_core.io import DictSource, RenamedSource, TensorSource
from lycoris_core.key_conversion import convert_source


def lora(prefix, out_dim=12, in_dim=8, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_down.weight": torch.randn(rank, in_dim, generator=g),
            f"{prefix}.lora_up.weight": torch.randn(out_dim, rank, generator=g),
            f"{prefix}.alpha": torch.tensor(2.0)}


def rename(sd):
    """Wan-Fun style: a doubled underscore after the prefix (a pure rename, in place)."""
    for key in [k for k in sd if k.startswith("lora_unet__")]:
        sd["lora_unet_" + key[len("lora_unet__"):]] = sd.pop(key)
    return sd


def split_rows(sd):
    """Computes with values: a fused up matrix split into two modules by rows."""
    out = {}
    for key, value in sd.items():
        if key.startswith("fused."):
            suffix = key[len("fused."):]
            parts = value.split(6, dim=0) if suffix == "lora_up.weight" else (value, value)
            for name, part in zip(("first", "second"), parts):
                out[f"{name}.{suffix}"] = part.contiguous() if part.ndim else part
        else:
            out[key] = value
    return out


def same_modules(a, b):
    assert set(a) == set(b)
    for name in a:
        w = torch.randn(a[name].target_shape)
        assert torch.equal(a[name].merge(w, 0.7), b[name].merge(w, 0.7)), name


def test_renaming_converter_reads_no_data_and_matches_the_renamed_file(tmp_path):
    original, renamed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(lora("lora_unet__blocks_0_k"), str(original))
    save_file(lora("lora_unet_blocks_0_k"), str(renamed))
    src = TensorSource(str(original))
    reads = []
    get = src._handle.get_tensor
    src._handle = type("Handle", (), {"get_tensor": lambda self, k: reads.append(k) or get(k)})()
    converted, changed = convert_source(src, rename)
    assert isinstance(converted, RenamedSource) and changed == 3 and reads == []
    assert sorted(converted) == sorted(TensorSource(str(renamed)))
    got = load_file(str(original), convert=rename)
    assert got.converted_keys == 3 and list(got) == ["lora_unet_blocks_0_k"]
    same_modules(got, load_file(str(renamed)))


def test_converter_that_needs_the_values_runs_on_the_real_tensors(tmp_path):
    original, expected = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sd = lora("fused")
    save_file(sd, str(original))
    save_file({k: v.clone() for k, v in split_rows(sd).items()}, str(expected))
    got = load_file(str(original), convert=split_rows)
    assert sorted(got) == ["first", "second"] and got.converted_keys == 3 + 2  # 3 keys renamed, 2 row blocks made
    same_modules(got, load_file(str(expected)))


def test_tensors_made_by_the_converter_are_kept():
    def add_shape(sd):
        out = dict(sd)
        out["extra.reshape_weight"] = torch.tensor([3, 4])
        return out

    src = DictSource(lora("m"), name="mem.safetensors")
    converted, changed = convert_source(src, add_shape)
    assert changed == 1 and torch.equal(converted["extra.reshape_weight"], torch.tensor([3, 4]))
    assert converted.shape("m.lora_up.weight") == (12, 4)


def test_identity_and_no_converter_leave_the_source_alone():
    src = DictSource(lora("m"))
    assert convert_source(src, None) == (src, 0)
    assert convert_source(src, lambda sd: sd) == (src, 0)
    assert load_file(lora("m"), convert=lambda sd: sd).converted_keys == 0


def test_a_converter_that_fails_on_the_data_names_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file(lora("m"), str(path))

    def broken(sd):
        raise KeyError("img_in.lora_A.weight")

    with pytest.raises(LycorisFormatError, match=r"bad\.safetensors.*key conversion failed.*KeyError"):
        load_file(str(path), convert=broken)
