"""BOFT: merge and bypass against lycoris-lora's ButterflyOFTModule, every layer kind and option.

Reference: LyCORIS 3.3.0's normal (non-bypass) forward runs the layer with `make_weight(m)` (the
butterfly-rotated, rescaled weight) and the *unrotated* bias; `get_merged_weight(m)` is the same
`make_weight(m)`. BOFT needs O = b * 2^k with b even, so block sizes are chosen per layer.
"""
import pytest
import torch
from lycoris.modules.boft import ButterflyOFTModule
from torch import nn

from lycoris_core import LayerSpec, LycorisShapeError, load_file
from lycoris_core.algos.boft import BOFT, butterfly, power2_factorization
from oracle import (assert_affine_and_bypass, assert_export_is_reference_state,
                    assert_flat_rescale_reads_alike, assert_half_base_bypass, assert_half_merge,
                    assert_merged_like_reference, assert_rotates_rows, assert_trainable, make_layer,
                    options_id, reference_pair, rel_err, sample_input)

# layer kind -> (lora_dim, expected oft_blocks shape M x n x b x b)
LAYERS = {
    "linear": (6, (4, 8, 6, 6)),        # Linear 64 -> 48
    "conv1x1": (10, (3, 4, 10, 10)),    # Conv 32 -> 40, 1x1
    "conv3x3": (10, (3, 4, 10, 10)),    # Conv 32 -> 40, 3x3, stride 2, padding 1
    "wide": (4, (5, 16, 4, 4)),         # Linear 32 -> 64: five stages
    "one_stage": (48, (1, 1, 48, 48)),  # Linear 64 -> 48 with one block of 48
}
OPTIONS = [dict(constraint=c, rescaled=r) for c in (0.0, 0.01) for r in (False, True)]


def layer_for(kind):
    if kind == "wide":
        torch.manual_seed(0)
        return nn.Linear(32, 64)
    return make_layer("linear" if kind == "one_stage" else kind)


def build(kind, constraint=0.0, rescaled=False):
    layer = layer_for(kind)
    lora_dim, shape = LAYERS[kind]
    ref, adapter = reference_pair(ButterflyOFTModule, layer, lora_dim=lora_dim, constraint=constraint,
                                  rescaled=rescaled)
    assert tuple(ref.oft_blocks.shape) == shape
    return layer, ref, adapter


def rotate_weight(r, w, rescale=None):
    out = butterfly(r, w.reshape(w.shape[0], -1).t()).t().reshape(w.shape)
    return out if rescale is None else out * rescale.reshape(-1, *([1] * (w.ndim - 1)))


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("kind", LAYERS)
def test_merge_matches_reference(kind, opts):
    layer, ref, adapter = build(kind, **opts)
    assert type(adapter) is BOFT
    if opts["constraint"]:  # the bound c * O must actually clip Q in this test
        blocks = ref.oft_blocks.detach()
        assert (blocks - blocks.transpose(-1, -2)).norm() > opts["constraint"] * layer.weight.shape[0]
    assert_merged_like_reference(adapter, ref, layer)


@pytest.mark.parametrize("opts", OPTIONS, ids=options_id)
@pytest.mark.parametrize("kind", LAYERS)
def test_strength_is_affine_and_bypass_matches_merge(kind, opts):
    layer, _, adapter = build(kind, **opts)
    assert layer.bias is not None and layer.bias.abs().sum() > 0  # bypass must keep the bias as is
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


@pytest.mark.parametrize("rescaled", [False, True])
def test_strength_differs_from_lycoris_per_stage_rule(rescaled):
    """LyCORIS interpolates every stage, R_s(m) = I + m (R_s - I), then rescales; we interpolate the
    total transform. Same at m = 1, different elsewhere (documented deviation)."""
    layer, ref, adapter = build("linear", constraint=0.01, rescaled=rescaled)
    w = layer.weight.detach()
    r = adapter._prepared(w.device, torch.float32)["r"]
    rescale = ref.rescale.detach() if rescaled else None
    for m in (0.5, -1.0, 1.7):
        with torch.no_grad():
            lyco = ref.get_merged_weight(m)[0]
        per_stage = rotate_weight(torch.eye(r.shape[-1]) + m * (r - torch.eye(r.shape[-1])), w, rescale)
        assert rel_err(lyco, per_stage) < 1e-6  # what LyCORIS does, spelled out
        assert rel_err(adapter.merge(w, m), lyco) > 1e-3  # and ours is not that


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_half_precision(kind, dtype):
    layer, _, adapter = build(kind, constraint=0.01, rescaled=True)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)
    assert_half_base_bypass(adapter, layer, sample_input(layer), dtype)


@pytest.mark.parametrize("constraint", [0.0, 0.01])
@pytest.mark.parametrize("kind", LAYERS)
def test_orthogonal_at_strength_one(kind, constraint):
    layer, _, adapter = build(kind, constraint=constraint)
    assert_rotates_rows(adapter, layer.weight.detach())


def test_legacy_1d_rescale():
    """Feb 2024 files store rescale as (O,): read per output channel."""
    layer, ref, adapter = build("conv3x3", constraint=0.01, rescaled=True)
    assert_flat_rescale_reads_alike(adapter, ref, layer)


@pytest.mark.parametrize("shape, match", [
    ((3, 4, 5, 5), "even"),           # odd block size
    ((3, 3, 4, 4), "power-of-two"),   # 3 blocks
    ((2, 8, 4, 4), "stages"),         # 8 blocks need 4 stages
    ((4, 8, 4, 6), "square"),
])
def test_bad_shapes(shape, match):
    with pytest.raises(LycorisShapeError, match=match):
        load_file({"m.oft_blocks": torch.zeros(shape)}, strict=True)


def test_wrong_target():
    adapter = load_file({"m.oft_blocks": torch.zeros(4, 8, 4, 4)}, strict=True)["m"]
    with pytest.raises(LycorisShapeError):
        adapter.merge(torch.zeros(48, 4))


def test_round_trip_and_export_layout():
    layer, ref, adapter = build("conv3x3", constraint=0.01, rescaled=True)
    assert_export_is_reference_state(adapter, ref, layer)


def test_power2_factorization():
    assert power2_factorization(96, 8) == (6, 16)
    assert power2_factorization(48, 6) == (6, 8)
    assert power2_factorization(64, -1) == (64, 1)
    assert power2_factorization(40, 4) is None
    with pytest.raises(LycorisShapeError):
        BOFT.create(LayerSpec.from_module(make_layer("conv1x1")), rank=4)


@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "wide"])
def test_trainable_starts_at_identity_and_gets_gradients(kind, rescaled):
    layer = layer_for(kind)
    lora_dim, shape = LAYERS[kind]
    adapter = BOFT.create(LayerSpec.from_module(layer), rank=lora_dim, constraint=1e-3, rescaled=rescaled)
    ref = ButterflyOFTModule("t", layer, lora_dim=lora_dim, constraint=1e-3, rescaled=rescaled)
    exported = adapter.export()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert tuple(exported["oft_blocks"].shape) == shape
    params = assert_trainable(adapter, layer, sample_input(layer), each=True)
    assert len(params) == (2 if rescaled else 1)


@pytest.mark.parametrize("blocks", [(4, 8, 6), (5, 16, 4), (6, 32, 10), (3, 4, 2), (1, 1, 48)])
def test_grouped_streaming_merge_equals_the_stagewise_butterfly(blocks, monkeypatch):
    """Merging runs several stages per dense block and streams column chunks (reusing one
    scratch pair); it must equal the stage-by-stage butterfly, rescale and strength included."""
    import lycoris_core.algos.base as base

    stages, n, b = blocks
    g = torch.Generator().manual_seed(stages * 100 + b)
    out_dim = n * b
    sd = {"m.oft_blocks": 0.05 * torch.randn(stages, n, b, b, generator=g), "m.alpha": torch.tensor(0.0),
          "m.rescale": 1 + 0.1 * torch.randn(out_dim, 1, 1, 1, generator=g)}
    adapter = load_file(sd, strict=True)["m"]
    w = torch.randn(out_dim, 7, 3, 3, generator=g)
    p = adapter._prepared(w.device, torch.float32)
    rescale = p["rescale"].reshape(-1, 1, 1, 1)
    rotated = rotate_weight(p["r"], w) * rescale
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)  # 16 columns per chunk: 4 chunks of 63 columns
    for m in (1.0, 0.3, -0.7):
        expected = w + m * (rotated - w)
        assert rel_err(adapter.merge(w, m), expected) < 1e-6
        inplace = w.clone()
        adapter.merge(inplace, m, inplace=True)
        assert torch.equal(inplace, adapter.merge(w, m))
