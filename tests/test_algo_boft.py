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
from oracle import (DTYPE_TOL, STRENGTHS, bypass_forward, make_layer, merged_forward, randomize,
                    reference_forward, rel_err, sample_input, to_adapter)

# layer kind -> (lora_dim, expected oft_blocks shape M x n x b x b)
LAYERS = {
    "linear": (6, (4, 8, 6, 6)),        # Linear 64 -> 48
    "conv1x1": (10, (3, 4, 10, 10)),    # Conv 32 -> 40, 1x1
    "conv3x3": (10, (3, 4, 10, 10)),    # Conv 32 -> 40, 3x3, stride 2, padding 1
    "wide": (4, (5, 16, 4, 4)),         # Linear 32 -> 64: five stages
    "one_stage": (48, (1, 1, 48, 48)),  # Linear 64 -> 48 with one block of 48
}
OPTIONS = [dict(constraint=c, rescaled=r) for c in (0.0, 0.01) for r in (False, True)]


def _id(opts):
    return "-".join(f"{k}={v}" for k, v in opts.items())


def layer_for(kind):
    if kind == "wide":
        torch.manual_seed(0)
        return nn.Linear(32, 64)
    return make_layer("linear" if kind == "one_stage" else kind)


def build(kind, constraint=0.0, rescaled=False):
    layer = layer_for(kind)
    lora_dim, shape = LAYERS[kind]
    ref = ButterflyOFTModule("lora_unet_test", layer, lora_dim=lora_dim, constraint=constraint,
                             rescaled=rescaled)
    assert tuple(ref.oft_blocks.shape) == shape
    randomize(ref)
    if rescaled:
        with torch.no_grad():
            ref.rescale.add_(1.0)  # rescale near 1, as after training
    return layer, ref, to_adapter(ref)


def rotate_weight(r, w, rescale=None):
    out = butterfly(r, w.reshape(w.shape[0], -1).t()).t().reshape(w.shape)
    return out if rescale is None else out * rescale.reshape(-1, *([1] * (w.ndim - 1)))


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", LAYERS)
def test_merge_matches_reference(kind, opts):
    layer, ref, adapter = build(kind, **opts)
    assert type(adapter) is BOFT
    if opts["constraint"]:  # the bound c * O must actually clip Q in this test
        blocks = ref.oft_blocks.detach()
        assert (blocks - blocks.transpose(-1, -2)).norm() > opts["constraint"] * layer.weight.shape[0]
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5
    with torch.no_grad():
        ref_weight = ref.get_merged_weight(1.0)[0]
    assert rel_err(adapter.merge(layer.weight.detach(), 1.0), ref_weight) < 1e-6


@pytest.mark.parametrize("opts", OPTIONS, ids=_id)
@pytest.mark.parametrize("kind", LAYERS)
def test_strength_is_affine_and_bypass_matches_merge(kind, opts):
    layer, _, adapter = build(kind, **opts)
    assert layer.bias is not None and layer.bias.abs().sum() > 0  # bypass must keep the bias as is
    w = layer.weight.detach()
    full = adapter.merge(w, 1.0)
    x = sample_input(layer)
    for m in STRENGTHS:
        merged = adapter.merge(w, m)
        if m == 0:
            assert torch.equal(merged, w)
            assert torch.equal(bypass_forward(adapter, layer, x, m), layer(x))
        assert rel_err(merged, w + m * (full - w)) < 1e-6
        assert rel_err(bypass_forward(adapter, layer, x, m), merged_forward(adapter, layer, x, m)) < 1e-5


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
    w32 = layer.weight.detach()
    expected = adapter.merge(w32, 0.7)
    got = adapter.merge(w32.to(dtype), 0.7)
    assert got.dtype == dtype
    assert rel_err(got.float(), expected) < DTYPE_TOL[dtype]
    x = sample_input(layer)
    spec = LayerSpec.from_module(layer)
    with torch.no_grad():
        out = adapter.bypass(x.to(dtype), lambda v: spec.op(v, w32.to(dtype), layer.bias.to(dtype)),
                             0.7, spec)
    assert out.dtype == dtype
    assert rel_err(out.float(), merged_forward(adapter, layer, x, 0.7)) < 4 * DTYPE_TOL[dtype]


@pytest.mark.parametrize("constraint", [0.0, 0.01])
@pytest.mark.parametrize("kind", LAYERS)
def test_orthogonal_at_strength_one(kind, constraint):
    layer, _, adapter = build(kind, constraint=constraint)
    w = layer.weight.detach()
    merged = adapter.merge(w, 1.0)
    assert rel_err(merged, w) > 1e-2  # really rotated
    cols = w.reshape(w.shape[0], -1).norm(dim=0)  # a rotation of the rows keeps column norms
    assert rel_err(merged.reshape(w.shape[0], -1).norm(dim=0), cols) < 1e-6
    assert abs(float(merged.norm() / w.norm()) - 1) < 1e-6


def test_legacy_1d_rescale():
    """Feb 2024 files store rescale as (O,): read per output channel."""
    layer, ref, adapter = build("conv3x3", constraint=0.01, rescaled=True)
    sd = {f"m.{k}": v.detach().clone() for k, v in ref.state_dict().items()}
    sd["m.rescale"] = sd["m.rescale"].reshape(-1)
    old = load_file(sd, strict=True)["m"]
    w = layer.weight.detach()
    assert rel_err(old.merge(w, 1.0), adapter.merge(w, 1.0)) < 1e-7


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
    exported = adapter.export()
    reference = ref.state_dict()
    assert exported.keys() == reference.keys()
    for k, v in reference.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    again = load_file({f"m.{k}": v for k, v in exported.items()}, strict=True)["m"]
    w = layer.weight.detach()
    assert torch.equal(again.merge(w, 0.7), adapter.merge(w, 0.7))


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
    w = layer.weight.detach()
    assert torch.equal(adapter.merge(w, 1.0), w)
    x = sample_input(layer)
    assert torch.equal(bypass_forward(adapter, layer, x, 1.0), layer(x).detach())
    out = adapter.bypass(x, layer.forward, 1.0, layer)
    (out.square().sum() + adapter.merge(w, 1.0).square().sum()).backward()
    params = [p for p in adapter.parameters() if p.requires_grad]
    assert len(params) == (2 if rescaled else 1)
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
