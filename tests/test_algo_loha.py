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
from lycoris_core import LayerSpec, load_file
from lycoris_core.algos.loha import LoHa
from oracle import (DTYPE_TOL, LAYER_KINDS, STRENGTHS, bypass_forward, make_layer, merged_forward,
                    randomize, reference_forward, rel_err, sample_input, to_adapter)

OPTIONS = [dict(use_tucker=t, weight_decompose=wd, wd_on_out=axis)
           for t, (wd, axis) in itertools.product((False, True), ((False, True), (True, True), (True, False)))]
OPTIONS.append(dict(use_scalar=True))  # the reference bakes its (random) scalar into hada_w1_a


def build(kind, alpha=2.0, rank=4, **opts):
    layer = make_layer(kind)
    ref = LohaModule("lora_unet_test", layer, lora_dim=rank, alpha=alpha, **opts)
    randomize(ref)
    if opts.get("weight_decompose"):
        with torch.no_grad():
            ref.dora_scale.mul_(1.1)  # a magnitude that differs from ||W||
    return layer, ref, to_adapter(ref)


def _id(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items()) or "plain"


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
    w = layer.weight.detach()
    full = adapter.merge(w, 1.0)
    x = sample_input(layer)
    for m in STRENGTHS:
        merged = adapter.merge(w, m)
        if m == 0:
            assert torch.equal(merged, w)
        assert rel_err(merged, w + m * (full - w)) < 1e-6
        assert rel_err(bypass_forward(adapter, layer, x, m), merged_forward(adapter, layer, x, m)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_in_half_precision(kind, dtype):
    layer, _, adapter = build(kind, weight_decompose=True)
    w32 = layer.weight.detach()
    expected = adapter.merge(w32, 0.7)
    got = adapter.merge(w32.to(dtype), 0.7)
    assert got.dtype == dtype
    assert rel_err(got.float(), expected) < DTYPE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_bypass_builds_delta_in_input_dtype(kind, dtype):
    layer, _, adapter = build(kind, use_tucker=True)
    x = sample_input(layer)
    expected = bypass_forward(adapter, layer, x, 0.7)
    layer = layer.to(dtype)
    got = bypass_forward(adapter, layer, x.to(dtype), 0.7)
    assert got.dtype == dtype
    assert rel_err(got.float(), expected) < DTYPE_TOL[dtype]


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
    w = layer.weight.detach()
    assert torch.allclose(adapter.merge(w, 1.0), w, atol=1e-6)
    x = sample_input(layer)
    out = adapter.bypass(x, layer.forward, 1.0, layer)
    (out.square().sum() + adapter.merge(w, 1.0).sum()).backward()
    grads = [p.grad for p in adapter.parameters() if p.requires_grad]
    assert grads and all(p.requires_grad for p in adapter.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("opts", [{}, {"use_tucker": True}, {"dora": "out"}, {"dora": "in"},
                                  {"use_scalar": True}], ids=_id)
def test_export_has_reference_layout_and_reloads_identically(kind, opts):
    layer = make_layer(kind)
    adapter = LoHa.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    ref_opts = {k: v for k, v in opts.items() if k != "dora"}
    if "dora" in opts:
        ref_opts.update(weight_decompose=True, wd_on_out=opts["dora"] == "out")
    ref = LohaModule("lora_unet_test", layer, lora_dim=4, alpha=2.0, **ref_opts)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    randomize(adapter)
    if adapter.scalar is not None:
        with torch.no_grad():
            adapter.scalar.fill_(0.7)  # must be baked into hada_w1_a
    exported = adapter.export()
    assert {k: tuple(v.shape) for k, v in exported.items()} == ref_shapes
    assert float(exported["alpha"]) == float(ref.state_dict()["alpha"])
    reloaded = load_file({f"lora_unet_test.{k}": v for k, v in exported.items()},
                         strict=True)["lora_unet_test"]
    w = layer.weight.detach()
    with torch.no_grad():
        assert torch.equal(reloaded.merge(w, 0.8), adapter.merge(w, 0.8))
