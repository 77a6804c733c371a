"""Layers whose stored weight is not the weight they compute with (scaled fp8, GGUF, ...):
`LayerSpec.dequantise` gives the dense weight to every adapter path that reads W."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lycoris_core import REGISTRY, LayerSpec
from oracle import rel_err

SCALE = 0.01  # far from 1: reading the stored values instead would be off by ~100x


def quantised_linear(seed: int = 0, shape=(48, 32)):
    """(layer spec with fp8 storage + dequantiser, the dense fp32 weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    stored = (torch.randn(shape, generator=g) * 20).to(torch.float8_e4m3fn)
    dense = stored.float() * SCALE
    bias = torch.randn(shape[0], generator=g)
    layer = LayerSpec("linear", shape, weight=stored, bias=bias,
                      dequantise=lambda device: stored.to(device=device, dtype=torch.float32) * SCALE)
    return layer, dense, bias


def randomised(adapter, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return adapter.requires_grad_(False)


@pytest.mark.parametrize("algo,dora", [("lora", "out"), ("lora", "in"), ("loha", "out"), ("lokr", "in")])
def test_dora_bypass_uses_the_dequantised_weight(algo, dora):
    layer, dense, bias = quantised_linear()
    adapter = randomised(REGISTRY[algo].create(layer, rank=4, dora=dora), 1)
    x = torch.randn(3, 32)
    for m in (1.0, 0.6):
        got = adapter.bypass(x, lambda t: F.linear(t, dense, bias), m, layer)
        want = F.linear(x, adapter.merge(dense, m), bias)
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("dora", ["out", "in"])
def test_dora_init_reads_the_dequantised_norm(algo, dora):
    """W' = W at creation: the magnitude is the dense weight's norm, not the stored values'."""
    layer, dense, _ = quantised_linear(2)
    adapter = REGISTRY[algo].create(layer, rank=4, dora=dora).requires_grad_(False)
    assert rel_err(adapter.merge(dense.clone()), dense) < 1e-6


def test_set_weight_bypass_uses_the_dequantised_weight():
    layer, dense, bias = quantised_linear(3)
    new = torch.randn(dense.shape, generator=torch.Generator().manual_seed(4)) * SCALE
    adapter = REGISTRY["full"].from_tensors({"set_weight": new}, name="m")
    x = torch.randn(3, 32)
    got = adapter.bypass(x, lambda t: F.linear(t, dense, bias), 0.5, layer)
    assert rel_err(got, F.linear(x, dense + 0.5 * (new - dense), bias)) < 1e-5
