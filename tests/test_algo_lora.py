"""LoRA/LoCon: merge and bypass against lycoris-lora's LoConModule, every layer kind and option."""
import itertools

import pytest
import torch
from lycoris.modules.locon import LoConModule

from lycoris_core import LayerSpec
from lycoris_core.algos.lora import LoRA
from oracle import (LAYER_KINDS, assert_affine_and_bypass, assert_half_merge, assert_trainable,
                    make_layer, merged_forward, options_id, reference_forward, reference_pair, rel_err,
                    sample_input)

OPTIONS = [dict(use_tucker=t, weight_decompose=wd, wd_on_out=axis)
           for t, (wd, axis) in itertools.product((False, True), ((False, True), (True, True), (True, False)))]


def build(kind, alpha=2.0, rank=4, **opts):
    layer = make_layer(kind)
    return (layer, *reference_pair(LoConModule, layer, lora_dim=rank, alpha=alpha, **opts))


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_matches_reference_forward(kind, opts):
    layer, ref, adapter = build(kind, **opts)
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_strength_is_affine_and_bypass_matches_merge(kind, opts):
    layer, _, adapter = build(kind, **opts)
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_in_half_precision(kind, dtype):
    layer, _, adapter = build(kind, weight_decompose=True)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)


def test_alpha_scale_applied_once():
    layer, ref, adapter = build("linear", alpha=1.0, rank=8)
    assert adapter.scale == pytest.approx(1.0 / 8)
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("opts", [{}, {"use_tucker": True}, {"dora": "out"}, {"dora": "in"},
                                  {"use_scalar": True}], ids=options_id)
def test_trainable_starts_at_zero_and_gets_gradients(kind, opts):
    layer = make_layer(kind)
    adapter = LoRA.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    assert_trainable(adapter, layer, sample_input(layer), atol=1e-6)


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
