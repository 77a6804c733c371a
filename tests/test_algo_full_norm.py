"""Full (diff / diff_b / set_weight) and norm layers (w_norm / b_norm) against lycoris-lora's
FullModule and NormModule.

FullModule's normal forward is unusable in 3.3.0 (`apply_to` deletes the layer's weight, then calls
the layer's own forward: AttributeError), and `get_merged_weight` before `apply_to` fails on a list
bias; its `state_dict` is only right after `apply_to` (before, it writes diff - W). So the oracle is
the module's merged weight and bias after `apply_to` (what its forward would add up to), and the
file is its `state_dict()` taken at that point.
"""
import pytest
import torch
import torch.nn.functional as F
from lycoris.modules.full import FullModule
from lycoris.modules.norms import NormModule
from torch import nn

from lycoris_core import LayerSpec, LycorisError, LycorisShapeError, load_file
from lycoris_core.algos.full import Full
from lycoris_core.algos.norm import Norm
from oracle import (LAYER_KINDS, NAME, assert_affine_and_bypass, assert_half_merge,
                    assert_merged_output, assert_reloads_identically, assert_trainable,
                    bypass_forward, make_layer, merged_forward, randomize, reference_forward,
                    reference_pair, rel_err, sample_input, to_adapter)


# ----- full ---------------------------------------------------------------------------------
def build_full(kind, bias=True):
    layer = make_layer(kind)
    if not bias:
        layer.bias = None
    ref = FullModule(NAME, layer)
    randomize(ref)
    ref.apply_to()
    try:
        weight, bias_ = ref.get_merged_weight()
        expected = (weight.detach().clone(), None if bias_ is None else bias_.detach().clone())
        adapter = to_adapter(ref)
    finally:
        ref.restore()
    return layer, expected, adapter


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_full_merge_matches_reference(kind):
    layer, (ref_w, ref_b), adapter = build_full(kind)
    assert adapter.diff_b is not None
    x = sample_input(layer)
    assert_merged_output(adapter, layer, x, LayerSpec.from_module(layer).op(x, ref_w, ref_b))
    with torch.no_grad():
        assert rel_err(adapter.merge_bias(layer.bias.detach()), ref_b) < 1e-6


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_full_strength_is_affine_and_bypass_matches_merge(kind, bias):
    layer, _, adapter = build_full(kind, bias)
    assert (adapter.diff_b is not None) == bias
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


def test_full_diff_b_on_a_layer_without_bias():
    """LyCORIS gives such a layer a bias of diff_b; merge_bias returns m * diff_b, bypass adds it."""
    layer = make_layer("linear")
    layer.bias = None
    g = torch.Generator().manual_seed(3)
    sd = {f"{NAME}.diff": torch.randn(48, 64, generator=g) * 0.1,
          f"{NAME}.diff_b": torch.randn(48, generator=g)}
    adapter = load_file(sd, strict=True)[NAME]
    assert torch.equal(adapter.merge_bias(None, 0.5), 0.5 * sd[f"{NAME}.diff_b"])
    assert adapter.merge_bias(None, 0.0) is None
    x = sample_input(layer)
    assert rel_err(bypass_forward(adapter, layer, x, 0.5), merged_forward(adapter, layer, x, 0.5)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_full_merge_in_half_precision(kind, dtype):
    layer, _, adapter = build_full(kind)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)
    assert_half_merge(adapter.merge_bias, layer.bias.detach(), dtype)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_set_weight_interpolates_towards_the_new_weight(kind):
    layer = make_layer(kind)
    w = layer.weight.detach()
    new = torch.randn(w.shape, generator=torch.Generator().manual_seed(4)) * 0.1
    adapter = load_file({f"{NAME}.set_weight": new}, strict=True)[NAME]
    assert isinstance(adapter, Full)
    assert torch.equal(adapter.merge(w, 0.0), w)
    assert rel_err(adapter.merge(w, 1.0), new) < 1e-6  # ComfyUI: always the new weight
    x = sample_input(layer)
    for m in (0.5, -1.0, 1.7):
        assert rel_err(adapter.merge(w, m), w + m * (new - w)) < 1e-6
        assert rel_err(bypass_forward(adapter, layer, x, m), merged_forward(adapter, layer, x, m)) < 1e-5
    assert set(adapter.export()) == {"set_weight"}


def test_full_validation_errors_name_the_key():
    with pytest.raises(LycorisError, match=r"lora_unet_test\.set_weight.*both diff and set_weight"):
        load_file({f"{NAME}.diff": torch.zeros(4, 4), f"{NAME}.set_weight": torch.zeros(4, 4)}, strict=True)
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.diff_b.*5 entries.*4 output rows"):
        load_file({f"{NAME}.diff": torch.zeros(4, 3), f"{NAME}.diff_b": torch.zeros(5)}, strict=True)
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.diff_b.*1-d"):
        load_file({f"{NAME}.diff_b": torch.zeros(4, 1)}, strict=True)
    adapter = load_file({f"{NAME}.diff": torch.zeros(48, 60), f"{NAME}.diff_b": torch.zeros(48)},
                        strict=True)[NAME]
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test.*\[48, 60\].*\[48, 64\]"):
        adapter.merge(make_layer("linear").weight.detach())
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.diff_b.*48 entries.*40"):
        adapter.merge_bias(torch.zeros(40))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_full_export_round_trip(kind):
    layer, _, adapter = build_full(kind)
    out = adapter.export()
    assert set(out) == {"diff", "diff_b"}
    assert_reloads_identically(adapter, layer, 0.3, out)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_full_trainable_starts_at_zero_and_gets_gradients(kind):
    layer = make_layer(kind)
    adapter = Full.create(LayerSpec.from_module(layer))
    params = assert_trainable(adapter, layer, sample_input(layer), through_merge=False, each=True)
    assert len(params) == 2  # diff_w and diff_b
    w, b = layer.weight, layer.bias
    assert {k: v.shape for k, v in adapter.export().items()} == {"diff": w.shape, "diff_b": b.shape}


# ----- norm layers ----------------------------------------------------------------------------
NORM_KINDS = ("layernorm", "groupnorm")


def make_norm(kind):
    torch.manual_seed(0)
    layer = nn.LayerNorm(64) if kind == "layernorm" else nn.GroupNorm(4, 32)
    with torch.no_grad():  # a non-trivial affine part
        layer.weight.add_(torch.randn_like(layer.weight) * 0.2)
        layer.bias.add_(torch.randn_like(layer.bias) * 0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=g) if kind == "layernorm" else torch.randn(2, 32, 5, 5, generator=g)
    return layer, x


def norm_forward(layer, x, weight, bias):
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)


def merged_norm(adapter, layer, x, m=1.0):
    w = adapter.merge(layer.weight.detach(), m)
    b = adapter.merge_bias(layer.bias.detach(), m)
    return norm_forward(layer, x, w, b)


def build_norm(kind):
    layer, x = make_norm(kind)
    return (layer, x, *reference_pair(NormModule, layer, scale=0.3))


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_merge_matches_reference_forward(kind):
    layer, x, ref, adapter = build_norm(kind)
    assert isinstance(adapter, Norm)
    assert_merged_output(adapter, layer, x, reference_forward(ref, x), forward=merged_norm)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_strength_is_affine_and_bypass_matches_merge(kind):
    layer, x, _, adapter = build_norm(kind)
    assert_affine_and_bypass(adapter, layer, x, forward=merged_norm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_merge_in_half_precision(kind, dtype):
    layer, _, _, adapter = build_norm(kind)
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)
    assert_half_merge(adapter.merge_bias, layer.bias.detach(), dtype)


def test_full_diff_on_a_norm_weight():
    """ComfyUI's trainer writes `diff`/`diff_b` for norm scales: bypass through a norm layer too."""
    layer, x = make_norm("groupnorm")
    g = torch.Generator().manual_seed(6)
    sd = {f"{NAME}.diff": torch.randn(32, generator=g) * 0.3, f"{NAME}.diff_b": torch.randn(32, generator=g)}
    adapter = load_file(sd, strict=True)[NAME]
    assert isinstance(adapter, Full)
    for m in (1.0, -0.5):
        assert rel_err(bypass_forward(adapter, layer, x, m), merged_norm(adapter, layer, x, m)) < 1e-5


def test_norm_validation_errors_name_the_key():
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.b_norm.*32 does not match 64"):
        load_file({f"{NAME}.w_norm": torch.zeros(64), f"{NAME}.b_norm": torch.zeros(32)}, strict=True)
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test\.w_norm.*1-d"):
        load_file({f"{NAME}.w_norm": torch.zeros(8, 8)}, strict=True)
    adapter = load_file({f"{NAME}.w_norm": torch.zeros(64)}, strict=True)[NAME]
    with pytest.raises(LycorisShapeError, match=r"lora_unet_test.*64 channels.*\[32\]"):
        adapter.merge(torch.ones(32))


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_export_round_trip(kind):
    layer, x, ref, adapter = build_norm(kind)
    out = adapter.export()
    assert set(out) == {"w_norm", "b_norm"}
    assert all(torch.equal(out[k], v) for k, v in ref.state_dict().items())
    reloaded = assert_reloads_identically(adapter, layer, 0.4, out)
    assert torch.equal(merged_norm(reloaded, layer, x, 0.4), merged_norm(adapter, layer, x, 0.4))


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_trainable_starts_at_zero_and_gets_gradients(kind):
    layer, x = make_norm(kind)
    adapter = Norm.create(LayerSpec.from_module(layer))
    params = assert_trainable(adapter, layer, x, through_merge=False, each=True)
    assert len(params) == 2  # w_norm and b_norm
    shapes = {k: v.shape for k, v in NormModule(NAME, layer).state_dict().items()}
    assert {k: v.shape for k, v in adapter.export().items()} == shapes


# ----- RMSNorm (DiT q/k norms) ------------------------------------------------------------------
# lycoris-lora's NormModule refuses RMSNorm, so the oracle is the layer itself run with the merged
# weight: bypass must equal it, and must differ from a LayerNorm reading of the same layer.
class DiTRMSNorm(nn.Module):
    """An RMSNorm written the way DiT code bases write their own (not torch's class)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight


def make_rms_norm(cls, eps):
    torch.manual_seed(0)
    layer = nn.RMSNorm(64, eps=eps) if cls == "torch" else DiTRMSNorm(64, eps=eps or 1e-6)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.2)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)) * 3 + 1  # mean far from 0
    return layer, x


def with_weight(layer, weight, x):
    original = layer.weight.data.clone()
    with torch.no_grad():
        layer.weight.copy_(weight)
        try:
            return layer(x)
        finally:
            layer.weight.copy_(original)


@pytest.mark.parametrize("cls,eps", [("torch", None), ("torch", 1e-6), ("dit", 1e-6)])
def test_norm_on_rms_norm_bypass_equals_the_layer_with_merged_weight(cls, eps):
    layer, x = make_rms_norm(cls, eps)
    spec = LayerSpec.from_module(layer)
    assert (spec.kind, spec.norm_type) == ("norm", "rms")
    g = torch.Generator().manual_seed(3)
    for sd in ({f"{NAME}.w_norm": torch.randn(64, generator=g) * 0.3},
               {f"{NAME}.diff": torch.randn(64, generator=g) * 0.3}):
        adapter = load_file(sd, strict=True)[NAME]
        for m in (1.0, 0.5, -0.7):
            expected = with_weight(layer, adapter.merge(layer.weight.detach(), m), x)
            got = bypass_forward(adapter, layer, x, m)
            assert rel_err(got, expected) < 1e-5, (type(adapter).__name__, m)
        # the LayerNorm reading (what bypass computed before) is far off: the test can fail
        as_layer_norm = LayerSpec("norm", (64,), weight=layer.weight, norm_type="layer", eps=1e-6)
        wrong = adapter.bypass(x, layer.forward, 1.0, as_layer_norm)
        right = with_weight(layer, adapter.merge(layer.weight.detach(), 1.0), x)
        assert rel_err(wrong, right) > 1e-2


def test_rms_norm_layers_are_trainable_norm_targets():
    from lycoris_core.train.targets import layer_kind

    layer, x = make_rms_norm("torch", None)
    assert layer_kind(layer) == "norm" and layer_kind(DiTRMSNorm(8)) == "norm"
    assert layer_kind(nn.RMSNorm(8, elementwise_affine=False)) is None
    adapter = Norm.create(LayerSpec.from_module(layer))
    assert adapter.b_norm is None  # RMSNorm has no shift
    layer.bias = None  # what assert_trainable reads for "no bias"
    assert len(assert_trainable(adapter, layer, x, through_merge=False, each=True)) == 1
