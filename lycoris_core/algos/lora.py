"""LoRA / LoCon: dW = gamma * up @ (mid) @ down, for Linear and ConvNd (plain or Tucker)."""
from __future__ import annotations

import torch

from ..layer import LayerSpec
from .base import FP32, Adapter
from .ops import check_dim, kaiming_, product_bound, require, tucker
from .registry import register


@register
class LoRA(Adapter):
    algo = "lora"
    keys = {"lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid"}
    first_factor = "up"
    supports_dora = True

    @classmethod
    def claims(cls, shapes):
        return "lora_up.weight" in shapes and "lora_down.weight" in shapes

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        up = require(tensors, "lora_up.weight", name=name, file=file)
        down = require(tensors, "lora_down.weight", name=name, file=file)
        mid = tensors.get("lora_mid.weight")
        rank = down.shape[0]
        check_dim(up.shape[1] if up.ndim > 1 else -1, rank,
                  "rank of lora_up (dim 1) vs lora_down (dim 0)", file=file, key=f"{name}.lora_up.weight")
        if mid is not None:
            check_dim(mid.shape[0], rank, "lora_mid rank", file=file, key=f"{name}.lora_mid.weight")
            check_dim(mid.shape[1], rank, "lora_mid rank", file=file, key=f"{name}.lora_mid.weight")
        for attr, t in (("up", up), ("down", down), ("mid", mid)):
            self.set_tensor(attr, t)
        self.alpha = None
        out_dim = up.shape[0]
        in_dim = down.shape[1]
        self.load_dora(tensors, out_dim, in_dim)
        return self

    @property
    def rank(self):
        return self.down.shape[0]

    @property
    def target_shape(self):
        out_dim, in_dim = self.up.shape[0], self.down.shape[1]
        if self.mid is not None:
            return (out_dim, in_dim) + tuple(self.mid.shape[2:])
        if self.down.ndim > 2:
            return (out_dim, in_dim) + tuple(self.down.shape[2:])
        return None if self.up.ndim > 2 else (out_dim, in_dim)

    def prepare(self, device, dtype):
        p = super().prepare(device, dtype)
        up = p["up"].reshape(p["up"].shape[0], -1)
        if self.mid is not None:
            # fold mid into down: r x I x k..., the Tucker rebuild without the up factor
            eye = torch.eye(self.rank, device=device, dtype=FP32)
            down_full = tucker(p["mid"], eye, p["down"].reshape(self.rank, -1))
        else:
            down_full = p["down"]
        p["up_mat"] = up * self.scale
        p["down_mat"] = down_full.reshape(self.rank, -1)
        p["down_full"] = down_full
        return p

    def diff_bound(self, weight_absmax):
        p = self.prepare(self.down.device, FP32)
        return product_bound(p["up_mat"], p["down_mat"])

    def diff(self, weight, rows, p):
        up = p["up_mat"] if rows is None else p["up_mat"][rows]
        return (up @ p["down_mat"]).reshape(weight.shape)

    @property
    def chunk_factor(self):  # one in-place addmm, no temporaries: larger chunks
        return 1 if self.dora_scale is not None else 4

    @property
    def whole_fp32(self):  # without DoRA the merge is one in-place addmm
        return self.dora_scale is None

    def add_delta(self, w, rows, p, alpha, dest):
        w2, d2 = w.reshape(w.shape[0], -1), dest.reshape(dest.shape[0], -1)
        if d2.data_ptr() == w2.data_ptr():
            d2.addmm_(p["up_mat"][rows], p["down_mat"], alpha=alpha)
        else:
            torch.addmm(w2, p["up_mat"][rows], p["down_mat"], alpha=alpha, out=d2)

    def delta_forward(self, x, layer: LayerSpec, p):
        if layer.kind == "linear":
            return (x @ p["down_mat"].t()) @ p["up_mat"].t()
        if layer.groups != 1:
            return super().delta_forward(x, layer, p)
        n = layer.conv_dim
        if self.mid is not None:
            h = layer.op(x, p["down"].reshape(self.rank, -1, *([1] * n)), stride=1, padding=0,
                         dilation=1, groups=1)
            h = layer.op(h, p["mid"])
        else:
            down = p["down"]
            if down.ndim == 2:
                down = down.reshape(self.rank, -1, *layer.weight_shape[2:])
            h = layer.op(x, down)
        up = p["up_mat"].reshape(p["up_mat"].shape[0], self.rank, *([1] * n))
        return layer.op(h, up, stride=1, padding=0, dilation=1, groups=1)

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, alpha: float | None = None, *,
               use_tucker: bool = False, dora: str | None = None, use_scalar: bool = False,
               dtype: torch.dtype = FP32) -> "LoRA":
        """A trainable LoRA/LoCon with LyCORIS init (up = 0, so dW = 0 at step 0)."""
        self = cls()
        shape = layer.weight_shape
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        big_kernel = any(k > 1 for k in kernel)
        if use_tucker and big_kernel:
            self.set_tensor("down", kaiming_(torch.empty(rank, in_dim, *([1] * len(kernel)), dtype=dtype)), True)
            self.set_tensor("mid", kaiming_(torch.empty(rank, rank, *kernel, dtype=dtype)), True)
        else:
            self.set_tensor("down", kaiming_(torch.empty(rank, in_dim, *kernel, dtype=dtype)), True)
            self.mid = None
        up_shape = (out_dim, rank) + (1,) * len(kernel)
        if use_scalar:
            self.set_tensor("up", kaiming_(torch.empty(up_shape, dtype=dtype)), True)
            self.scalar = torch.nn.Parameter(torch.zeros((), dtype=FP32))
        else:
            self.set_tensor("up", torch.zeros(up_shape, dtype=dtype), True)
        self.alpha = float(rank if alpha in (None, 0) else alpha)
        if dora:
            self.init_dora(layer.dense_weight(), dora)
        return self
