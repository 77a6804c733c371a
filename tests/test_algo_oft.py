"""Diag-OFT: merge and bypass against lycoris-lora's DiagOFTModule; kohya and legacy layouts.

Reference: LyCORIS 3.3.0's normal (non-bypass) forward is `base(x) + op(x, make_weight(m) - W)`, i.e.
the layer run with the rotated weight and the *unrotated* bias; `get_merged_weight(m)` returns that
same `make_weight(m)`. Its bypass paths raise in 3.3.0 (formats doc 1.14/1.15), so they are no oracle.
"""
import warnings

import pytest
import torch
from lycoris.modules.diag_oft import DiagOFTModule
from torch import nn

from lycoris_core import LayerSpec, LycorisError, LycorisShapeError, LycorisWarning, load_file
from lycoris_core.algos import base as base_module
from lycoris_core.algos import oft as oft_module
from lycoris_core.algos.boft import BOFT
from lycoris_core.algos.oft import DiagOFT, LegacyDiagOFT
from lycoris_core.algos.registry import detect
from oracle import (DTYPE_TOL, LAYER_KINDS, assert_affine_and_bypass, assert_export_is_reference_state,
                    assert_flat_rescale_reads_alike, assert_half_base_bypass, assert_half_merge,
                    assert_merged_like_reference, assert_rotates_rows, assert_trainable,
                    bypass_forward, make_layer, merged_forward, options_id, reference_pair, rel_err,
                    sample_input)

OPTIONS = [dict(constraint=c, rescaled=r) for c in (0.0, 0.01) for r in (False, True)]


def build(kind, constraint=0.0, rescaled=False, lora_dim=4):
    layer = make_layer(kind)
    # oft_blocks ~ N(0, 0.1): a clearly non-identity rotation
    return (layer, *reference_pair(DiagOFTModule, layer, lora_dim=lora_dim, constraint=constraint,
                                   rescaled=rescaled))


def skew_norm(blocks):
    return float((blocks - blocks.transpose(-1, -2)).norm())


def dense_expected(weight, blocks, constraint=None, strength=1.0):
    """W + m (R^T W - W) from the formula, with a dense block-diagonal R (fine in a test)."""
    q = blocks.double() - blocks.double().transpose(-1, -2)
    out = weight.shape[0]
    if constraint and float(q.norm()) + 1e-8 > constraint * out:
        q = q * constraint * out / (q.norm() + 1e-8)
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    r = torch.block_diag(*[(eye + qk) @ torch.linalg.inv(eye - qk) for qk in q])
    w = weight.double().reshape(out, -1)
    return (w + strength * (r.t() @ w - w)).reshape(weight.shape)


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_reference(kind, opts):
    layer, ref, adapter = build(kind, **opts)
    assert type(adapter) is DiagOFT and adapter.oft_blocks.ndim == 3
    if opts["constraint"]:  # the bound c * O must actually clip Q in this test
        assert skew_norm(ref.oft_blocks.detach()) > opts["constraint"] * layer.weight.shape[0]
    assert_merged_like_reference(adapter, ref, layer)


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_strength_is_affine_and_bypass_matches_merge(kind, opts):
    layer, _, adapter = build(kind, **opts)
    assert layer.bias is not None and layer.bias.abs().sum() > 0  # bypass must keep the bias as is
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


@pytest.mark.parametrize("rescaled", [False, True])
def test_other_strengths_against_reference(rescaled):
    """Without rescale LyCORIS's `I + m(R - I)` is our affine rule; with rescale LyCORIS keeps the
    rescale at every m: LyCORIS minus ours is exactly (1 - m)(rescale - 1) W (documented)."""
    layer, ref, adapter = build("conv3x3", constraint=0.01, rescaled=rescaled)
    w = layer.weight.detach()
    for m in (0.5, -1.0, 1.7):
        with torch.no_grad():
            lyco = ref.get_merged_weight(m)[0]
        ours = adapter.merge(w, m)
        if not rescaled:
            assert rel_err(ours, lyco) < 1e-6
        else:
            gap = (1 - m) * (ref.rescale.detach() - 1) * w
            assert rel_err(lyco - ours, gap) < 1e-4
            assert rel_err(ours, lyco) > 1e-3


def test_bypass_other_conv_layouts():
    """Conv1d (channel axis 1 of a 3-d output) and a grouped conv whose blocks cross groups
    (output rotation would be wrong there; the adapter falls back to the dense dW)."""
    torch.manual_seed(0)
    conv1d = nn.Conv1d(8, 16, 3, padding=1)
    grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # 4 output channels per group
    blocks = torch.randn(2, 8, 8) * 0.1  # blocks of 8 channels span two groups
    for layer, x in ((conv1d, torch.randn(2, 8, 7)), (grouped, torch.randn(2, 8, 5, 5))):
        adapter = load_file({"m.oft_blocks": blocks}, strict=True)["m"]
        for m in (1.0, 0.5):
            assert rel_err(bypass_forward(adapter, layer, x, m), merged_forward(adapter, layer, x, m)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_half_precision(kind, dtype):
    layer, _, adapter = build(kind, constraint=0.01, rescaled=True)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)
    assert_half_base_bypass(adapter, layer, sample_input(layer), dtype)


@pytest.mark.parametrize("constraint", [0.0, 0.01])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_orthogonal_at_strength_one(kind, constraint):
    layer, _, adapter = build(kind, constraint=constraint)
    assert_rotates_rows(adapter, layer.weight.detach())


def test_kohya_layout():
    """kohya `networks/oft.py`: same tensors under an `oft_unet_` prefix, alpha = constraint."""
    torch.manual_seed(3)
    name = "oft_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    blocks = torch.randn(8, 6, 6) * 0.2
    sd = {f"{name}.oft_blocks": blocks, f"{name}.alpha": torch.tensor(0.005)}
    adapter = load_file(sd, strict=True)[name]
    assert type(adapter) is DiagOFT and adapter.constraint == pytest.approx(0.005)
    w = torch.randn(48, 20)
    assert skew_norm(blocks) > 0.005 * 48  # constraint active
    for m in (1.0, 0.5):
        assert rel_err(adapter.merge(w, m), dense_expected(w, blocks, 0.005, m)) < 1e-6


def test_legacy_oft_diag_rotation_form():
    """Nov 2023 - Feb 2024: `oft_diag` holds the final block matrices (R, rescale folded in)."""
    torch.manual_seed(4)
    skew = torch.randn(6, 4, 4) * 0.3
    skew = skew - skew.transpose(1, 2)
    eye = torch.eye(4)
    r = (eye + skew) @ torch.linalg.inv(eye - skew)
    stored = r * (1 + 0.1 * torch.randn(6, 4, 1))  # that era folded rescale into R's rows
    w = torch.randn(24, 5, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LycorisWarning)
        adapter = load_file({"lora_unet_x.oft_diag": stored}, strict=True)["lora_unet_x"]
    assert type(adapter) is LegacyDiagOFT and not adapter.raw_delta
    expected = torch.einsum("kij,kif->kjf", stored.double(), w.double().reshape(6, 4, -1)).reshape(w.shape)
    for m in (1.0, 0.5, -1.0):
        assert rel_err(adapter.merge(w, m), w + m * (expected - w)) < 1e-6
    assert set(adapter.export()) == {"oft_diag"}
    assert torch.equal(adapter.export()["oft_diag"], stored)


def test_legacy_oft_diag_raw_delta_form():
    """Oct 2023: `oft_diag` was a raw delta D with block matrix I + D; told apart by values near 0."""
    torch.manual_seed(5)
    delta = torch.randn(6, 4, 4) * 0.05
    with pytest.warns(LycorisWarning, match="raw"):
        adapter = load_file({"lora_unet_x.oft_diag": delta}, strict=True)["lora_unet_x"]
    assert adapter.raw_delta
    w = torch.randn(24, 16)
    mats = delta.double() + torch.eye(4, dtype=torch.float64)
    expected = torch.einsum("kij,kif->kjf", mats, w.double().reshape(6, 4, -1)).reshape(w.shape)
    assert rel_err(adapter.merge(w, 1.0), expected) < 1e-6
    assert rel_err(adapter.merge(w, 0.5), w + 0.5 * (expected - w)) < 1e-6


def test_legacy_1d_rescale():
    """Feb 2024 files store rescale as (O,): read per output channel, like the O x 1 x 1 x 1 form."""
    layer, ref, adapter = build("conv3x3", constraint=0.01, rescaled=True)
    old = assert_flat_rescale_reads_alike(adapter, ref, layer)
    assert old.export()["rescale"].shape == (40,)  # kept as stored


def test_detection():
    assert detect({"oft_blocks": (12, 4, 4), "alpha": ()}) is DiagOFT
    assert detect({"oft_blocks": (4, 8, 6, 6), "alpha": (), "rescale": (48, 1)}) is BOFT
    assert detect({"oft_diag": (12, 4, 4)}) is LegacyDiagOFT
    assert detect({"oft_blocks": (12, 16)}) is None


@pytest.mark.parametrize("sd, match", [
    ({"m.oft_blocks": torch.zeros(4, 3, 5)}, "square"),
    ({"m.oft_blocks": torch.zeros(4, 3, 3), "m.rescale": torch.ones(13, 1)}, "rescale"),
])
def test_bad_shapes(sd, match):
    with pytest.raises(LycorisShapeError, match=match):
        load_file(sd, strict=True)


def test_dora_scale_is_refused():
    sd = {"m.oft_blocks": torch.zeros(4, 3, 3), "m.dora_scale": torch.ones(12, 1)}
    with pytest.raises(LycorisError, match="dora_scale is not supported"):
        load_file(sd, strict=True)
    with pytest.warns(LycorisWarning, match="dora_scale"):
        assert len(load_file(sd).problems) == 1  # skipped with a report when not strict


@pytest.mark.parametrize("cls", [DiagOFT, BOFT])
def test_create_refuses_norm_layers(cls):
    norm = LayerSpec("norm", (16,), weight=torch.ones(16), norm_type="layer")
    with pytest.raises(LycorisError, match="not norm"):
        cls.create(norm, rank=4)
    with pytest.raises(LycorisError, match="read-only"):
        LegacyDiagOFT.create(LayerSpec.from_module(make_layer("linear")), rank=4)


def test_wrong_target():
    adapter = load_file({"m.oft_blocks": torch.zeros(4, 3, 3)}, strict=True)["m"]
    with pytest.raises(LycorisShapeError):
        adapter.merge(torch.zeros(13, 4))


def test_streaming_merge_computes_rotation_once(monkeypatch):
    layer, _, adapter = build("conv3x3", constraint=0.01, rescaled=True)
    w = layer.weight.detach()
    whole = adapter.merge(w, 0.8)
    calls = []
    real = oft_module.cayley
    monkeypatch.setattr(oft_module, "cayley", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(base_module, "CHUNK_ELEMENTS", 300)  # ~1 block (4 rows x 288) per chunk
    adapter.clear_cache()
    for dtype in (torch.float32, torch.float16):
        chunked = adapter.merge(w.to(dtype), 0.8)
        assert rel_err(chunked.float(), whole) < DTYPE_TOL[dtype]
    assert len(calls) == 1
    assert adapter._prepared(w.device, torch.float32)["r"].shape == adapter.oft_blocks.shape


def test_round_trip_and_export_layout():
    layer, ref, adapter = build("conv3x3", constraint=0.01, rescaled=True)
    assert_export_is_reference_state(adapter, ref, layer)
    assert all(v.dtype == torch.float16 for v in adapter.export(torch.float16).values())


@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_trainable_starts_at_identity_and_gets_gradients(kind, rescaled):
    layer = make_layer(kind)
    spec = LayerSpec.from_module(layer)
    adapter = DiagOFT.create(spec, rank=4, constraint=1e-3, rescaled=rescaled)
    ref = DiagOFTModule("t", layer, lora_dim=4, constraint=1e-3, rescaled=rescaled)
    exported = adapter.export()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert float(exported["alpha"]) == pytest.approx(1e-3)
    params = assert_trainable(adapter, layer, sample_input(layer), each=True)
    assert len(params) == (2 if rescaled else 1)


def test_cayley_is_the_rotation_the_float64_solve_gives_for_small_and_large_blocks():
    """R = (I - Q)^-1 (I + Q) computed through I - Q^2 (Cholesky): orthogonal and equal to a float64
    LU solve, also where Q is large (its conditioning is 1 + s^2)."""
    from lycoris_core.algos.oft import cayley

    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.1, 1.0, 5.0):
        blocks = scale * torch.randn(6, 8, 8, generator=g)
        q = (blocks - blocks.transpose(-1, -2)).double()
        eye = torch.eye(8, dtype=torch.float64)
        want = torch.linalg.solve(eye - q, eye + q)
        got = cayley(blocks, 0.0, 48).double()
        assert (got - want).abs().max() < 1e-5 * (1 + scale ** 2), scale
        assert (got @ got.transpose(-1, -2) - eye).abs().max() < 1e-5 * (1 + scale ** 2), scale


def test_cayley_of_zero_blocks_is_the_identity_after_the_thread_count_changed():
    """A fresh Diag-OFT/BOFT has zero blocks: R = I. torch 2.14.1's CPU LU returned invalid pivots
    for a batch of identity blocks once the thread count had changed, and training crashed."""
    from lycoris_core.algos.oft import cayley

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(max(2, threads))
    try:
        r = cayley(torch.zeros(4, 192, 192), 0.0, 768)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(r, torch.eye(192).expand(4, 192, 192))
