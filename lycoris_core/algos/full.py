"""Full / native fine-tuning: a dense `diff` (and bias `diff_b`), or ComfyUI's `set_weight`.

`diff`: W' = W + m * diff. `set_weight` (ComfyUI only) replaces the weight; to keep strength affine
we interpolate towards it, W' = W + m * (S - W), so m = 1 gives S (ComfyUI ignores strength there).
`diff_b`: b' = b + m * diff_b. Bypass is exact but dense: y + m * op(x, D) + m * diff_b.
"""
from __future__ import annotations

import torch

from ..errors import LycorisError, LycorisShapeError
from ..layer import LayerSpec
from .base import FP32, Adapter
from .norm import add_bias_delta, norm_view, normalized
from .ops import abs_max
from .registry import register


@register
class Full(Adapter):
    algo = "full"
    keys = {"diff": "diff_w", "diff_b": "diff_b", "set_weight": "set_weight"}
    uses_alpha = False
    row_block = 1

    def __init__(self) -> None:
        super().__init__()
        self.diff_w: torch.nn.Parameter | None = None
        self.diff_b: torch.nn.Parameter | None = None
        self.set_weight: torch.nn.Parameter | None = None

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        diff, diff_b, new = tensors.get("diff"), tensors.get("diff_b"), tensors.get("set_weight")
        if diff is not None and new is not None:
            raise LycorisError("both diff and set_weight: a module either adds to or replaces its "
                               "weight", file=file, key=f"{name}.set_weight")
        dense = diff if diff is not None else new
        if dense is not None and dense.ndim == 0:
            raise LycorisShapeError("a weight patch cannot be 0-d", file=file,
                                    key=f"{name}.{'diff' if diff is not None else 'set_weight'}")
        if diff_b is not None:
            if diff_b.ndim != 1:
                raise LycorisShapeError(f"diff_b must be 1-d, found shape {list(diff_b.shape)}",
                                        file=file, key=f"{name}.diff_b")
            if dense is not None and dense.ndim > 1 and diff_b.numel() != dense.shape[0]:
                raise LycorisShapeError(f"diff_b has {diff_b.numel()} entries but the weight patch has "
                                        f"{dense.shape[0]} output rows", file=file, key=f"{name}.diff_b")
        self.set_tensor("diff_w", diff)  # `diff` is the Adapter method; the tensor is `diff_w`
        self.set_tensor("diff_b", diff_b)
        self.set_tensor("set_weight", new)
        return self

    @property
    def dense(self) -> torch.Tensor | None:
        return self.diff_w if self.diff_w is not None else self.set_weight

    @property
    def depends_on_weight(self) -> bool:
        return self.set_weight is not None or super().depends_on_weight  # set_weight: S - W

    @property
    def target_shape(self):
        return None if self.dense is None else tuple(self.dense.shape)

    def prepare(self, device, dtype):
        p = {}
        for key, t in (("diff", self.diff_w), ("diff_b", self.diff_b), ("set_weight", self.set_weight)):
            if t is not None:
                p[key] = t.to(device=device, dtype=FP32)
        return p

    def diff_bound(self, weight_absmax):
        if self.diff_w is not None:
            return abs_max(self.diff_w)
        if self.set_weight is None:
            return 0.0  # only a bias change
        return None if weight_absmax is None else abs_max(self.set_weight) + weight_absmax  # S - W

    def diff(self, weight, rows, p):
        if "diff" in p:
            d = p["diff"] if rows is None else p["diff"][rows]
            return d.reshape(weight.shape)
        if "set_weight" in p:
            s = p["set_weight"] if rows is None else p["set_weight"][rows]
            return s.reshape(weight.shape) - weight
        return torch.zeros_like(weight)

    def merge_bias(self, bias, strength=1.0):
        return add_bias_delta(bias, self.diff_b, strength, file=self.file, key=f"{self.name}.diff_b")

    def delta_forward(self, x, layer: LayerSpec, p):
        """op(x, D) for the dense weight change D (no bias); norm layers: n(x) * D."""
        if "diff" in p:
            d = p["diff"].reshape(layer.weight_shape)
        else:
            if layer.weight is None:
                raise LycorisError("set_weight bypass needs the layer's weight", file=self.file,
                                   key=f"{self.name}.set_weight")
            s = self._prepared(x.device, FP32)["set_weight"]
            w = layer.dense_weight(x.device)
            d = (s.reshape(w.shape) - w).to(x.dtype)
        if layer.kind == "norm":
            n = normalized(x, layer)
            return n * norm_view(d, layer, n)
        return layer.op(x, d)

    def bypass_plain(self, x, y, strength, layer, p):
        out = y
        if self.dense is not None:
            out = out + strength * self.delta_forward(x, layer, p)
        if "diff_b" in p:
            b = p["diff_b"].to(y.dtype)
            view = norm_view(b, layer, y) if layer.kind == "norm" else layer.channel_view(b, y)
            out = out + strength * view
        return out

    @classmethod
    def create(cls, layer: LayerSpec, *, dtype: torch.dtype = FP32) -> "Full":
        """Trainable zero `diff` (and `diff_b` when the layer has a bias), as LyCORIS saves them."""
        self = cls()
        self.set_tensor("diff_w", torch.zeros(layer.weight_shape, dtype=dtype), True)
        if layer.bias is not None:
            self.set_tensor("diff_b", torch.zeros(tuple(layer.bias.shape), dtype=dtype), True)
        return self

    def extra_repr(self) -> str:
        kind = "diff" if self.diff_w is not None else "set_weight" if self.set_weight is not None else "-"
        return f"full {self.name} {kind} shape={self.target_shape} bias={self.diff_b is not None}"
