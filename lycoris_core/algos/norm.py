"""Norm layers (`train_norm`): additive deltas on a LayerNorm/GroupNorm/RMSNorm scale and shift.

gamma' = gamma + m * w_norm, beta' = beta + m * b_norm. `merge` patches the 1-d scale, `merge_bias`
the shift; bypass adds m * (n(x) * w_norm + b_norm), n(x) being the normalised input before affine.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import LycorisError, LycorisShapeError
from ..layer import LayerSpec
from .base import FP32, Adapter
from .ops import abs_max, check_dim
from .registry import register


def normalized(x: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """The norm layer's output without its affine part (what the scale multiplies)."""
    if layer.kind != "norm":
        raise LycorisError(f"expected a norm layer, not {layer.kind!r}")
    if layer.norm_type == "group":
        return F.group_norm(x, layer.num_groups, eps=layer.eps)
    if layer.norm_type == "rms":
        return F.rms_norm(x, layer.weight_shape, eps=layer.eps)
    return F.layer_norm(x, layer.weight_shape, eps=layer.eps)


def norm_view(vec: torch.Tensor, layer: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """Shape a scale/shift like the norm layer's own weight broadcasts over x."""
    if layer.norm_type == "group":
        return vec.reshape((1, -1) + (1,) * (x.ndim - 2))
    return vec.reshape(layer.weight_shape)


def add_bias_delta(bias: torch.Tensor | None, delta: torch.Tensor | None, strength: float, *,
                   file: str | None, key: str) -> torch.Tensor | None:
    """bias + m * delta in fp32, returned in the bias dtype; a layer without bias gets m * delta."""
    if delta is None or strength == 0:
        return bias
    if bias is None:
        return strength * delta.to(FP32)
    if bias.numel() != delta.numel():
        raise LycorisShapeError(f"bias delta has {delta.numel()} entries but the layer's bias has "
                                f"{bias.numel()}", file=file, key=key)
    new = bias.to(FP32) + strength * delta.to(device=bias.device, dtype=FP32).reshape(bias.shape)
    return new.to(bias.dtype)


@register
class Norm(Adapter):
    algo = "norm"
    keys = {"w_norm": "w_norm", "b_norm": "b_norm"}
    uses_alpha = False
    row_block = 0  # norm weights are tiny (and may be multi-dim for LayerNorm): merge at once

    def __init__(self) -> None:
        super().__init__()
        self.w_norm: torch.nn.Parameter | None = None
        self.b_norm: torch.nn.Parameter | None = None

    @classmethod
    def claims(cls, shapes):
        return "w_norm" in shapes or "b_norm" in shapes

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        w, b = tensors.get("w_norm"), tensors.get("b_norm")
        for suffix, t in (("w_norm", w), ("b_norm", b)):
            if t is not None and t.ndim != 1:
                raise LycorisShapeError(f"{suffix} must be 1-d, found shape {list(t.shape)}",
                                        file=file, key=f"{name}.{suffix}")
        if w is not None and b is not None:
            check_dim(b.numel(), w.numel(), "length of b_norm vs w_norm", file=file,
                      key=f"{name}.b_norm")
        self.set_tensor("w_norm", w)
        self.set_tensor("b_norm", b)
        return self

    @property
    def channels(self) -> int:
        return (self.w_norm if self.w_norm is not None else self.b_norm).numel()

    @property
    def target_shape(self):
        return (self.channels,)

    def check_target(self, shape):
        if math.prod(shape) != self.channels:
            raise LycorisShapeError(
                f"norm adapter has {self.channels} channels but the layer's weight has shape "
                f"{list(shape)} (file made for another model?)", file=self.file, key=self.name)

    def diff(self, weight, rows, p):
        if "w_norm" not in p:
            return torch.zeros_like(weight)
        d = p["w_norm"].reshape(-1)
        return (d if rows is None else d[rows]).reshape(weight.shape)

    def diff_bound(self, weight_absmax):
        return 0.0 if self.w_norm is None else abs_max(self.w_norm)

    def merge_bias(self, bias, strength=1.0):
        return add_bias_delta(bias, self.b_norm, strength, file=self.file, key=f"{self.name}.b_norm")

    def delta_forward(self, x, layer, p):
        """n(x) * w_norm + b_norm: the change of the norm output per unit strength."""
        n = normalized(x, layer)
        out = torch.zeros_like(n) if "w_norm" not in p else n * norm_view(p["w_norm"], layer, n)
        if "b_norm" in p:
            out = out + norm_view(p["b_norm"], layer, n)
        return out

    @classmethod
    def create(cls, layer: LayerSpec, *, dtype: torch.dtype = FP32) -> "Norm":
        """Trainable zero deltas (LyCORIS init), b_norm only when the layer has a bias."""
        if layer.kind != "norm":
            raise LycorisError(f"the norm algorithm needs a LayerNorm/GroupNorm/RMSNorm, not "
                               f"{layer.kind!r}")
        self = cls()
        channels = math.prod(layer.weight_shape)
        self.set_tensor("w_norm", torch.zeros(channels, dtype=dtype), True)
        if layer.bias is not None:
            self.set_tensor("b_norm", torch.zeros(channels, dtype=dtype), True)
        return self

    def extra_repr(self) -> str:
        return f"norm {self.name} channels={self.channels} bias={self.b_norm is not None}"
