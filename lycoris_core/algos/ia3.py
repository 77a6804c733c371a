"""(IA)^3: a learned per-channel scale, W' = W * (1 + m * w), on output rows or input columns."""
from __future__ import annotations

import torch

from ..errors import LycorisError, LycorisShapeError
from ..layer import LayerSpec
from .base import FP32, Adapter, scalar_value
from .ops import abs_max, require
from .registry import register


@register
class IA3(Adapter):
    algo = "ia3"
    # `on_input` is a flag, not a factor; listed so key grouping knows the suffix
    keys = {"weight": "w", "on_input": "on_input"}
    flags = frozenset({"on_input"})
    uses_alpha = False
    row_block = 1

    def __init__(self) -> None:
        super().__init__()
        self.w: torch.nn.Parameter | None = None
        self.on_input = False

    @classmethod
    def claims(cls, shapes):
        # `weight` alone is far too generic a suffix; the flag is what identifies (IA)^3
        return "weight" in shapes and "on_input" in shapes

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        w = require(tensors, "weight", name=name, file=file)
        flag = scalar_value(require(tensors, "on_input", name=name, file=file),
                            file=file, key=f"{name}.on_input")
        if flag not in (0.0, 1.0):
            raise LycorisError(f"on_input must be 0 or 1, found {flag}", file=file,
                               key=f"{name}.on_input")
        if not w.is_floating_point():
            raise LycorisError(f"weight must be a float tensor, found {w.dtype}", file=file,
                               key=f"{name}.weight")
        if w.ndim == 0 or sum(s != 1 for s in w.shape) > 1 or (w.ndim > 1 and w.shape[0] != 1):
            raise LycorisShapeError(
                f"(IA)^3 weight must be a vector (C,) or 1xCx1..., found shape {list(w.shape)}",
                file=file, key=f"{name}.weight")
        self.on_input = bool(flag)
        self.set_tensor("w", w)
        return self

    @property
    def depends_on_weight(self) -> bool:
        return True  # W * w

    @property
    def channels(self) -> int:
        return self.w.numel()

    def check_target(self, shape):
        shape = tuple(shape)
        axis = 1 if self.on_input else 0
        side = "input" if self.on_input else "output"
        if len(shape) < 2 or shape[axis] != self.channels:
            have = shape[axis] if len(shape) >= 2 else None
            raise LycorisShapeError(
                f"(IA)^3 vector has {self.channels} entries but the layer's weight {list(shape)} has "
                f"{have} {side} channels (file made for another model?)",
                file=self.file, key=f"{self.name}.weight")

    def prepare(self, device, dtype):
        return {"w": self.w.reshape(-1).to(device=device, dtype=FP32)}

    def diff_bound(self, weight_absmax):
        return None if weight_absmax is None else abs_max(self.w) * weight_absmax

    def _view(self, vec: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = -1
        return vec.reshape(shape)

    def diff(self, weight, rows, p):
        w = p["w"]
        if self.on_input:
            return weight * self._view(w, weight.ndim, 1)
        w = w if rows is None else w[rows]
        return weight * self._view(w, weight.ndim, 0)

    def bypass(self, x, base_forward, strength=1.0, layer=None):
        """Input side: f(x * (1 + m*w)). Output side: y + m * w * (y - b), so the bias is left
        alone exactly as in the merged weight."""
        layer = self._layer(layer)
        if strength == 0:
            return base_forward(x)
        dtype = x.dtype if x.is_floating_point() else FP32
        w = self._prepared(x.device, dtype)["w"]
        if self.on_input:
            return base_forward(x * layer.channel_view(1 + strength * w, x))
        y = base_forward(x)
        wx = y if layer.bias is None else y - layer.channel_view(layer.bias.to(y.dtype), y)
        return y + strength * layer.channel_view(w.to(y.dtype), y) * wx

    @classmethod
    def create(cls, layer: LayerSpec, *, on_input: bool = False,
               dtype: torch.dtype = FP32) -> "IA3":
        """A trainable (IA)^3 with w = 0 (factor 1, so W' = W at step 0), LyCORIS shapes."""
        self = cls()
        shape = layer.weight_shape
        if layer.kind not in ("linear", "conv") or len(shape) < 2:
            raise LycorisError(f"(IA)^3 needs a Linear or conv layer, not {layer.kind!r}")
        channels = shape[1] if on_input else shape[0]
        vec_shape = (channels,) if layer.kind == "linear" else (1, channels) + (1,) * (len(shape) - 2)
        self.set_tensor("w", torch.zeros(vec_shape, dtype=dtype), True)
        self.on_input = on_input
        return self

    def export(self, dtype=None):
        w = self.w.detach()
        if dtype is not None:
            w = w.to(dtype)
        return {"weight": w.contiguous(), "on_input": torch.tensor(int(self.on_input))}

    def extra_repr(self) -> str:
        side = "input" if self.on_input else "output"
        return f"ia3 {self.name} {side} channels={self.channels}"
