"""LoHa: merge and bypass against lycoris-lora's LohaModule, every layer kind and option.

LyCORIS 3.3.0 applies gamma twice in its own merge path (`get_diff_weight`/`get_merged_weight`,
doc §1.15), so every expected value here comes from the module's normal forward path, which
applies gamma = alpha/rank once. rank 4 with alpha 2 keeps gamma != 1 so a second gamma shows.
"""
import itertools

import pytest
import torch
from lycoris.modules.loha import LohaModule

import lycoris_core.algos.base as base
from lycoris_core import LayerSpec
from lycoris_core.algos.loha import LoHa
from oracle import (LAYER_KINDS, NAME, assert_affine_and_bypass, assert_export_like_reference,
                    assert_half_bypass, assert_half_merge, assert_trainable, make_layer,
                    merged_forward, options_id, reference_forward, reference_options, reference_pair,
                    rel_err, sample_input)

OPTIONS = [dict(use_tucker=t, weight_decompose=wd, wd_on_out=axis)
           for t, (wd, axis) in itertools.product((False, True), ((False, True), (True, True), (True, False)))]
OPTIONS.append(dict(use_scalar=True))  # the reference bakes its (random) scalar into hada_w1_a


def build(kind, alpha=2.0, rank=4, **opts):
    layer = make_layer(kind)
    return (layer, *reference_pair(LohaModule, layer, lora_dim=rank, alpha=alpha, **opts))


def _id(opts):
    return options_id(opts, "plain")


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_reference_forward(kind, opts):
    layer, ref, adapter = build(kind, **opts)
    # LyCORIS only uses Tucker when the kernel is larger than 1x1
    assert (adapter.t1 is not None) == (opts.get("use_tucker", False) and kind == "conv3x3")
    if adapter.t1 is not None:
        assert adapter.w1a.shape == (4, layer.out_channels)  # transposed r x O layout
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_strength_is_affine_and_bypass_matches_merge(kind, opts):
    layer, _, adapter = build(kind, **opts)
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_in_half_precision(kind, dtype):
    layer, _, adapter = build(kind, weight_decompose=True)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bypass_builds_delta_in_input_dtype(kind, dtype):
    layer, _, adapter = build(kind, use_tucker=True)
    assert_half_bypass(adapter, layer, sample_input(layer), dtype)


def test_alpha_scale_applied_once():
    layer, ref, adapter = build("linear", alpha=1.0, rank=8)
    assert adapter.scale == pytest.approx(1.0 / 8)
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_row_chunks_compute_only_their_rows(kind, monkeypatch):
    layer, _, adapter = build(kind, use_tucker=True)
    w = layer.weight.detach()
    p = adapter._prepared(w.device, torch.float32)
    full = adapter.diff(w, None, p)
    rows = slice(5, 13)
    part = adapter.diff(w[rows], rows, p)
    assert part.shape == w[rows].shape
    assert torch.allclose(part, full[rows], rtol=1e-6, atol=1e-7)
    whole = adapter.merge(w, 1.0)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)  # one row per chunk
    assert torch.allclose(adapter.merge(w, 1.0), whole, rtol=1e-6, atol=1e-7)
    assert torch.allclose(whole, w + full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("opts", [{}, {"use_tucker": True}, {"dora": "out"}, {"dora": "in"},
                                  {"use_scalar": True}], ids=_id)
def test_trainable_starts_at_zero_and_gets_gradients(kind, opts):
    layer = make_layer(kind)
    adapter = LoHa.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    assert_trainable(adapter, layer, sample_input(layer), atol=1e-6)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("opts", [{}, {"use_tucker": True}, {"dora": "out"}, {"dora": "in"},
                                  {"use_scalar": True}], ids=_id)
def test_export_has_reference_layout_and_reloads_identically(kind, opts):
    layer = make_layer(kind)
    adapter = LoHa.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    ref = LohaModule(NAME, layer, lora_dim=4, alpha=2.0, **reference_options(opts))
    assert_export_like_reference(adapter, ref, layer)  # a scalar is baked into hada_w1_a


@pytest.mark.parametrize("opts", [{}, dict(use_tucker=True), dict(weight_decompose=True)], ids=_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_both_merge_kernels_match_reference(kind, opts, monkeypatch):
    """r1 * r2 <= KHATRI_RAO_MAX merges through one Khatri-Rao GEMM, larger ranks through two
    rank-r GEMMs per row chunk and a fused multiply-add: both give the reference weight."""
    import lycoris_core.algos.loha as loha_module

    layer, ref, adapter = build(kind, rank=8, **opts)
    x = sample_input(layer)
    expected = reference_forward(ref, x)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 64)  # several row chunks
    for kr_max in (16, 64):
        monkeypatch.setattr(loha_module, "KHATRI_RAO_MAX", kr_max)
        adapter.clear_cache()
        assert adapter._khatri_rao() == (kr_max == 64)
        for m in (1.0, -0.4):
            got = merged_forward(adapter, layer, x, m)
            want = expected if m == 1 else merged_forward(adapter, layer, x, 0.0) + m * (
                expected - merged_forward(adapter, layer, x, 0.0))
            assert rel_err(got, want) < 1e-5, (kr_max, m)
