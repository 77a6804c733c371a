"""Broken and unusual files: every error or warning names the file, the key and the reason."""
import json
import struct
import warnings

import pytest
import torch

from lycoris_core import (REGISTRY, LayerSpec, LycorisError, LycorisFormatError, LycorisShapeError,
                          LycorisWarning, load_file, save_file)
from lycoris_core.io import read_header, write_safetensors

A = "lora_unet_down_blocks_0_attentions_0_proj_in"
B = "lora_unet_up_blocks_1_attentions_0_proj_out"


def lora(name: str, out: int = 8, inp: int = 6, rank: int = 2, alpha=1.0, seed: int = 0) -> dict:
    """File tensors of one LoRA module; alpha None leaves the key out."""
    g = torch.Generator().manual_seed(seed)
    t = {f"{name}.lora_up.weight": torch.randn(out, rank, generator=g),
         f"{name}.lora_down.weight": torch.randn(rank, inp, generator=g)}
    if alpha is not None:
        t[f"{name}.alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    return t


def write(tmp_path, tensors: dict, name: str = "adapter.safetensors", metadata=None) -> str:
    return write_safetensors(tensors, tmp_path / name, metadata)


def write_raw(tmp_path, header: dict, data: bytes, name: str = "bad.safetensors") -> str:
    """A file with exactly this header and data, however wrong they are."""
    raw = json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def assert_names(exc_or_msg, path: str, key: str | None, *reasons: str) -> None:
    msg = str(exc_or_msg)
    assert str(path) in msg, msg
    if key is not None:
        assert key in msg, msg
    for reason in reasons:
        assert reason in msg, msg


def one_warning(record, *needles: str) -> str:
    """The single LycorisWarning whose text contains every needle."""
    found = [str(w.message) for w in record
             if issubclass(w.category, LycorisWarning) and all(n in str(w.message) for n in needles)]
    assert len(found) == 1, [str(w.message) for w in record]
    return found[0]


# ----- unreadable files ------------------------------------------------------------------------

def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my training notes, not tensors\n" * 4)
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "not a safetensors file")


def test_pickle_checkpoint_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"x": torch.zeros(3)}, path)
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "not a safetensors file")


def test_tiny_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "not a safetensors file", "3 bytes")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "cannot read file")


def test_truncated_data(tmp_path):
    path = write(tmp_path, lora(A) | lora(B))
    header, _ = read_header(path)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-5])
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, last, "run past the end", "truncated")


def test_truncated_inside_header(tmp_path):
    path = write(tmp_path, lora(A))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:40])
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, None, "truncated", "header length")


def test_header_not_json(tmp_path):
    path = tmp_path / "garbled.safetensors"
    raw = b'{"lora_unet_x.alpha": {"dtype": "F32",, }'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "header is not valid JSON")


def test_header_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    raw = b"[1, 2, 3]"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "not a JSON object")


def test_metadata_must_be_strings(tmp_path):
    path = write_raw(tmp_path, {"__metadata__": {"ss_steps": 100}}, b"")
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, None, "__metadata__ must map strings to strings")


def _f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("case, header, data_len, key, reason", [
    ("overlap", {"a.alpha": _f32([0, 8]), "b.alpha": _f32([4, 12])}, 12, "b.alpha", "overlaps"),
    ("past-end", {"a.alpha": _f32([0, 8]), "b.alpha": _f32([8, 16])}, 12, "b.alpha", "past the end"),
    ("size-mismatch", {"a.alpha": _f32([0, 8], shape=(3,))}, 8, "a.alpha", "needs 12"),
    ("gap", {"a.alpha": _f32([0, 8]), "b.alpha": _f32([12, 20])}, 20, "b.alpha", "gap after"),
    ("trailing-bytes", {"a.alpha": _f32([0, 8]), "b.alpha": _f32([8, 16])}, 24, "b.alpha",
     "trailing bytes"),
    ("negative-shape", {"a.alpha": _f32([0, 8], shape=(-2,))}, 8, "a.alpha", "invalid shape"),
], ids=lambda v: v if isinstance(v, str) and "." not in v and " " not in v else "")
def test_header_lies_about_offsets(tmp_path, case, header, data_len, key, reason):
    path = write_raw(tmp_path, header, bytes(data_len))
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, key, reason)


def test_unknown_dtype(tmp_path):
    path = write_raw(tmp_path, {f"{A}.alpha": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 4]}},
                     bytes(4))
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, f"{A}.alpha", "unknown dtype 'Q4_K'")


def test_header_entry_without_offsets(tmp_path):
    path = write_raw(tmp_path, {f"{A}.alpha": {"dtype": "F32", "shape": [1]}}, bytes(4))
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, f"{A}.alpha", "lacks dtype/shape/data_offsets")


# ----- modules that cannot be used -------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_skips_module_and_strict_raises(tmp_path, bad):
    tensors = lora(A) | lora(B)
    tensors[f"{A}.lora_down.weight"][1, 3] = bad
    path = write(tmp_path, tensors)
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    msg = one_warning(record, "NaN or Inf")
    assert_names(msg, path, f"{A}.lora_down.weight", "1 of 12 values", "skipped")
    assert A not in af and B in af
    assert any(p.level == "error" and p.key == f"{A}.lora_down.weight" for p in af.problems)
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, f"{A}.lora_down.weight", "NaN or Inf")


def test_ranks_disagree_inside_module(tmp_path):
    tensors = lora(A) | lora(B)
    tensors[f"{A}.lora_up.weight"] = torch.randn(8, 3)  # down has rank 2
    path = write(tmp_path, tensors)
    with pytest.raises(LycorisShapeError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, f"{A}.lora_up.weight", "rank", "3 does not match 2")
    with pytest.warns(LycorisWarning, match="does not match"):
        af = load_file(path)
    assert A not in af and B in af


def test_unknown_key_suffix_warns_and_keeps_the_rest(tmp_path):
    tensors = lora(A) | {f"{A}.lora_sideways.weight": torch.zeros(3)}
    path = write(tmp_path, tensors)
    for strict in (False, True):  # an unused key never makes a file unusable
        with pytest.warns(LycorisWarning) as record:
            af = load_file(path, strict=strict)
        msg = one_warning(record, "unknown key suffix")
        assert_names(msg, path, f"{A}.lora_sideways.weight", "no algorithm uses this key")
        assert A in af
        assert [p.key for p in af.problems] == [f"{A}.lora_sideways.weight"]


def test_keys_of_no_algorithm(tmp_path):
    tensors = lora(A)
    del tensors[f"{A}.lora_down.weight"]  # up and alpha, but no down
    tensors |= lora(B)
    path = write(tmp_path, tensors)
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    msg = one_warning(record, "no algorithm matches")
    assert_names(msg, path, A, "alpha, lora_up.weight", "skipped")
    assert list(af) == [B]
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, A, "no algorithm matches keys")


def test_impossible_ndim_is_a_clear_error(tmp_path):
    tensors = lora(A)
    tensors[f"{A}.lora_down.weight"] = torch.randn(2)  # 1-d down: no input dimension
    path = write(tmp_path, tensors)
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, A, "lora")


# ----- alpha -----------------------------------------------------------------------------------

def test_missing_alpha_is_one_aggregated_warning(tmp_path):
    names = [f"lora_unet_mid_block_attentions_0_proj_{i}" for i in range(3)]
    tensors = {}
    for i, n in enumerate(names):
        tensors |= lora(n, rank=2, alpha=None, seed=i)
    path = write(tmp_path, tensors)
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    msg = one_warning(record, "without alpha")
    assert len([w for w in record if issubclass(w.category, LycorisWarning)]) == 1
    assert_names(msg, path, names[0], "3 modules without alpha", "alpha = rank (scale 1)")
    assert all(af[n].alpha is None and af[n].scale == 1.0 for n in names)


def test_alpha_zero_means_scale_one(tmp_path):
    path = write(tmp_path, lora(A, rank=2, alpha=0.0) | lora(B, rank=2, alpha=0.0, seed=1))
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    msg = one_warning(record, "alpha 0")
    assert_names(msg, path, f"{A}.alpha", "2 modules", "alpha = rank (scale 1)", "ComfyUI")
    ref = load_file(lora(A, rank=2, alpha=2.0))[A]
    w = torch.randn(8, 6)
    assert af[A].scale == 1.0
    assert torch.equal(af[A].merge(w), ref.merge(w))


@pytest.mark.parametrize("alpha", [torch.tensor(2, dtype=torch.int64),
                                   torch.tensor([2.0], dtype=torch.float16),
                                   torch.tensor([2], dtype=torch.int32)],
                         ids=["int64-0d", "fp16-1elem-1d", "int32-1elem-1d"])
def test_alpha_stored_as_int_or_one_element_vector(tmp_path, alpha):
    path = write(tmp_path, lora(A, rank=4, alpha=alpha))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        af = load_file(path, strict=True)
    assert af[A].alpha == 2.0 and af[A].scale == 0.5
    w = torch.randn(8, 6)
    assert torch.equal(af[A].merge(w), load_file(lora(A, rank=4, alpha=2.0))[A].merge(w))


def test_alpha_with_several_values_is_a_shape_error(tmp_path):
    path = write(tmp_path, lora(A, alpha=torch.tensor([1.0, 2.0])))
    with pytest.raises(LycorisShapeError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, f"{A}.alpha", "expected a single number", "[2]")


# ----- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.float8_e5m2, "F8_E5M2")])
def test_fp8_tensors_load_upcast_with_warning(tmp_path, dtype, name):
    tensors = {k: (v * 0.5).to(dtype) if v.ndim else v for k, v in lora(A, rank=2).items()}
    path = write(tmp_path, tensors)
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    msg = one_warning(record, "fp8")
    assert_names(msg, path, f"{A}.lora_down.weight", f"2 tensors stored in fp8 ({name})",
                 "upcast to fp32")
    adapter = af[A]
    assert adapter.up.dtype == torch.float32 and adapter.down.dtype == torch.float32
    upcast = load_file({k: v.float() for k, v in tensors.items()})[A]
    w = torch.randn(8, 6)
    assert torch.equal(adapter.merge(w), upcast.merge(w))
    assert af.dtypes[f"{A}.lora_up.weight"] == name


def test_half_precision_file_merges_into_half_weight(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in lora(A, rank=2).items()}
    af = load_file(write(tmp_path, tensors), strict=True)
    w = torch.randn(8, 6, dtype=torch.float16)
    out = af[A].merge(w, 0.8)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ----- an adapter for another layer -----------------------------------------------------------

def _saved(tmp_path, adapter, name: str):
    """The adapter as read back from a file, so errors can name file and module."""
    path = save_file({name: adapter}, tmp_path / f"{name}.safetensors")
    return path, load_file(path, strict=True)[name]


def _randomized(adapter):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return adapter


@pytest.mark.parametrize("layer_shape, wrong_shape", [
    ((8, 6), (8, 5)), ((8, 6), (7, 6)), ((8, 6, 3, 3), (8, 6, 1, 1)), ((8, 6, 3, 3), (8, 5, 3, 3)),
], ids=["linear-in", "linear-out", "conv-kernel", "conv-in"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_merge_shape_mismatch_leaves_weight_untouched(tmp_path, layer_shape, wrong_shape, inplace):
    spec = LayerSpec.from_weight(torch.randn(layer_shape))
    path, adapter = _saved(tmp_path, _randomized(REGISTRY["lora"].create(spec, rank=2)), A)
    weight = torch.randn(wrong_shape)
    before = weight.clone()
    with pytest.raises(LycorisShapeError) as e:
        adapter.merge(weight, 1.0, inplace=inplace)
    assert_names(e.value, path, A, str(list(wrong_shape)), "another model")
    assert torch.equal(weight, before)


@pytest.mark.parametrize("algo", sorted(a for a, cls in REGISTRY.items() if hasattr(cls, "create")))
def test_every_algorithm_refuses_another_layer(tmp_path, algo):
    layer = torch.nn.LayerNorm(64) if algo == "norm" else torch.nn.Linear(64, 64)
    wrong_shapes = [(48,), (80,)] if algo == "norm" else [(40, 64), (56, 72)]
    try:
        created = REGISTRY[algo].create(LayerSpec.from_module(layer))
    except (LycorisError, NotImplementedError) as exc:
        pytest.skip(f"{algo} cannot be created: {exc}")
    path, adapter = _saved(tmp_path, _randomized(created), A)
    for wrong in wrong_shapes:
        weight = torch.randn(wrong)
        before = weight.clone()
        for inplace in (False, True):
            with pytest.raises(LycorisShapeError) as e:
                adapter.merge(weight, 1.0, inplace=inplace)
            assert_names(e.value, path, A)
            assert torch.equal(weight, before), f"{algo} changed the weight before failing"
