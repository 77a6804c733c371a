"""GLoRA: merge and bypass against lycoris-lora's GLoRAModule (3.x layout), the old <= 2.x layout
from its formula, the square-weight ambiguity, validation, export and training."""
import pytest
import torch
from lycoris.modules.glora import GLoRAModule

from lycoris_core import LayerSpec, LycorisError, LycorisShapeError, load_file
from lycoris_core.algos.glora import GLoRA
from oracle import (DTYPE_TOL, LAYER_KINDS, NAME, assert_affine_and_bypass, assert_half_merge,
                    assert_merged_output, assert_reloads_identically, assert_trainable,
                    bypass_forward, make_layer, merged_forward, reference_forward, reference_pair,
                    reload, rel_err, sample_input)


def build(kind, alpha=3, rank=4):
    """alpha 3 (an int: LyCORIS stores it as int64) over rank 4: gamma = 0.75, not 1."""
    layer = make_layer(kind)
    return (layer, *reference_pair(GLoRAModule, layer, lora_dim=rank, alpha=alpha))


def formula(w, a1, a2, b1, b2, gamma):
    """gamma * (W x_in (A1 A2) + B1 B2) with the factors in their 3.x roles, in float64."""
    w, a1, a2, b1, b2 = (t.double() for t in (w, a1, a2, b1, b2))
    i, r = a1.shape[0], a1.shape[1]
    m = a1.reshape(i, r) @ a2.reshape(r, i)
    wa = torch.einsum("oi...,ij->oj...", w, m)
    b = (b1.reshape(b1.shape[0], r) @ b2.reshape(r, -1)).reshape(w.shape)
    return gamma * (wa + b)


def load(tensors, alpha=3.0):
    sd = {f"{NAME}.{k}.weight": v for k, v in tensors.items()}
    sd[f"{NAME}.alpha"] = torch.tensor(alpha)
    return load_file(sd, strict=True)[NAME]


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_reference_forward(kind):
    layer, ref, adapter = build(kind)
    assert adapter.layout == "3.x" and adapter.rank == 4
    assert adapter.scale == pytest.approx(0.75)
    x = sample_input(layer)
    assert_merged_output(adapter, layer, x, reference_forward(ref, x))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_formula(kind):
    layer, ref, adapter = build(kind, alpha=1.0, rank=8)
    w = layer.weight.detach()
    d = formula(w, *(getattr(ref, n).weight.detach() for n in ("a1", "a2", "b1", "b2")), 1.0 / 8)
    assert rel_err(adapter.merge(w, -1.0), w.double() - d) < 1e-6


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_strength_is_affine_and_bypass_matches_merge(kind):
    layer, _, adapter = build(kind)
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bypass_applies_gamma_once(kind):
    """LyCORIS's bypass_forward applies gamma twice (0.5625 instead of 0.75); ours equals its
    normal forward."""
    layer, ref, adapter = build(kind)
    x = sample_input(layer)
    ours = bypass_forward(adapter, layer, x)
    assert rel_err(ours, reference_forward(ref, x)) < 1e-5
    with torch.no_grad():
        assert rel_err(ours, ref.bypass_forward(x, 1.0)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_in_half_precision(kind, dtype):
    layer, _, adapter = build(kind)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)
    layer_h = make_layer(kind).to(dtype)
    x = sample_input(layer_h).to(dtype)
    y = bypass_forward(adapter, layer_h, x, 0.7)
    assert y.dtype == dtype
    layer_32 = make_layer(kind)
    layer_32.load_state_dict({k: v.float() for k, v in layer_h.state_dict().items()})
    expected = merged_forward(adapter, layer_32, x.float(), 0.7)  # same rounded inputs, fp32 math
    assert rel_err(y.float(), expected) < 4 * DTYPE_TOL[dtype]


def _old_tensors(kind, rank=4, seed=5):
    """Old (<= 2.x) layout by hand: a1 r x I, a2 I x r, b1 r x I, b2 O x r (1x1 convs for conv)."""
    layer = make_layer(kind)
    out_dim, in_dim = layer.weight.shape[:2]
    tail = (1, 1) if layer.weight.ndim == 4 else ()
    g = torch.Generator().manual_seed(seed)
    shapes = {"a1": (rank, in_dim), "a2": (in_dim, rank), "b1": (rank, in_dim), "b2": (out_dim, rank)}
    return layer, {k: torch.randn(s + tail, generator=g) * 0.1 for k, s in shapes.items()}


@pytest.mark.parametrize("kind", ["linear", "conv1x1"])  # old GLoRA only knew Linear and 1x1 conv
def test_old_layout(kind):
    layer, t = _old_tensors(kind)
    adapter = load(t, alpha=3.0)
    assert adapter.layout == "old" and adapter.rank == 4
    w = layer.weight.detach()
    flat = {k: v.reshape(v.shape[0], -1).double() for k, v in t.items()}
    # old formula: gamma * (B2 B1 + W A2 A1), written out directly
    wa = torch.einsum("oi...,ij->oj...", w.double(), flat["a2"] @ flat["a1"])
    expected = 0.75 * ((flat["b2"] @ flat["b1"]).reshape(w.shape) + wa)
    for m in (1.0, -0.5):
        assert rel_err(adapter.merge(w, m), w.double() + m * expected) < 1e-6
    x = sample_input(layer)
    assert rel_err(bypass_forward(adapter, layer, x, 0.5), merged_forward(adapter, layer, x, 0.5)) < 1e-5
    out = adapter.export()  # kept in the layout it was read in
    assert all(torch.equal(out[f"{k}.weight"], v) for k, v in t.items())
    again = load({k[:-7]: v for k, v in out.items() if k.endswith(".weight")}, alpha=float(out["alpha"]))
    assert again.layout == "old" and torch.equal(again.merge(w), adapter.merge(w))


def _square(rank, dim, seed=7):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a1": (dim, rank), "a2": (rank, dim), "b1": (dim, rank), "b2": (rank, dim)}
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def test_square_weight_layouts():
    """A square weight makes both layouts fit the shapes: the reading whose rank is smaller wins."""
    w = torch.randn(16, 16)
    new = _square(4, 16)
    adapter = load(new)
    assert adapter.ambiguous and adapter.layout == "3.x" and adapter.rank == 4
    assert rel_err(adapter.merge(w), w.double() + formula(w, *new.values(), 0.75)) < 1e-6
    # the same kind of file in the old layout (names swapped) is read as old
    old = {"a1": new["a2"], "a2": new["a1"], "b1": new["b2"], "b2": new["b1"]}
    adapter = load(old)
    assert adapter.ambiguous and adapter.layout == "old" and adapter.rank == 4
    assert rel_err(adapter.merge(w), w.double() + formula(w, *new.values(), 0.75)) < 1e-6
    # fully square (rank = I = O): truly ambiguous, read as 3.x (ComfyUI reads it as old)
    full = _square(16, 16)
    adapter = load(full)
    assert adapter.layout == "3.x" and adapter.rank == 16
    assert rel_err(adapter.merge(w), w.double() + formula(w, *full.values(), 3 / 16)) < 1e-6


def test_ambiguous_reading_follows_the_weight():
    """rank 16 on a 4x4 weight: the smaller-rank reading (old, 16x16 target) is chosen first and
    switched to 3.x once the weight it patches says so."""
    t = _square(16, 4)
    adapter = load(t)
    assert adapter.layout == "old" and adapter.target_shape == (16, 16)
    w = torch.randn(4, 4)
    assert rel_err(adapter.merge(w), w.double() + formula(w, *t.values(), 3 / 16)) < 1e-6
    assert adapter.layout == "3.x" and adapter.rank == 16
    with pytest.raises(LycorisShapeError, match="lora_unet_test"):
        adapter.merge(torch.randn(5, 5))


def test_validation_errors_name_the_key():
    layer, ref, _ = build("linear")
    good = {n: getattr(ref, n).weight.detach() for n in ("a1", "a2", "b1", "b2")}
    bad = dict(good, b1=torch.randn(48, 5))
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.a1\.weight.*ranks disagree"):
        load(bad)
    bad = dict(good, a1=torch.randn(60, 4))
    with pytest.raises(LycorisShapeError, match="input channels disagree"):
        load(bad)
    with pytest.raises(LycorisError, match=r"lora_unet_test\.b2\.weight.*missing"):
        load({k: v for k, v in good.items() if k != "b2"})
    with pytest.raises(LycorisError, match=r"bm\.weight.*not supported"):
        load(dict(good, bm=torch.randn(4, 4, 3, 3)))
    adapter = load(good)
    with pytest.raises(LycorisShapeError, match=r"\[48, 64\].*\[40, 32, 3, 3\]"):
        adapter.merge(make_layer("conv3x3").weight.detach())


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_export_round_trip(kind):
    layer, ref, adapter = build(kind)
    out = adapter.export()
    sd = ref.state_dict()
    assert set(out) == set(sd)
    assert all(out[k].shape == sd[k].shape for k in sd)
    reloaded = assert_reloads_identically(adapter, layer, 0.6, out)
    assert all(torch.equal(reloaded.export()[k], v) for k, v in out.items())


@pytest.mark.parametrize("use_scalar", [False, True], ids=["plain", "scalar"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_trainable_starts_at_zero_and_gets_gradients(kind, use_scalar):
    layer = make_layer(kind)
    adapter = GLoRA.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, use_scalar=use_scalar)
    ref = GLoRAModule(NAME, layer, lora_dim=4, alpha=2.0)
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in adapter.export().items()} == ref_shapes
    assert_trainable(adapter, layer, sample_input(layer))
    if use_scalar:  # the scalar is baked into a2 and b2 on export
        w = layer.weight.detach()
        with torch.no_grad():
            adapter.scalar.fill_(0.5)
        adapter.clear_cache()
        reloaded = reload(adapter.export())
        with torch.no_grad():
            assert rel_err(reloaded.merge(w), adapter.merge(w)) < 1e-6
            assert rel_err(adapter.merge(w), w) > 1e-3
