"""LoKr: merge and bypass against lycoris-lora's LokrModule, every factor layout and option.

LyCORIS 3.3.0 is inconsistent with itself (doc §1.15): its merge path applies gamma twice, its
bypass path never applies it (and reshapes conv k x k wrongly), and `make_module_from_state_dict`
reads the Tucker rank from the wrong axis. Expected values therefore come from the module's
normal forward path (gamma once) or, where no reference module can express the file (legacy
4-d lokr_w1), from the Kronecker formula itself. rank 4 with alpha 2 keeps gamma != 1.
"""
import math

import pytest
import torch
from lycoris.modules.lokr import LokrModule

import lycoris_core.algos.base as base
from lycoris_core import LayerSpec, load_file
from lycoris_core.algos.base import Adapter
from lycoris_core.algos.lokr import LoKr
from oracle import (LAYER_KINDS, NAME, assert_affine_and_bypass, assert_export_like_reference,
                    assert_half_bypass, assert_half_merge, assert_trainable, bypass_forward,
                    make_layer, merged_forward, options_id, randomize, reference_forward,
                    reference_options, reference_pair, rel_err, sample_input, to_adapter)

W1, W1_SPLIT = {"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}
W2, W2_SPLIT = {"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}
CONVS = ("conv1x1", "conv3x3")
# layout name -> (reference options, the keys it must produce, the layer kinds where it occurs)
LAYOUTS = {
    "full_w1-split_w2": (dict(rank=4, factor=4), W1 | W2_SPLIT, LAYER_KINDS),
    "decompose_both": (dict(rank=4, factor=2, decompose_both=True, unbalanced_factorization=True),
                       W1_SPLIT | W2_SPLIT, LAYER_KINDS),
    "split_w1-full_w2": (dict(rank=4, factor=4, decompose_both=True, unbalanced_factorization=True),
                         W1_SPLIT | W2, CONVS),
    "full_matrix": (dict(rank=4, full_matrix=True), W1 | W2, LAYER_KINDS),
    "full_by_rank": (dict(rank=4, factor=-1), W1 | W2, LAYER_KINDS),
    "factor-1": (dict(rank=3, factor=-1), W1 | W2_SPLIT, LAYER_KINDS),
    "factor8": (dict(rank=3, factor=8), W1 | W2_SPLIT, LAYER_KINDS),
    "factor8-decompose_both": (dict(rank=3, factor=8, decompose_both=True), W1_SPLIT | W2_SPLIT,
                               ("linear",)),
    "tucker": (dict(rank=4, factor=4, use_tucker=True), W1 | W2_SPLIT | {"lokr_t2"}, ("conv3x3",)),
    "tucker-decompose_both": (dict(rank=4, factor=2, decompose_both=True, use_tucker=True,
                                   unbalanced_factorization=True),
                              W1_SPLIT | W2_SPLIT | {"lokr_t2"}, ("conv3x3",)),
    "dora_out": (dict(rank=4, factor=4, weight_decompose=True, wd_on_out=True), W1 | W2_SPLIT,
                 LAYER_KINDS),
    "dora_in": (dict(rank=4, factor=4, weight_decompose=True, wd_on_out=False), W1 | W2_SPLIT,
                LAYER_KINDS),
    "dora_in-decompose_both": (dict(rank=4, factor=2, decompose_both=True, use_tucker=True,
                                    unbalanced_factorization=True, weight_decompose=True,
                                    wd_on_out=False), W1_SPLIT | W2_SPLIT, ("linear", "conv1x1")),
    "dora_out-tucker": (dict(rank=4, factor=4, use_tucker=True, weight_decompose=True),
                        W1 | W2_SPLIT | {"lokr_t2"}, ("conv3x3",)),
    "scalar": (dict(rank=4, factor=4, use_scalar=True), W1 | W2_SPLIT, LAYER_KINDS),
    "scalar-split_w1": (dict(rank=4, factor=2, decompose_both=True, unbalanced_factorization=True,
                             use_scalar=True), W1_SPLIT | W2_SPLIT, LAYER_KINDS),
}
CASES = [(kind, name) for name, (_, _, kinds) in LAYOUTS.items() for kind in kinds]
NO_DORA = [(kind, name) for kind, name in CASES if not name.startswith("dora")]


def build(kind, name, alpha=2.0):
    """Reference module with random factors for one layout, and our adapter read from its file."""
    opts, expect, _ = LAYOUTS[name]
    opts = dict(opts)
    rank = opts.pop("rank")
    layer = make_layer(kind)
    ref, adapter = reference_pair(LokrModule, layer, lora_dim=rank, alpha=alpha, **opts)
    keys = set(ref.state_dict()) - {"alpha", "dora_scale"}
    assert keys == expect, f"{name} on {kind} gives {sorted(keys)}"
    return layer, ref, adapter


def _case_id(case):
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_merge_matches_reference_forward(case):
    layer, ref, adapter = build(*case)
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_strength_is_affine_and_bypass_matches_merge(case):
    layer, _, adapter = build(*case)
    assert_affine_and_bypass(adapter, layer, sample_input(layer))


@pytest.mark.parametrize("case", NO_DORA, ids=_case_id)
def test_bypass_never_builds_the_kronecker_product(case, monkeypatch):
    layer, _, adapter = build(*case)
    x = sample_input(layer)
    expected = merged_forward(adapter, layer, x, 0.6)

    def dense(*args, **kwargs):
        raise AssertionError("dense dW built in bypass")

    monkeypatch.setattr(LoKr, "diff", dense)
    monkeypatch.setattr(Adapter, "delta_forward", dense)
    assert rel_err(bypass_forward(adapter, layer, x, 0.6), expected) < 1e-5


@pytest.mark.parametrize("alpha", [1e5, math.inf])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_two_full_factors_ignore_alpha(kind, alpha):
    layer = make_layer(kind)
    ref = LokrModule("lora_unet_test", layer, lora_dim=4, alpha=2.0, full_matrix=True)
    randomize(ref)
    sd = {f"lora_unet_test.{k}": v.detach().clone() for k, v in ref.state_dict().items()}
    # what a huge dim (or its fp16 save, which overflows to inf) leaves in the file
    sd["lora_unet_test.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    adapter = load_file(sd, strict=True)["lora_unet_test"]
    assert not adapter.alpha_matters() and adapter.scale == 1.0
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5
    assert rel_err(bypass_forward(adapter, layer, x), merged_forward(adapter, layer, x)) < 1e-5


@pytest.mark.parametrize("w2_layout", ["tucker", "full"])
def test_legacy_4d_w1(w2_layout):
    # LyCORIS fd45647 wrote lokr_w1 as out_l x in_m x 1 x 1 for Tucker convs; no current module
    # can produce it, so the expected dW is the Kronecker formula written out with einsum:
    # dW[i*out_k + j, p*in_n + q, h, w] = gamma * W1[i, p] * W2[j, q, h, w]
    g = torch.Generator().manual_seed(5)
    layer = make_layer("conv3x3")  # 40 x 32 x 3 x 3 = (4*10) x (4*8) x 3 x 3
    w1 = torch.randn(4, 4, 1, 1, generator=g)
    sd = {"lokr_w1": w1, "alpha": torch.tensor(2.0)}
    if w2_layout == "tucker":
        t2, w2a, w2b = (torch.randn(*s, generator=g) for s in ((4, 4, 3, 3), (4, 10), (4, 8)))
        sd.update(lokr_t2=t2, lokr_w2_a=w2a, lokr_w2_b=w2b)
        w2 = torch.einsum("abhw,ap,bq->pqhw", t2, w2a, w2b)
        gamma = 2.0 / 4
    else:
        w2 = torch.randn(10, 8, 3, 3, generator=g)
        sd.update(lokr_w2=w2)
        gamma = 1.0  # both factors full: alpha ignored
    adapter = load_file({f"lora_unet_test.{k}": v for k, v in sd.items()}, strict=True)["lora_unet_test"]
    dw = gamma * torch.einsum("ip,jqhw->ijpqhw", w1[:, :, 0, 0], w2).reshape(40, 32, 3, 3)
    w = layer.weight.detach()
    assert rel_err(adapter.merge(w, 1.0), w + dw) < 1e-6
    x = sample_input(layer)
    with torch.no_grad():
        expected = layer._conv_forward(x, w + dw, layer.bias)
    assert rel_err(bypass_forward(adapter, layer, x), expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_in_half_precision(kind, dtype):
    layer, _, adapter = build(kind, "dora_out")
    assert_half_merge(adapter.merge, layer.weight.detach(), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [("linear", "decompose_both"), ("conv3x3", "tucker"),
                                  ("conv3x3", "full_w1-split_w2")], ids=_case_id)
def test_bypass_in_half_precision(case, dtype):
    layer, _, adapter = build(*case)
    assert_half_bypass(adapter, layer, sample_input(layer), dtype)


def test_alpha_scale_applied_once():
    layer = make_layer("linear")
    ref = LokrModule("lora_unet_test", layer, lora_dim=8, alpha=1.0, factor=2)
    randomize(ref)
    adapter = to_adapter(ref)
    assert adapter.rank == 8 and adapter.scale == pytest.approx(1.0 / 8)
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5


@pytest.mark.parametrize("case", [("linear", "decompose_both"), ("conv3x3", "tucker"),
                                  ("conv1x1", "split_w1-full_w2")], ids=_case_id)
def test_row_chunks_build_only_their_rows(case, monkeypatch):
    layer, _, adapter = build(*case)
    w = layer.weight.detach()
    p = adapter._prepared(w.device, torch.float32)
    full = adapter.diff(w, None, p)
    out_k = adapter.row_block
    assert out_k > 1 and w.shape[0] % out_k == 0
    for rows in (slice(0, out_k), slice(out_k, 3 * out_k), slice(3, out_k + 5), slice(7, 8)):
        assert torch.equal(adapter.diff(w[rows], rows, p), full[rows])
    whole = adapter.merge(w, 1.0)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)  # one Kronecker block row per chunk
    assert torch.equal(adapter.merge(w, 1.0), whole)


TRAIN_OPTS = [{}, {"decompose_both": True, "factor": 2, "unbalanced_factorization": True},
              {"use_tucker": True, "factor": 4}, {"full_matrix": True}, {"factor": 8},
              {"dora": "out"}, {"dora": "in"}, {"use_scalar": True},
              {"use_scalar": True, "decompose_both": True, "factor": 2,
               "unbalanced_factorization": True}]


def _id(opts):
    return options_id(opts, "default")


@pytest.mark.parametrize("opts", TRAIN_OPTS, ids=_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_trainable_starts_at_zero_and_gets_gradients(kind, opts):
    layer = make_layer(kind)
    adapter = LoKr.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    assert_trainable(adapter, layer, sample_input(layer), atol=1e-6)


@pytest.mark.parametrize("opts", TRAIN_OPTS, ids=_id)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_export_has_reference_layout_and_reloads_identically(kind, opts):
    layer = make_layer(kind)
    adapter = LoKr.create(LayerSpec.from_module(layer), rank=4, alpha=2.0, **opts)
    ref = LokrModule(NAME, layer, lora_dim=4, alpha=2.0, **reference_options(opts))
    # a scalar is baked into lokr_w1 / lokr_w1_a; full+full: alpha = rank
    assert_export_like_reference(adapter, ref, layer)
