"""(IA)^3: merge and bypass against lycoris-lora's IA3Module, both sides, every layer kind.

LyCORIS 3.3.0 cannot create an IA3 network (`algo=ia3` is missing from its factory) nor reload
one (`make_module_from_state_dict` takes one tensor but is handed two), so the reference module is
built directly around the layer; its normal forward path works and is the oracle. The file is
saved with the module's own `state_dict()` and read back with our loader.
"""
import pytest
import torch
from lycoris.modules.ia3 import IA3Module

from lycoris_core import LayerSpec, LycorisError, LycorisShapeError, load_file
from lycoris_core.algos import detect
from lycoris_core.algos.ia3 import IA3
from oracle import (DTYPE_TOL, LAYER_KINDS, NAME, assert_affine_and_bypass, assert_half_merge,
                    assert_merged_output, assert_reloads_identically, assert_trainable,
                    bypass_forward, make_layer, merged_forward, reference_forward, reference_pair,
                    rel_err, sample_input)

SIDES = (False, True)


def build(kind, on_input):
    layer = make_layer(kind)
    return (layer, *reference_pair(IA3Module, layer, scale=0.3, train_on_input=on_input))


def _side(on_input):
    return "input" if on_input else "output"


@pytest.mark.parametrize("on_input", SIDES, ids=_side)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_reference_forward(kind, on_input):
    layer, ref, adapter = build(kind, on_input)
    assert adapter.on_input is on_input
    x = sample_input(layer)
    assert_merged_output(adapter, layer, x, reference_forward(ref, x))


@pytest.mark.parametrize("on_input", SIDES, ids=_side)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_formula_by_rows_or_columns(kind, on_input):
    """W' = W * (1 + m w): w scales output rows, or input columns (conv: 1xCx1x1 vectors)."""
    layer, ref, adapter = build(kind, on_input)
    w = layer.weight.detach()
    vec = ref.weight.detach().reshape(-1)
    view = (1, -1) + (1,) * (w.ndim - 2) if on_input else (-1,) + (1,) * (w.ndim - 1)
    for m in (0.5, -1.0):
        expected = w * (1 + m * vec.reshape(view))
        assert rel_err(adapter.merge(w, m), expected) < 1e-6


@pytest.mark.parametrize("on_input", SIDES, ids=_side)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_strength_is_affine_and_bypass_matches_merge(kind, on_input):
    """Output side: bypass leaves the bias unscaled, exactly as the merged weight does."""
    layer, _, adapter = build(kind, on_input)
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


def test_output_bypass_does_not_scale_the_bias():
    layer, ref, adapter = build("linear", False)
    x = sample_input(layer)
    with torch.no_grad():
        naive = layer(x) * (1 + ref.weight)  # LyCORIS's own bypass: scales the bias too
    assert rel_err(naive, merged_forward(adapter, layer, x)) > 1e-4
    assert rel_err(bypass_forward(adapter, layer, x), merged_forward(adapter, layer, x)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("on_input", SIDES, ids=_side)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_in_half_precision(kind, on_input, dtype):
    layer, _, adapter = build(kind, on_input)
    w32 = layer.weight.detach()
    expected = assert_half_merge(adapter.merge, w32, dtype)
    assert rel_err(expected, w32) > 10 * DTYPE_TOL[dtype]  # the change is larger than the rounding


def test_claims_need_on_input():
    assert not IA3.claims({"weight": (48,)})
    assert detect({"weight": (48,)}) is None
    assert IA3.claims({"weight": (48,), "on_input": ()})
    assert detect({"weight": (1, 40, 1, 1), "on_input": ()}) is IA3


def test_float_flag_after_cast_save():
    layer = make_layer("linear")
    vec = torch.randn(64) * 0.2
    sd = {f"{NAME}.weight": vec.half(), f"{NAME}.on_input": torch.tensor(1.0, dtype=torch.float16)}
    adapter = load_file(sd, strict=True)[NAME]
    assert isinstance(adapter, IA3) and adapter.on_input
    w = layer.weight.detach()
    assert rel_err(adapter.merge(w), w * (1 + vec.half().float())) < 1e-6


def test_validation_errors_name_the_key():
    with pytest.raises(LycorisError, match=r"lora_unet_test\.on_input.*0 or 1"):
        load_file({f"{NAME}.weight": torch.ones(48), f"{NAME}.on_input": torch.tensor(2)}, strict=True)
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.weight.*vector"):
        load_file({f"{NAME}.weight": torch.ones(4, 48), f"{NAME}.on_input": torch.tensor(0)}, strict=True)
    adapter = load_file({f"{NAME}.weight": torch.ones(40), f"{NAME}.on_input": torch.tensor(0)},
                        strict=True)[NAME]
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.weight.*40 entries.*48 output"):
        adapter.merge(make_layer("linear").weight.detach())
    # an input-side vector of the output length does not fit either
    adapter = load_file({f"{NAME}.weight": torch.ones(48), f"{NAME}.on_input": torch.tensor(1)},
                        strict=True)[NAME]
    with pytest.raises(LycorisShapeError, match="input channels"):
        adapter.merge(make_layer("linear").weight.detach())


@pytest.mark.parametrize("on_input", SIDES, ids=_side)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_export_round_trip(kind, on_input):
    layer, ref, adapter = build(kind, on_input)
    out = adapter.export()
    assert set(out) == {"weight", "on_input"}
    assert out["on_input"].ndim == 0 and out["on_input"].dtype == torch.int64
    assert int(out["on_input"]) == int(on_input)
    assert out["weight"].shape == ref.weight.shape
    reloaded = assert_reloads_identically(adapter, layer, 0.8, out)
    assert torch.equal(reloaded.export()["weight"], out["weight"])


@pytest.mark.parametrize("on_input", SIDES, ids=_side)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_trainable_starts_at_zero_and_gets_gradients(kind, on_input):
    layer = make_layer(kind)
    adapter = IA3.create(LayerSpec.from_module(layer), on_input=on_input)
    ref_shape = IA3Module(NAME, layer, train_on_input=on_input).weight.shape
    assert adapter.w.shape == ref_shape  # LyCORIS shapes: (C,) or 1xCx1x1
    assert_trainable(adapter, layer, sample_input(layer), each=True)
