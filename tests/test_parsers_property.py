"""Property-based tests of every parser a file reaches: whatever the bytes, names, shapes, dtypes or
metadata, the answer is an adapter or a LycorisError naming the file, never another exception, a
hang or a silent non-finite weight. Hypothesis generates the inputs, so new classes of bad input
are found here rather than by users; sized to run in well under a minute on two cores."""
from __future__ import annotations

import itertools
import json
import math
import struct
import warnings

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lycoris_core import (LycorisError, LycorisFormatError, LycorisOverflowError,  # noqa: E402
                          inspect_file, load_file)
from lycoris_core.io import DTYPES, parse_json, read_header, write_safetensors  # noqa: E402
from lycoris_core.keys import group_keys  # noqa: E402

# no example database on disk, no per-example deadline (CI machines vary), fixed example counts
FAST = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODULE = "lora_unet_mid_block_attentions_0_proj_in"
SUFFIXES = ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale",
            "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "lokr_w1", "lokr_w2",
            "lokr_w2_a", "lokr_w2_b", "lokr_t2", "weight", "on_input", "diff", "diff_b",
            "set_weight", "oft_blocks", "oft_diag", "rescale", "a1.weight", "a2.weight",
            "b1.weight", "b2.weight", "w_norm", "b_norm", "lora_A.weight", "lora_B.weight",
            "scale", "bias_indices"]
_names = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


def _path(folder) -> str:
    """A fresh file name per example (a file another example mapped is never rewritten)."""
    return str(folder / f"f{next(_names)}.safetensors")


def _load_quietly(path_or_dict, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_file(path_or_dict, **kwargs)


def _names_file(exc: LycorisError, path: str) -> None:
    assert exc.file == path and path in str(exc) and exc.reason, repr(exc)


# ----- raw bytes and headers ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

entries = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "Q4_K", "f32", ""]) | json_values,
    "shape": st.lists(st.integers(min_value=-2, max_value=1 << 66), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(min_value=-4, max_value=1 << 66), min_size=2, max_size=2)
    | st.tuples(st.integers(0, 64), st.integers(0, 64)).map(sorted) | json_values,
})


@FAST
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_are_read_or_refused_as_a_format_error(folder, data):
    path = _path(folder)
    with open(path, "wb") as f:
        f.write(data)
    try:
        _load_quietly(path)
    except LycorisFormatError as exc:
        _names_file(exc, path)


@FAST
@given(header=st.dictionaries(st.sampled_from([f"{MODULE}.{s}" for s in SUFFIXES]) | st.text(max_size=10),
                              entries | json_values, max_size=4),
       metadata=json_values, data=st.binary(max_size=64))
def test_any_json_header_is_validated_before_any_data_is_read(folder, header, metadata, data):
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header).encode()
    path = _path(folder)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    try:
        entries_read, _ = read_header(path)
    except LycorisFormatError as exc:
        _names_file(exc, path)
        return
    for info in entries_read.values():  # what passed is consistent with the file
        assert info["data_offsets"][1] <= len(data)
    try:
        _load_quietly(path)
    except LycorisError as exc:
        _names_file(exc, path)


def _valid_file(folder) -> tuple[str, bytes]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"{MODULE}.lora_up.weight": torch.randn(4, 2, generator=g),
               f"{MODULE}.lora_down.weight": torch.randn(2, 3, generator=g).half(),
               f"{MODULE}.alpha": torch.tensor(1.0)}
    path = write_safetensors(tensors, _path(folder), {"ss_network_args": '{"algo": "lora"}'})
    return path, open(path, "rb").read()


@FAST
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.integers(min_value=0))
def test_corrupted_valid_files_load_or_are_refused(folder, edits, cut):
    _, good = _valid_file(folder)
    data = bytearray(good)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: len(data) - cut % 9])  # sometimes truncated too
    path = _path(folder)
    with open(path, "wb") as f:
        f.write(data)
    try:
        af = _load_quietly(path)
    except LycorisError as exc:
        _names_file(exc, path)
        return
    _merges_are_finite_or_refused(af)
    assert open(path, "rb").read() == data  # reading never writes


# ----- tensors, dtypes and names -------------------------------------------------------------

def _tensor(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                  torch.int32, torch.int8, torch.bool, torch.float8_e4m3fn]))
    scale = draw(st.sampled_from([1.0, 1e-30, 300.0, 1e20, float("inf"), float("nan")]))
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    values = values * scale
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return values.nan_to_num(0.0).clamp(-100, 100).to(dtype)
    return values.to(dtype)


@st.composite
def state_dicts(draw) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.sampled_from([MODULE, "", ".", "a..b", "lora_te_text_model_x", MODULE + "."]),
                          min_size=1, max_size=2, unique=True))
    out = {}
    for name in names:
        for suffix in draw(st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=5, unique=True)):
            out[f"{name}.{suffix}"] = _tensor(draw)
    return out


def _merges_are_finite_or_refused(af) -> None:
    """Every module merges into a weight of its own shape (fp16 and fp32) with a finite result or
    refuses with LycorisOverflowError, and passes or fails its bypass range check the same way."""
    for adapter in af.values():
        shape = adapter.target_shape
        if shape is None or math.prod(shape) > 1 << 16:
            continue
        for dtype in (torch.float16, torch.float32):
            weight = torch.ones(shape, dtype=dtype)
            try:
                merged = adapter.merge(weight, 1.0)
            except LycorisOverflowError as exc:
                assert exc.key == adapter.name and exc.reason
            except LycorisError:
                pass  # e.g. a layer kind the module cannot patch on its own
            else:
                assert bool(torch.isfinite(merged).all()), (adapter, dtype)
            try:
                adapter.check_range(dtype)
            except LycorisOverflowError as exc:
                assert exc.key == adapter.name


@FAST
@given(tensors=state_dicts(), strict=st.booleans())
def test_any_state_dict_loads_or_is_refused_by_module(tensors, strict):
    try:
        af = _load_quietly(tensors, strict=strict)
    except LycorisError as exc:
        assert strict and exc.reason
        return
    for problem in af.problems:
        assert problem.key and problem.reason
    for name in af:
        assert name.strip("."), "a module without a name was accepted"
    _merges_are_finite_or_refused(af)


@FAST
@given(keys=st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=30)
                     | st.sampled_from([f"{m}.{s}" for m in ("", ".", "x", "x.y") for s in SUFFIXES]),
                     max_size=12, unique=True))
def test_every_key_is_grouped_exactly_once(keys):
    modules, unknown, clashes = group_keys(keys)
    grouped = [k for suffixes in modules.values() for k in suffixes.values()]
    assert sorted(grouped + unknown + [k for k, _ in clashes]) == sorted(keys)


# ----- metadata ---------------------------------------------------------------------------------

peft_configs = st.fixed_dictionaries(
    {"lora_alpha": json_values | st.floats()},
    optional={"alpha_pattern": st.dictionaries(st.text(max_size=20), json_values | st.floats(), max_size=3),
              "use_rslora": json_values}).map(json.dumps)
metadata_text = (st.text(max_size=60) | json_values.map(json.dumps) | peft_configs
                 | st.integers(1, 5000).map(lambda n: "[" * n + "]" * n)
                 | st.integers(1, 5000).map(lambda n: '{"a":' * n + "1" + "}" * n))


@FAST
@given(text=metadata_text)
def test_parse_json_returns_or_raises_value_error(text):
    try:
        parse_json(text)
    except ValueError as exc:
        assert str(exc)


@settings(FAST, max_examples=80)
@given(meta=st.dictionaries(st.sampled_from(["ss_network_args", "ss_tag_frequency", "ss_network_dim",
                                             "ss_base_model_version", "lora_adapter_metadata"]),
                            metadata_text, max_size=5))
def test_inspect_and_load_report_any_metadata(folder, meta):
    tensors = {f"{MODULE}.lora_A.weight": torch.randn(2, 3), f"{MODULE}.lora_B.weight": torch.randn(4, 2)}
    path = write_safetensors(tensors, _path(folder), meta)
    report = inspect_file(path)
    assert report["modules"] == 1
    assert _load_quietly(path)[MODULE].alpha is None or math.isfinite(_load_quietly(path)[MODULE].alpha)
