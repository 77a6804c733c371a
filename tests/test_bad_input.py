"""Broken and unusual files: every error or warning names the file, the key and the reason."""
import hashlib
import io
import json
import os
import struct
import threading
import warnings

import pytest
import torch

from lycoris_core import (REGISTRY, LayerSpec, LycorisError, LycorisFormatError,
                          LycorisOverflowError, LycorisShapeError, LycorisWarning, inspect_file,
                          load_file, save_file)
from lycoris_core.inspect import run
from lycoris_core.io import TensorSource, read_header, write_safetensors

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


# ----- paths that are not regular files -------------------------------------------------------

def digest(path) -> str:
    """sha256 of a file's bytes: a bad file must never be modified by reading it."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def returns_within(seconds: float, fn, *args):
    """fn(*args) run in a daemon thread; fails the test (instead of hanging it) when it blocks."""
    out: dict = {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked for more than {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _fifo(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    return path


def _directory(tmp_path):
    path = tmp_path / "folder.safetensors"
    path.mkdir()
    return path


def _device_link(tmp_path):
    path = tmp_path / "device.safetensors"
    path.symlink_to("/dev/zero")
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX paths")
@pytest.mark.parametrize("make, kind", [(_fifo, "a named pipe"), (_directory, "a directory"),
                                        (_device_link, "a character device")],
                         ids=["fifo", "directory", "device"])
def test_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, make, kind):
    path = make(tmp_path)
    with pytest.raises(LycorisFormatError) as e:
        returns_within(10, load_file, path)
    assert type(e.value) is LycorisFormatError
    assert_names(e.value, str(path), None, f"is {kind}, not a regular file")
    err = io.StringIO()
    assert returns_within(10, inspect_run, str(path), False, io.StringIO(), err) == 1
    assert_names(err.getvalue(), str(path), None, f"is {kind}, not a regular file")


def inspect_run(path, as_json, out, err):
    """The inspect command as the CLI runs it."""
    return run(path, as_json=as_json, out=out, err=err)


def test_symlink_loop_is_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(LycorisFormatError) as e:
        load_file(a)
    assert type(e.value) is LycorisFormatError
    assert_names(e.value, str(a), None, "cannot read file", "symbolic links")


# ----- a file changing while it is read --------------------------------------------------------

def test_file_rewritten_while_it_is_read_is_refused(tmp_path):
    path = write(tmp_path, lora(A) | lora(B))
    src = TensorSource(path)
    first = next(iter(src))
    with open(path, "ab") as f:  # another program appends / rewrites the file meanwhile
        f.write(bytes(64))
    with pytest.raises(LycorisFormatError) as e:
        src[first]
    assert_names(e.value, path, first, "file changed on disk while it was read", "-> ")


def test_file_replaced_during_load_fails_the_whole_load(tmp_path):
    """Changed between the header and the data: a file error (strict or not), never a module
    silently skipped or read from the new file's bytes."""
    path = write(tmp_path, lora(A) | lora(B))
    other = write(tmp_path, lora(A, seed=3) | lora(B, seed=4), name="other.safetensors")

    def convert(sd):  # runs after the header was read and before any data is
        os.replace(other, path)
        return sd

    with pytest.raises(LycorisFormatError) as e:
        load_file(path, convert=convert)
    assert_names(e.value, path, None, "file changed on disk while it was read")
    assert e.value.key in lora(A) | lora(B)


# ----- shapes, offsets and keys a header lies about --------------------------------------------

def test_shape_too_large_to_allocate_is_refused_before_reading(tmp_path):
    huge = [1 << 40, 1 << 40]
    path = write_raw(tmp_path, {f"{A}.lora_down.weight": {"dtype": "F32", "shape": huge,
                                                           "data_offsets": [0, 8]}}, bytes(8))
    before = digest(path)
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, f"{A}.lora_down.weight", "span 8 bytes", str(huge))
    assert digest(path) == before


def test_offsets_far_outside_the_file(tmp_path):
    path = write_raw(tmp_path, {f"{A}.alpha": _f32([1 << 62, (1 << 62) + 8])}, bytes(8))
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, path, f"{A}.alpha", "run past the end of the data")


def test_duplicate_key_in_the_header_is_refused(tmp_path):
    entry = json.dumps(_f32([0, 8]))
    raw = (f'{{"{A}.alpha": {entry}, "{B}.alpha": {json.dumps(_f32([8, 16]))}, '
           f'"{A}.alpha": {entry}}}').encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), f"{A}.alpha", "names", "twice")


def test_two_spellings_of_one_key_make_the_module_ambiguous(tmp_path):
    tensors = lora(A) | lora(B)
    tensors[f"{A}.lora_A.weight"] = torch.randn(2, 6)  # peft spelling of lora_down.weight
    path = write(tmp_path, tensors)
    before = digest(path)
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    msg = one_warning(record, "same tensor")
    assert_names(msg, path, f"{A}.lora_", "two spellings of one key", "skipped")
    assert list(af) == [B]
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert type(e.value) is LycorisError
    assert_names(e.value, path, f"{A}.lora_", "ambiguous")
    assert digest(path) == before


@pytest.mark.parametrize("name", ["", ".", "..", "..."])
def test_module_names_empty_or_only_dots_match_no_layer(tmp_path, name):
    tensors = {f"{name}.{k.split('.', 1)[1]}": v for k, v in lora(A).items()} | lora(B)
    path = write(tmp_path, tensors)
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path, strict=True)  # a name is no reason to refuse the file
    msg = one_warning(record, "empty or only dots")
    assert_names(msg, path, f"{name}.", f"module name {name!r}", "matches no layer", "skipped")
    assert list(af) == [B]
    assert any("matches no layer" in p.reason for p in af.problems)


# ----- factor tensors ---------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", [((8, 0), (0, 6)), ((8, 2), (2, 0))], ids=["rank-0", "no-inputs"])
def test_rank_zero_or_empty_factors_name_the_key(tmp_path, shapes):
    tensors = lora(A) | lora(B)
    tensors[f"{A}.lora_up.weight"] = torch.zeros(shapes[0])
    tensors[f"{A}.lora_down.weight"] = torch.zeros(shapes[1])
    path = write(tmp_path, tensors)
    with pytest.raises(LycorisShapeError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, f"{A}.lora_", "tensor is empty", "rank-0")
    with pytest.warns(LycorisWarning, match="tensor is empty"):
        af = load_file(path)
    assert list(af) == [B]


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool])
def test_integer_and_bool_factors_are_refused(tmp_path, dtype):
    tensors = lora(A) | lora(B)
    tensors[f"{A}.lora_down.weight"] = torch.ones(2, 6, dtype=dtype)
    path = write(tmp_path, tensors)
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert type(e.value) is LycorisError
    name = str(dtype).replace("torch.", "")
    assert_names(e.value, path, f"{A}.lora_down.weight", f"dtype {name} is not a float dtype")
    with pytest.warns(LycorisWarning, match="not a float dtype"):
        assert list(load_file(path)) == [B]


def test_alpha_stored_as_bool_is_refused(tmp_path):
    path = write(tmp_path, lora(A, alpha=torch.tensor(True)) | lora(B))
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert type(e.value) is LycorisError
    assert_names(e.value, path, f"{A}.alpha", "stored as bool", "expected a number")


def test_alpha_nan_is_refused(tmp_path):
    path = write(tmp_path, lora(A, alpha=float("nan")) | lora(B))
    with pytest.raises(LycorisError) as e:
        load_file(path, strict=True)
    assert_names(e.value, path, f"{A}.alpha", "value is NaN")


def test_negative_alpha_warns_once(tmp_path):
    path = write(tmp_path, lora(A, rank=2, alpha=-4.0) | lora(B, rank=2, alpha=-1.0, seed=1))
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path, strict=True)
    msg = one_warning(record, "negative alpha")
    assert_names(msg, path, f"{A}.alpha", "2 modules", "e.g. -4", "subtracted")
    assert af[A].scale == -2.0


# ----- products that overflow the weight's dtype -----------------------------------------------

def _overflowing(tmp_path, value: float, rank: int = 1):
    """A file whose LoRA factors are finite (fp32) but whose product is `value` * rank everywhere."""
    tensors = {f"{A}.lora_up.weight": torch.full((8, rank), value),
               f"{A}.lora_down.weight": torch.full((rank, 6), value),
               f"{A}.alpha": torch.tensor(float(rank))} | lora(B)
    path = write(tmp_path, tensors)
    return path, load_file(path, strict=True)


@pytest.mark.parametrize("dtype, value, strength, reason", [
    (torch.float16, 300.0, 1.0, "beyond the range of float16"),
    (torch.bfloat16, 1.5e19, 2.0, "NaN or Inf"),
    (torch.float32, 1e20, 1.0, "NaN or Inf"),
], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_merge_that_overflows_is_refused(tmp_path, dtype, value, strength, reason, inplace):
    path, af = _overflowing(tmp_path, value)
    before = digest(path)
    weight = torch.randn(8, 6).to(dtype)
    original = weight.clone()
    with pytest.raises(LycorisOverflowError) as e:
        af[A].merge(weight, strength, inplace=inplace)
    assert_names(e.value, path, A, f"merged weight at strength {strength:g}", reason, "refused")
    if not inplace:
        assert torch.equal(weight, original)
    assert torch.isfinite(af[B].merge(torch.randn(8, 6).to(dtype), strength)).all()  # B is fine
    assert digest(path) == before


def test_merge_refuses_results_beyond_the_dtype_they_will_be_stored_in(tmp_path):
    """ComfyUI merges into an fp32 working copy of an fp16 weight: the range is the fp16 one."""
    path, af = _overflowing(tmp_path, 300.0)
    working = torch.randn(8, 6)
    with pytest.raises(LycorisOverflowError) as e:
        af[A].merge(working, inplace=True, store_dtype=torch.float16)
    assert_names(e.value, path, A, "beyond the range of float16", "9e+04")
    assert torch.isfinite(af[A].merge(torch.randn(8, 6), store_dtype=torch.float32)).all()


def test_full_diff_beyond_half_precision_is_refused(tmp_path):
    tensors = {f"{A}.diff": torch.full((8, 6), 1e5)}
    path = write(tmp_path, tensors)
    adapter = load_file(path, strict=True)[A]
    with pytest.raises(LycorisOverflowError) as e:
        adapter.check_range(torch.float16)
    assert_names(e.value, path, A, "change at strength 1", "beyond the range of float16")
    adapter.check_range(torch.float32)


@pytest.mark.parametrize("dtype, value", [(torch.float16, 300.0), (torch.float32, 1e20)])
def test_bypass_overflow_is_caught_when_the_adapter_is_checked(tmp_path, dtype, value):
    """Bypass never builds the merged weight: `check_range` (run by the loader nodes before any
    patch) refuses the same modules merge would."""
    path, af = _overflowing(tmp_path, value)
    with pytest.raises(LycorisOverflowError) as e:
        af[A].check_range(dtype)
    assert_names(e.value, path, A, "strength 1")
    af[B].check_range(dtype)
    af[A].check_range(dtype, 0.0)


def test_range_check_confirms_a_loose_bound_before_refusing(tmp_path):
    """Factors with large norms whose product cancels: the bound exceeds fp16, the change is 0."""
    tensors = {f"{A}.lora_up.weight": torch.tensor([[300.0, 300.0]]).repeat(8, 1),
               f"{A}.lora_down.weight": torch.tensor([[300.0], [-300.0]]).repeat(1, 6),
               f"{A}.alpha": torch.tensor(2.0)}
    adapter = load_file(write(tmp_path, tensors), strict=True)[A]
    assert adapter.delta_bound() > torch.finfo(torch.float16).max
    adapter.check_range(torch.float16)


LAYERS = {"linear": lambda: torch.nn.Linear(64, 64), "norm": lambda: torch.nn.LayerNorm(64),
          "conv": lambda: torch.nn.Conv2d(16, 32, 3)}
# case -> (algorithm, layer kind, create() keywords): every registered algorithm by its own name,
# then the options that change the bound (DoRA, rescale, input side, Tucker, conv)
RANGE_CASES = {algo: (algo, "norm" if algo == "norm" else "linear", {}) for algo in REGISTRY} | {
    "lora-dora-out": ("lora", "linear", {"dora": "out"}),
    "lora-dora-in": ("lora", "linear", {"dora": "in"}),
    "loha-dora-out": ("loha", "linear", {"dora": "out"}),
    "lokr-dora-in": ("lokr", "linear", {"dora": "in"}),
    "lora-tucker-conv": ("lora", "conv", {"use_tucker": True}),
    "glora-conv": ("glora", "conv", {}),
    "ia3-on-input": ("ia3", "linear", {"on_input": True}),
    "diag-oft-rescaled": ("diag-oft", "linear", {"rescaled": True}),
    "diag-oft-rescaled-conv": ("diag-oft", "conv", {"rescaled": True}),
    "boft-rescaled": ("boft", "linear", {"rescaled": True}),
    "full-set-weight": ("full", "linear", {}),
}
# layouts with no create(): file tensors (suffix -> tensor) from the weight shape, a generator, a std
READ_ONLY_CASES = {
    "diag-oft-legacy": lambda shape, g, std: {"oft_diag": torch.randn(8, 8, 8, generator=g) * std},
    "full-set-weight": lambda shape, g, std: {"set_weight": torch.randn(shape, generator=g) * std},
}
MAGNITUDES = {"dora_scale", "rescale"}  # per-channel sizes, drawn apart from the factors
# (seed, factor std, magnitude std): small to large factors, then near-identity rotations with
# large rescales, then magnitudes near 0 (DoRA's W' near 0, a change near -W)
BOUND_TRIALS = ((1, 0.1, None), (2, 1.0, None), (3, 3.0, None), (4, 1e-3, 3.0), (5, 0.1, 1e-3))
# a rotation keeps the size of W: only a rescale can overflow
CANNOT_OVERFLOW = {"diag-oft", "boft"}


def _range_case(tmp_path, case: str, seed: int = 5, std: float = 0.1,
                magnitude_std: float | None = None):
    """(path, adapter read back from its file, the layer's weight) for a RANGE_CASES entry with
    every factor drawn from N(0, std), a DoRA magnitude or OFT rescale from N(0, magnitude_std
    or std)."""
    algo, kind, options = RANGE_CASES[case]
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"{case}-{seed}.safetensors"
    if case in READ_ONLY_CASES:
        tensors = READ_ONLY_CASES[case](tuple(layer.weight.shape), g, std)
        write_safetensors({f"{A}.{k}": v for k, v in tensors.items()}, path)
    else:
        created = REGISTRY[algo].create(LayerSpec.from_module(layer), **options)
        with torch.no_grad():
            for name, p in created.named_parameters():
                scale = magnitude_std if name in MAGNITUDES and magnitude_std else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        save_file({A: created}, path)
    with warnings.catch_warnings():  # the legacy layout's reading warning is tested elsewhere
        warnings.simplefilter("ignore", LycorisWarning)
        adapter = load_file(path, strict=True)[A]
    assert adapter.algo == algo
    return str(path), adapter, layer.weight.detach()


def _abs_max(t: torch.Tensor) -> float:
    return float(t.abs().max())


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_range_check_passes_every_trained_adapter(tmp_path, case):
    """A trained-scale module of every algorithm has a bound, and the bound alone passes it on an
    fp16 layer: no dense product in the common case."""
    _, adapter, weight = _range_case(tmp_path, case)
    weight = weight.half()
    bound = adapter.delta_bound(_abs_max(weight))
    assert bound is not None, f"{case}: no bound, so bypass never range-checks it"
    assert bound <= torch.finfo(torch.float16).max
    if not adapter.depends_on_weight:
        assert adapter.delta_bound() is not None
    adapter.check_range(torch.float16, weight=weight)


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
def test_delta_bound_is_above_the_true_change(tmp_path, case):
    """The bound is a true upper bound of max |W(1) - W|, checked against the dense merge for
    random factors (BOUND_TRIALS); tight enough to fail when a bound misses a term."""
    for seed, std, magnitude_std in BOUND_TRIALS:
        _, adapter, weight = _range_case(tmp_path, case, seed, std, magnitude_std)
        change = _abs_max(adapter.merge(weight) - weight)
        bound = adapter.delta_bound(_abs_max(weight))
        rounding = torch.finfo(torch.float32).eps * (_abs_max(weight) + bound)  # of (W + D) - W
        assert change <= (bound + rounding) * (1 + 1e-5), \
            f"{case} std {std}: change {change:g} > bound {bound:g}"


@pytest.mark.parametrize("case", sorted(set(RANGE_CASES) - CANNOT_OVERFLOW))
def test_finite_factors_overflowing_half_are_refused_by_the_range_check(tmp_path, case):
    """Factors ~1e6 (finite in every file dtype but fp16; with DoRA the magnitude) make a change
    beyond fp16 for every algorithm: the range check refuses it naming file and module and leaves
    the weight alone."""
    dora = "dora" in case  # large factors only change the direction that DoRA normalises away
    path, adapter, weight = _range_case(tmp_path, case, std=0.1 if dora else 1e6, magnitude_std=1e6)
    weight = weight.half()
    before = weight.clone()
    full = weight.float()
    change = adapter.merge(full) - full
    assert torch.isfinite(change).all() and _abs_max(change) > torch.finfo(torch.float16).max
    with pytest.raises(LycorisOverflowError) as e:
        adapter.check_range(torch.float16, weight=weight)
    assert_names(e.value, path, A, "at strength 1", "beyond the range of float16", "refused")
    assert torch.equal(weight, before)
    adapter.check_range(torch.float32, weight=full)
    adapter.check_range(torch.float16, 0.0, weight=weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_dependent_change_beyond_float32_is_refused(tmp_path, dtype):
    """(IA)^3 scales W: a finite scale times the layer's weight can leave float32 altogether."""
    tensors = {f"{A}.weight": torch.full((8,), 1e37), f"{A}.on_input": torch.tensor(0)}
    path = write(tmp_path, tensors)
    adapter = load_file(path, strict=True)[A]
    weight = torch.full((8, 6), 100.0, dtype=dtype)
    with pytest.raises(LycorisOverflowError) as e:
        adapter.check_range(dtype, weight=weight)
    assert_names(e.value, path, A, "strength 1", "NaN or Inf")
    adapter.check_range(dtype, weight=weight / 1e3)


def test_range_check_confirms_a_loose_weight_dependent_bound_with_the_layers_weight(tmp_path):
    """GLoRA factors whose product A1 A2 cancels: the bound from max |W| exceeds fp16, the change
    (B1 B2 only) is small, so the dense check with the real weight passes it."""
    tensors = {f"{A}.a1.weight": torch.full((6, 2), 300.0),
               f"{A}.a2.weight": torch.tensor([[300.0], [-300.0]]).repeat(1, 6),
               f"{A}.b1.weight": torch.full((8, 2), 0.1), f"{A}.b2.weight": torch.full((2, 6), 0.1),
               f"{A}.alpha": torch.tensor(2.0)}
    adapter = load_file(write(tmp_path, tensors), strict=True)[A]
    weight = torch.randn(8, 6).half()
    assert adapter.delta_bound(_abs_max(weight)) > torch.finfo(torch.float16).max
    adapter.check_range(torch.float16, weight=weight)


# ----- metadata ---------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_header_nested_thousands_of_levels_is_a_format_error(tmp_path):
    raw = ('{"__metadata__": {}, "x": ' + DEEP + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(LycorisFormatError) as e:
        load_file(path)
    assert_names(e.value, str(path), None, "header is not valid JSON", "nested too deeply")


@pytest.mark.parametrize("key", ["ss_network_args", "ss_tag_frequency"])
def test_metadata_nested_thousands_of_levels_is_reported_by_inspect(tmp_path, key):
    path = write(tmp_path, lora(A), metadata={key: DEEP})
    before = digest(path)
    report = inspect_file(path)
    problems = [p for p in report["problems"] if p["key"] == key]
    assert len(problems) == 1 and "nested too deeply" in problems[0]["reason"], report["problems"]
    assert digest(path) == before


def test_peft_config_nested_thousands_of_levels_is_ignored_with_the_alpha_warning(tmp_path):
    tensors = {f"{A}.lora_A.weight": torch.randn(2, 6), f"{A}.lora_B.weight": torch.randn(8, 2)}
    path = write(tmp_path, tensors, metadata={"lora_adapter_metadata": DEEP})
    with pytest.warns(LycorisWarning) as record:
        af = load_file(path)
    assert_names(one_warning(record, "without alpha"), path, A, "alpha = rank")
    assert af[A].scale == 1.0


def test_tag_counts_out_of_range_are_reported_not_raised(tmp_path):
    path = write(tmp_path, lora(A), metadata={"ss_tag_frequency": '{"d": {"cat": 1e999}}'})
    report = inspect_file(path)
    assert report["trigger_words"] == []
    assert any(p["key"] == "ss_tag_frequency" for p in report["problems"])


def test_catastrophic_peft_alpha_pattern_is_not_matched(tmp_path):
    """A file's alpha_pattern is a regular expression: one that backtracks exponentially would
    hang the load on a long module name; such patterns are ignored."""
    name = "a" * 40
    tensors = {f"{name}.lora_A.weight": torch.randn(2, 6), f"{name}.lora_B.weight": torch.randn(8, 2)}
    config = json.dumps({"lora_alpha": 4, "alpha_pattern": {"(a+)+b": 1}})
    path = write(tmp_path, tensors, metadata={"lora_adapter_metadata": config})
    af = returns_within(10, load_file, path)
    assert af[name].alpha == 4.0


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_dora_whose_norm_overflows_float32_is_refused_not_zeroed(mode):
    """Finite LoRA factors whose W + dW has row norms beyond float32: DoRA's rescale would divide
    by infinity and zero the weight silently; it is refused naming the module."""
    layer = torch.nn.Linear(8, 6)
    tensors = {"lora_down.weight": torch.full((2, 8), 1e10), "lora_up.weight": torch.full((6, 2), 1e10),
               "alpha": torch.tensor(2.0), "dora_scale": torch.ones(6, 1)}
    adapter = load_file({f"{A}.{k}": v for k, v in tensors.items()}, strict=True)[A]
    x = torch.randn(3, 8)
    with pytest.raises(LycorisOverflowError) as e:
        if mode == "merge":
            adapter.merge(layer.weight.detach(), 1.0)
        else:
            with torch.no_grad():
                adapter.bypass(x, layer.forward, 1.0, LayerSpec.from_module(layer))
    assert A in str(e.value)
