"""Helpers for checking our algorithms against the reference library (lycoris-lora) as an oracle,
and the assertions every algorithm's tests share (strength rule, half precision, round trip,
training)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lycoris_core import LayerSpec, load_file

NAME = "lora_unet_test"
STRENGTHS = (0.0, 0.5, -1.0, 1.7)
# relative Frobenius error allowed when merging in each weight dtype (vs the fp32 result)
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_layer(kind: str, seed: int = 0) -> nn.Module:
    """Layers every algorithm is tested on: Linear, Conv 1x1, Conv 3x3 (stride 2, padding 1)."""
    torch.manual_seed(seed)
    return {
        "linear": lambda: nn.Linear(64, 48),
        "conv1x1": lambda: nn.Conv2d(32, 40, 1),
        "conv3x3": lambda: nn.Conv2d(32, 40, 3, stride=2, padding=1),
    }[kind]()


LAYER_KINDS = ("linear", "conv1x1", "conv3x3")


def options_id(opts: dict, empty: str = "") -> str:
    """Test id of an options dict: its `key=value` items joined by `-`, `empty` when it has none."""
    return "-".join(f"{k}={v}" for k, v in opts.items()) or empty


def sample_input(layer: nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(3, layer.in_features, generator=g)
    return torch.randn(2, layer.in_channels, 9, 9, generator=g)


def randomize(module: nn.Module, scale: float = 0.1, seed: int = 2) -> None:
    """Give every trainable parameter random non-zero values (reference init is dW = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def reference_forward(lyco_module, x: torch.Tensor) -> torch.Tensor:
    """Output of the reference module's normal forward path at multiplier 1."""
    lyco_module.apply_to()
    try:
        with torch.no_grad():
            return lyco_module(x)
    finally:
        lyco_module.restore()


def reload(tensors: dict[str, torch.Tensor], name: str = NAME):
    """Our adapter read back from one module's tensors (suffix -> tensor), as from a file."""
    return load_file({f"{name}.{k}": v for k, v in tensors.items()}, strict=True)[name]


def to_adapter(lyco_module, name: str = NAME):
    """Save the reference module with its own state_dict, load with our reader."""
    return reload({k: v.detach().clone() for k, v in lyco_module.state_dict().items()}, name)


def reference_pair(module_cls, layer: nn.Module, *, scale: float = 0.1, **opts):
    """A reference module around `layer` with random weights as after training (a DoRA magnitude
    off ||W||, a rescale near 1), and our adapter read from its state_dict."""
    ref = module_cls(NAME, layer, **opts)
    randomize(ref, scale=scale)
    with torch.no_grad():
        if opts.get("weight_decompose"):
            ref.dora_scale.mul_(1.1)  # a magnitude that differs from ||W||
        if opts.get("rescaled"):
            ref.rescale.add_(1.0)  # rescale near 1, as after training
    return ref, to_adapter(ref)


def reference_options(opts: dict) -> dict:
    """Our `create` options as the reference module's: `dora="out"|"in"` -> weight_decompose."""
    out = {k: v for k, v in opts.items() if k != "dora"}
    if "dora" in opts:
        out.update(weight_decompose=True, wd_on_out=opts["dora"] == "out")
    return out


def merged_forward(adapter, layer: nn.Module, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    spec = LayerSpec.from_module(layer)
    w = adapter.merge(layer.weight.detach(), strength)
    b = adapter.merge_bias(None if layer.bias is None else layer.bias.detach(), strength)
    return spec.op(x, w, b)


def bypass_forward(adapter, layer: nn.Module, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return adapter.bypass(x, layer.forward, strength, LayerSpec.from_module(layer))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of a against b."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ----- assertions shared by the algorithms' tests ---------------------------------------------
def assert_merged_output(adapter, layer: nn.Module, x: torch.Tensor, expected: torch.Tensor, *,
                         forward=merged_forward) -> None:
    """The merged layer at strength 1 (run by `forward`) gives `expected`, the reference output,
    and the adapter really changes the output: `expected` differs from the layer's own."""
    err = rel_err(forward(adapter, layer, x), expected)
    assert err < 1e-5, f"merged output off the reference by {err:.3g}"
    with torch.no_grad():
        change = rel_err(layer(x), expected)
    assert change > 1e-3, f"the reference output differs from the layer's own by only {change:.3g}"


def assert_affine_and_bypass(adapter, layer: nn.Module, x: torch.Tensor, strengths=STRENGTHS, *,
                             tol: float = 1e-6, bypass_tol: float = 1e-5,
                             forward=merged_forward) -> None:
    """At each strength m: weight and bias are `W + m (W(1) - W)` (within `tol`), strength 0 leaves
    them and the output bit-identical, and bypass equals the merged layer run by `forward`
    (within `bypass_tol`)."""
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    full_w, full_b = adapter.merge(w, 1.0), adapter.merge_bias(b, 1.0)
    for m in strengths:
        merged_w, merged_b = adapter.merge(w, m), adapter.merge_bias(b, m)
        if m == 0:
            assert torch.equal(merged_w, w), "strength 0 changed the weight"
            assert b is None or torch.equal(merged_b, b), "strength 0 changed the bias"
            with torch.no_grad():
                assert torch.equal(bypass_forward(adapter, layer, x, m), layer(x)), \
                    "strength 0 changed the bypass output"
        err = rel_err(merged_w, w + m * (full_w - w))
        assert err < tol, f"strength {m}: weight off the affine rule by {err:.3g}"
        if b is not None:
            err = rel_err(merged_b, b + m * (full_b - b))
            assert err < tol, f"strength {m}: bias off the affine rule by {err:.3g}"
        err = rel_err(bypass_forward(adapter, layer, x, m), forward(adapter, layer, x, m))
        assert err < bypass_tol, f"strength {m}: bypass off merge by {err:.3g}"


def assert_half_merge(merge, t: torch.Tensor, dtype: torch.dtype, strength: float = 0.7) -> torch.Tensor:
    """`merge` (an adapter's merge or merge_bias) of fp32 `t` cast to `dtype` returns `dtype` and
    stays within DTYPE_TOL of the fp32 merge; returns the fp32 merge."""
    expected = merge(t, strength)
    got = merge(t.to(dtype), strength)
    assert got.dtype == dtype
    err = rel_err(got.float(), expected)
    assert err < DTYPE_TOL[dtype], f"{dtype} merge off fp32 by {err:.3g}"
    return expected


def assert_half_bypass(adapter, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype,
                       strength: float = 0.7) -> None:
    """Bypass with the layer and input in `dtype` returns `dtype` within DTYPE_TOL of fp32 bypass."""
    expected = bypass_forward(adapter, layer, x, strength)
    got = bypass_forward(adapter, copy.deepcopy(layer).to(dtype), x.to(dtype), strength)
    assert got.dtype == dtype
    err = rel_err(got.float(), expected)
    assert err < DTYPE_TOL[dtype], f"{dtype} bypass off fp32 by {err:.3g}"


def assert_half_base_bypass(adapter, layer: nn.Module, x: torch.Tensor, dtype: torch.dtype,
                            strength: float = 0.7) -> None:
    """Bypass around a base forward run in `dtype` (the layer spec keeping the fp32 weight) returns
    `dtype` within 4 x DTYPE_TOL of the fp32 merged layer."""
    spec = LayerSpec.from_module(layer)
    w, b = layer.weight.detach().to(dtype), layer.bias.to(dtype)
    with torch.no_grad():
        out = adapter.bypass(x.to(dtype), lambda v: spec.op(v, w, b), strength, spec)
    assert out.dtype == dtype
    err = rel_err(out.float(), merged_forward(adapter, layer, x, strength))
    assert err < 4 * DTYPE_TOL[dtype], f"{dtype} bypass off the fp32 merge by {err:.3g}"


def assert_reloads_identically(adapter, layer: nn.Module, strength: float, exported=None):
    """`exported` (default: the adapter's export) read back merges weight and bias bit-identically
    at `strength`; returns the reloaded adapter."""
    reloaded = reload(adapter.export() if exported is None else exported)
    w = layer.weight.detach()
    with torch.no_grad():
        assert torch.equal(reloaded.merge(w, strength), adapter.merge(w, strength))
        if layer.bias is not None:
            b = layer.bias.detach()
            assert torch.equal(reloaded.merge_bias(b, strength), adapter.merge_bias(b, strength))
    return reloaded


def assert_export_like_reference(adapter, ref, layer: nn.Module, strength: float = 0.8) -> None:
    """Given random factors (and a scalar, baked into the first factor), the export has the
    reference module's keys, shapes and alpha, and reloads identically."""
    randomize(adapter)
    if adapter.scalar is not None:
        with torch.no_grad():
            adapter.scalar.fill_(0.7)
    exported = adapter.export()
    ref_sd = ref.state_dict()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert float(exported["alpha"]) == float(ref_sd["alpha"])
    assert_reloads_identically(adapter, layer, strength, exported)


def assert_export_is_reference_state(adapter, ref, layer: nn.Module, strength: float = 0.7) -> None:
    """The export is the reference module's state_dict to the bit (keys, dtypes, values) and
    reloads identically."""
    exported = adapter.export()
    reference = ref.state_dict()
    assert exported.keys() == reference.keys()
    for k, v in reference.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    assert_reloads_identically(adapter, layer, strength, exported)


def assert_merged_like_reference(adapter, ref, layer: nn.Module) -> None:
    """At strength 1 the merged layer gives the reference module's forward output, and the merged
    weight its `get_merged_weight`."""
    x = sample_input(layer)
    assert rel_err(merged_forward(adapter, layer, x), reference_forward(ref, x)) < 1e-5
    with torch.no_grad():
        ref_weight = ref.get_merged_weight(1.0)[0]
    assert rel_err(adapter.merge(layer.weight.detach(), 1.0), ref_weight) < 1e-6


def assert_rotates_rows(adapter, w: torch.Tensor) -> None:
    """At strength 1 the weight is really changed, by a rotation of its rows: that keeps every
    column's norm (and so the Frobenius norm)."""
    merged = adapter.merge(w, 1.0)
    assert rel_err(merged, w) > 1e-2  # really rotated
    cols = w.reshape(w.shape[0], -1).norm(dim=0)
    assert rel_err(merged.reshape(w.shape[0], -1).norm(dim=0), cols) < 1e-6
    assert abs(float(merged.norm() / w.norm()) - 1) < 1e-6


def assert_flat_rescale_reads_alike(adapter, ref, layer: nn.Module):
    """The reference's tensors with `rescale` stored flat, `(O,)` as in Feb 2024 files, read as an
    adapter that merges like `adapter`; returns that adapter."""
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    old = reload(dict(sd, rescale=sd["rescale"].reshape(-1)))
    w = layer.weight.detach()
    assert rel_err(old.merge(w, 1.0), adapter.merge(w, 1.0)) < 1e-7
    return old


def assert_trainable(adapter, layer: nn.Module, x: torch.Tensor, *, atol: float = 0.0,
                     through_merge: bool = True, each: bool = False) -> list[nn.Parameter]:
    """A freshly created adapter changes nothing and learns: merge gives the weight back within
    `atol` (0: bit-identical) and the bias unchanged, bypass the layer's own output (same `atol`),
    every parameter is trainable, and a loss on the bypass output (plus, `through_merge`, on the
    merged weight) gives a non-zero gradient to at least one of them (`each`: a finite non-zero
    one to every one). Returns the parameters."""
    w = layer.weight.detach()
    assert torch.allclose(adapter.merge(w, 1.0), w, rtol=0, atol=atol), "merge changes the weight at init"
    if layer.bias is not None:
        b = layer.bias.detach()
        assert torch.equal(adapter.merge_bias(b, 1.0), b), "merge changes the bias at init"
    out = adapter.bypass(x, layer.forward, 1.0, layer)
    with torch.no_grad():
        assert torch.allclose(out, layer(x), rtol=0, atol=atol), "bypass changes the output at init"
    loss = out.square().sum()
    if through_merge:
        loss = loss + adapter.merge(w, 1.0).square().sum()
    loss.backward()
    params = list(adapter.parameters())
    assert params and all(p.requires_grad for p in params)
    if each:
        for p in params:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    else:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    return params


def lycoris_applied(path: str, model: nn.Module, prefix: str = "lora_unet"):
    """(a copy of `model` with the file applied by lycoris-lora's own loader, its network): names
    are read with `prefix` as lycoris-lora's LoRA prefix."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    ref_model = copy.deepcopy(model)
    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        network, _ = create_lycoris_from_weights(1.0, path, ref_model)
    finally:
        LycorisNetwork.LORA_PREFIX = saved
    network.apply_to()
    return ref_model, network
