"""Helpers for checking our algorithms against the reference library (lycoris-lora) as an oracle."""
from __future__ import annotations

import torch
from torch import nn

from lycoris_core import LayerSpec, load_file

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


def to_adapter(lyco_module, name: str = "lora_unet_test"):
    """Save the reference module with its own state_dict, load with our reader."""
    sd = {f"{name}.{k}": v.detach().clone() for k, v in lyco_module.state_dict().items()}
    return load_file(sd, strict=True)[name]


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
