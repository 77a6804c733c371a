"""LoRA/LoCon: merge and bypass against lycoris-lora's LoConModule, every layer kind and option."""
import itertools

import pytest
import torch
from lycoris.modules.locon import LoConModule

from lycoris_core import LayerSpec
from lycoris_core.algos.lora import LoRA
from oracle import (DTYPE_TOL, LAYER_KINDS, STRENGTHS, bypass_forward, make_layer, merged_forward,
                    randomize, reference_forward, rel_err, sample_input, to_adapter)

OPTIONS = [dict(use_tucker=t, weight_decompose=wd, wd_on_out=axis)
           for t, (wd, axis) in itertools.product((False, True), ((False, True), (True, True), (True, False)))]


def build(kind, alpha=2.0, rank=4, **opts):
    layer = make_layer(kind)
    ref = LoConModule("lora_unet_test", layer, lora_dim=rank, alpha=alpha, **opts)
    randomize(ref)
    if opts.get("weight_decompose"):
        with torch.no_grad():
            ref.dora_scale.mul_(1.1)  # a magnitude that differs from ||W||
    return layer, ref, to_adapter(ref)


def _id(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_reference_forward(kind, opts):
    layer, ref, adapter = build(kind, **opts)
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


def test_alpha_scale_applied_once():
    layer, ref, adapter = build("linear", alpha=1.0, rank=8)
    assert adapter.scale == pytest.approx(1.0 / 8)
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("opts", [{}, {"use_tucker": True}, {"dora": "out"}, {"dora": "in"},
                                  {"use_scalar": True}], ids=_id)
def test_trainable_starts_at_zero_and_gets_gradients(kind, opts):
    layer = make_layer(kind)
    adapter = LoRA.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    w = layer.weight.detach()
    assert torch.allclose(adapter.merge(w, 1.0), w, atol=1e-6)
    x = sample_input(layer)
    out = adapter.bypass(x, layer.forward, 1.0, layer)
    (out.square().sum() + adapter.merge(w, 1.0).sum()).backward()
    grads = [p.grad for p in adapter.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_strength_interpolates_the_final_weight_not_the_magnitude(wd_on_out):
    """Ours: W + m*(W_dora - W) (strength 0 = base). lycoris-lora's merge path only interpolates
    the magnitude rescale and always applies the full direction change (compatibility.md)."""
    layer, ref, adapter = build("linear", weight_decompose=True, wd_on_out=wd_on_out)
    w = layer.weight.detach()
    full = adapter.merge(w, 1.0)
    with torch.no_grad():
        theirs_full = ref.get_merged_weight(multiplier=1.0)[0]
        theirs_half = ref.get_merged_weight(multiplier=0.5)[0]
    assert rel_err(full, theirs_full) < 1e-5  # same at strength 1
    ours_half = adapter.merge(w, 0.5)
    assert rel_err(ours_half, w + 0.5 * (full - w)) < 1e-6
    assert rel_err(ours_half, theirs_half) > 1e-2  # and really different in between
