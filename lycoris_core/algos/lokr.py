"""LoKr: dW = gamma * W1 ⊗ W2, each factor full or a low-rank product (W2 optionally Tucker)."""
from __future__ import annotations

import math

import torch

from ..errors import LycorisError, LycorisShapeError
from ..layer import LayerSpec
from .base import FP32, Adapter
from .ops import (abs_max, check_dim, dora_in_dim, factorization, kaiming_, require, reshape_to,
                  tucker)
from .registry import register


@register
class LoKr(Adapter):
    algo = "lokr"
    keys = {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b",
            "lokr_w2": "w2", "lokr_w2_a": "w2a", "lokr_w2_b": "w2b", "lokr_t2": "t2"}
    first_factor = "w1"  # "w1a" when W1 is split (set per instance)
    supports_dora = True

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        for attr in cls.keys.values():
            self.set_tensor(attr, None)
        self._load_w1(tensors)
        self._load_w2(tensors)
        self.row_block = self._w2_shape()[0]
        self.alpha = None
        shape = self.target_shape
        self.load_dora(tensors, shape[0], dora_in_dim(shape, tensors.get("dora_scale")))
        return self

    def _load_w1(self, tensors: dict[str, torch.Tensor]) -> None:
        name, file = self.name, self.file
        w1 = tensors.get("lokr_w1")
        if w1 is not None:
            if "lokr_w1_a" in tensors or "lokr_w1_b" in tensors:
                raise LycorisError("both lokr_w1 and lokr_w1_a/b are present", file=file, key=name)
            # legacy Tucker files stored W1 as out_l x in_m x 1 x 1: same numbers as the 2-d W1
            if w1.ndim < 2 or any(s != 1 for s in w1.shape[2:]):
                raise LycorisShapeError(f"lokr_w1 must be out_l x in_m (optionally x 1 x 1), found "
                                        f"{list(w1.shape)}", file=file, key=f"{name}.lokr_w1")
            self.set_tensor("w1", w1)
            return
        w1a = require(tensors, "lokr_w1_a", name=name, file=file)
        w1b = require(tensors, "lokr_w1_b", name=name, file=file)
        if w1a.ndim != 2 or w1b.ndim != 2:
            raise LycorisShapeError("lokr_w1_a and lokr_w1_b must be 2-d", file=file,
                                    key=f"{name}.lokr_w1_a")
        check_dim(w1a.shape[1], w1b.shape[0], "rank of lokr_w1_a (dim 1) vs lokr_w1_b (dim 0)",
                  file=file, key=f"{name}.lokr_w1_a")
        self.set_tensor("w1a", w1a)
        self.set_tensor("w1b", w1b)
        self.first_factor = "w1a"

    def _load_w2(self, tensors: dict[str, torch.Tensor]) -> None:
        name, file = self.name, self.file
        w2, t2 = tensors.get("lokr_w2"), tensors.get("lokr_t2")
        if w2 is not None:
            extra = [s for s in ("lokr_w2_a", "lokr_w2_b", "lokr_t2") if s in tensors]
            if extra:
                raise LycorisError(f"lokr_w2 together with {', '.join(extra)}", file=file, key=name)
            self.set_tensor("w2", w2)
            return
        w2a = require(tensors, "lokr_w2_a", name=name, file=file)
        w2b = require(tensors, "lokr_w2_b", name=name, file=file)
        if w2a.ndim != 2:
            raise LycorisShapeError(f"lokr_w2_a must be 2-d, found {list(w2a.shape)}", file=file,
                                    key=f"{name}.lokr_w2_a")
        if t2 is None:
            check_dim(w2a.shape[1], w2b.shape[0], "rank of lokr_w2_a (dim 1) vs lokr_w2_b (dim 0)",
                      file=file, key=f"{name}.lokr_w2_a")
        else:  # Tucker: w2_a is r x out_k, w2_b is r x in_n, core r x r x k...
            check_dim(t2.shape[0], w2a.shape[0], "lokr_t2 dim 0 vs lokr_w2_a rows", file=file,
                      key=f"{name}.lokr_t2")
            check_dim(t2.shape[1], w2b.shape[0], "lokr_t2 dim 1 vs lokr_w2_b rows", file=file,
                      key=f"{name}.lokr_t2")
        for attr, t in (("w2a", w2a), ("w2b", w2b), ("t2", t2)):
            self.set_tensor(attr, t)

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return tuple(self.w1.shape[:2])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        return (self.w2a.shape[0], *self.w2b.shape[1:])

    @property
    def rank(self):
        if self.w2b is not None:
            return self.w2b.shape[0]
        if self.w1b is not None:
            return self.w1b.shape[0]
        return None  # both factors full: alpha plays no role (LyCORIS writes alpha = dim)

    def alpha_matters(self):
        return self.rank is not None

    @property
    def target_shape(self):
        (out_l, in_m), (out_k, width, *kernel) = self._w1_shape(), self._w2_shape()
        return (out_l * out_k, in_m * width, *kernel)

    def prepare(self, device, dtype):
        p = super().prepare(device, dtype)
        w1 = p["w1"] if "w1" in p else p["w1a"] @ p["w1b"]
        p["W1"] = w1.reshape(self._w1_shape()) * self.scale
        if "w2" in p:
            w2 = p["w2"]
        elif "t2" in p:
            w2 = tucker(p["t2"], p["w2a"].t(), p["w2b"])
        else:
            w2 = (p["w2a"] @ p["w2b"].reshape(p["w2b"].shape[0], -1)).reshape(self._w2_shape())
        p["W2"] = w2.contiguous()  # torch.kron needs a viewable layout (einsum output may not be)
        return p

    def diff_bound(self, weight_absmax):
        p = self.prepare(next(self.parameters()).device, FP32)
        return abs_max(p["W1"]) * abs_max(p["W2"])  # max |W1 ⊗ W2|, exactly

    def diff(self, weight, rows, p):
        w1, w2 = p["W1"], p["W2"]
        out_k = w2.shape[0]
        # only the rows of W1 whose Kronecker block overlaps the requested rows
        start, stop, _ = (slice(None) if rows is None else rows).indices(w1.shape[0] * out_k)
        i0, i1 = start // out_k, -(-stop // out_k)
        part = w1[i0:i1]
        block = torch.kron(part.reshape(part.shape + (1,) * (w2.ndim - 2)), w2)
        block = block[start - i0 * out_k: stop - i0 * out_k]
        return reshape_to(block, tuple(weight.shape), file=self.file, key=self.name)

    @property
    def chunk_factor(self):  # one broadcast multiply-add, no temporaries: larger chunks
        return 1 if self.dora_scale is not None else 4

    def add_delta(self, w, rows, p, alpha, dest):
        # W1 ⊗ W2 never built: with the rows viewed as (out_l, out_k) and the flattened columns as
        # (in_m, in_n * k...), the block is a broadcast product, fused into one multiply-add
        w1, w2 = p["W1"], p["W2"]
        in_m, out_k = w1.shape[1], w2.shape[0]
        width = w2[0].numel()
        n = w.shape[0]
        if (rows.start % out_k or n % out_k or w[0].numel() != in_m * width
                or dest.shape != w.shape):
            return super().add_delta(w, rows, p, alpha, dest)  # unaligned rows: build the block
        i0 = rows.start // out_k
        shape = (n // out_k, out_k, in_m, width)
        a = w1[i0:i0 + n // out_k].reshape(n // out_k, 1, in_m, 1)
        b = w2.reshape(1, out_k, 1, width)
        torch.addcmul(w.reshape(shape), a, b, value=alpha, out=dest.view(shape))

    def delta_forward(self, x, layer: LayerSpec, p):
        # dW x without the Kronecker product: view the input as in_m x in_n, apply W2 to the
        # fine index and W1 to the coarse one (y = vec(W1 X W2^T), with convs for W2 on a conv)
        w1, w2 = p["W1"], p["W2"]
        (out_l, in_m), out_k = w1.shape, w2.shape[0]
        out_dim, in_dim, *kernel = layer.weight_shape
        in_n, rest = divmod(in_dim, in_m)
        fits = (rest == 0 and out_l * out_k == out_dim
                and w2.numel() == out_k * in_n * math.prod(kernel))
        if layer.kind == "linear" and fits:
            xs = x.reshape(*x.shape[:-1], in_m, in_n)
            y = w1 @ (xs @ w2.reshape(out_k, in_n).t())
            return y.reshape(*x.shape[:-1], out_dim)
        if layer.kind == "conv" and layer.groups == 1 and fits:
            batched = x.ndim == layer.conv_dim + 2
            xb = x if batched else x.unsqueeze(0)
            n = xb.shape[0]
            h = layer.op(xb.reshape(n * in_m, in_n, *xb.shape[2:]), w2.reshape(out_k, in_n, *kernel))
            spatial = h.shape[2:]
            y = (w1 @ h.reshape(n, in_m, -1)).reshape(n, out_dim, *spatial)
            return y if batched else y.squeeze(0)
        return super().delta_forward(x, layer, p)  # unusual layouts: dense dW

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, alpha: float | None = None, *,
               factor: int = -1, decompose_both: bool = False, use_tucker: bool = False,
               full_matrix: bool = False, unbalanced_factorization: bool = False,
               dora: str | None = None, use_scalar: bool = False,
               dtype: torch.dtype = FP32) -> "LoKr":
        """A trainable LoKr with LyCORIS shapes and init (W2 or w2_b = 0, so dW = 0 at step 0)."""
        self = cls()
        for attr in cls.keys.values():
            self.set_tensor(attr, None)
        out_dim, in_dim, *kernel = layer.weight_shape
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(out_dim, factor)
        if unbalanced_factorization:
            out_l, out_k = out_k, out_l

        def param(attr: str, *shape: int, zero: bool = False) -> None:
            t = torch.empty(shape, dtype=dtype)
            self.set_tensor(attr, t.zero_() if zero else kaiming_(t), True)

        split_w1 = decompose_both and not full_matrix and rank < max(out_l, in_m) / 2
        if split_w1:
            param("w1a", out_l, rank)
            param("w1b", rank, in_m)
            self.first_factor = "w1a"
        else:
            param("w1", out_l, in_m)
        # the zero factor makes dW = 0; with a scalar, the scalar (0) does that job instead
        if full_matrix or rank >= max(out_k, in_n) / 2:
            param("w2", out_k, in_n, *kernel, zero=not use_scalar)
        elif use_tucker and any(k > 1 for k in kernel):
            param("t2", rank, rank, *kernel)
            param("w2a", rank, out_k)
            param("w2b", rank, in_n, zero=not use_scalar)
        else:
            param("w2a", out_k, rank)
            param("w2b", rank, in_n * math.prod(kernel), zero=not use_scalar)
        self.row_block = out_k
        if use_scalar:
            self.scalar = torch.nn.Parameter(torch.zeros((), dtype=FP32))
        # both factors full: LyCORIS stores alpha = rank (scale 1)
        self.alpha = float(rank if alpha in (None, 0) or self.rank is None else alpha)
        if dora:
            self.init_dora(layer.dense_weight(), dora)
        return self
