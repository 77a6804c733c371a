"""LoHa: dW = gamma * (w1a @ w1b) ⊙ (w2a @ w2b), for Linear and ConvNd (flattened or Tucker)."""
from __future__ import annotations

import math

import torch

from ..layer import LayerSpec
from .base import FP32, Adapter
from .ops import check_dim, dora_in_dim, product_bound, require, reshape_to, tucker
from .registry import register

# (a, b, core) attribute names of the two Hadamard factors
PAIRS = (("w1a", "w1b", "t1"), ("w2a", "w2b", "t2"))
# merge through the Khatri-Rao product (one GEMM with K = r1 * r2) up to this K; above it, two
# rank-r GEMMs per row chunk and a fused multiply-add are cheaper
KHATRI_RAO_MAX = 32


def _khatri_rao_factors(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A1 ⊙r A2, B1 ⊙c B2): row-wise and column-wise Khatri-Rao products of the factors."""
    a1, a2, b1, b2 = p["A1"], p["A2"], p["B1"], p["B2"]
    ka = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    kb = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return ka, kb


@register
class LoHa(Adapter):
    algo = "loha"
    keys = {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
            "hada_t1": "t1", "hada_t2": "t2"}
    first_factor = "w1a"
    supports_dora = True
    row_block = 1  # every output row of dW needs only the same rows of the `_a` factors

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        shapes = []
        for j, (a_attr, b_attr, t_attr) in enumerate(PAIRS, 1):
            a = require(tensors, f"hada_w{j}_a", name=name, file=file)
            b = require(tensors, f"hada_w{j}_b", name=name, file=file)
            t = tensors.get(f"hada_t{j}")
            key = f"{name}.hada_w{j}_a"
            if t is None:
                check_dim(a.shape[1] if a.ndim > 1 else -1, b.shape[0],
                          f"rank of hada_w{j}_a (dim 1) vs hada_w{j}_b (dim 0)", file=file, key=key)
            else:  # Tucker: a is r x O, b is r x I, core r x r x k...
                check_dim(t.shape[0], a.shape[0], f"hada_t{j} dim 0 vs hada_w{j}_a rows",
                          file=file, key=f"{name}.hada_t{j}")
                check_dim(t.shape[1], b.shape[0], f"hada_t{j} dim 1 vs hada_w{j}_b rows",
                          file=file, key=f"{name}.hada_t{j}")
            for attr, value in ((a_attr, a), (b_attr, b), (t_attr, t)):
                self.set_tensor(attr, value)
            shapes.append(self._product_shape(j - 1))
        check_dim(shapes[1][0], shapes[0][0], "output size of the second product vs the first",
                  file=file, key=f"{name}.hada_w2_a")
        check_dim(math.prod(shapes[1][1:]), math.prod(shapes[0][1:]),
                  "row width of the second product vs the first", file=file, key=f"{name}.hada_w2_b")
        self.alpha = None
        shape = self.target_shape
        self.load_dora(tensors, shape[0], dora_in_dim(shape, tensors.get("dora_scale")))
        return self

    def _product_shape(self, j: int) -> tuple[int, ...]:
        a, b, t = (getattr(self, attr) for attr in PAIRS[j])
        if t is not None:
            return (a.shape[1], b.shape[1], *t.shape[2:])
        return (a.shape[0], *b.shape[1:])

    @property
    def rank(self):
        return self.w1b.shape[0]

    @property
    def target_shape(self):
        # a flattened conv factor gives (O, I*K); the base accepts it for any O x I x k... weight
        return max(self._product_shape(0), self._product_shape(1), key=len)

    def prepare(self, device, dtype):
        p = super().prepare(device, dtype)
        for j, (a, b, t) in enumerate(PAIRS, 1):
            if t in p:  # fold the core into b: (r, I, k...), and use a (r x O) transposed
                eye = torch.eye(p[t].shape[0], device=device, dtype=FP32)
                p[f"A{j}"] = p[a].t()
                p[f"B{j}"] = tucker(p[t], eye, p[b]).reshape(p[t].shape[0], -1)
            else:
                p[f"A{j}"] = p[a].reshape(p[a].shape[0], -1)
                p[f"B{j}"] = p[b].reshape(p[b].shape[0], -1)
        p["A1"] = p["A1"] * self.scale
        return p

    def diff_bound(self, weight_absmax):
        p = self.prepare(self.w1a.device, FP32)
        return product_bound(p["A1"], p["B1"]) * product_bound(p["A2"], p["B2"])

    def _delta(self, p: dict, rows: slice | None) -> torch.Tensor:
        """Rows of the flattened dW (O x I*K), in the dtype of `p`."""
        a1, a2 = (p["A1"], p["A2"]) if rows is None else (p["A1"][rows], p["A2"][rows])
        return (a1 @ p["B1"]) * (a2 @ p["B2"])

    def diff(self, weight, rows, p):
        return reshape_to(self._delta(p, rows), tuple(weight.shape), file=self.file, key=self.name)

    @property
    def chunk_factor(self):  # the Khatri-Rao form needs no temporaries: larger chunks
        return 4 if self._khatri_rao() and self.dora_scale is None else 1

    def _khatri_rao(self) -> bool:
        inner = [(t if t is not None else b).shape[0]
                 for b, t in ((self.w1b, self.t1), (self.w2b, self.t2))]
        return inner[0] * inner[1] <= KHATRI_RAO_MAX

    def prepare_merge(self, p, strength):
        if self._khatri_rao() and "_kr" not in p:
            p["_kr"] = _khatri_rao_factors(p)

    def add_delta(self, w, rows, p, alpha, dest):
        w2, d2 = w.reshape(w.shape[0], -1), dest.reshape(dest.shape[0], -1)
        if self._khatri_rao():
            # (A1 B1) ⊙ (A2 B2) = (A1 ⊙r A2)(B1 ⊙c B2): one in-place addmm with K = r1 * r2
            kr = p.get("_kr") or _khatri_rao_factors(p)
            if d2.data_ptr() == w2.data_ptr():
                d2.addmm_(kr[0][rows], kr[1], alpha=alpha)
            else:
                torch.addmm(w2, kr[0][rows], kr[1], alpha=alpha, out=d2)
            return
        # one fused multiply-add into the destination instead of a temporary dW block
        first = p["A1"][rows] @ p["B1"]
        second = p["A2"][rows] @ p["B2"]
        torch.addcmul(w2, first, second, value=alpha, out=d2)

    def delta_forward(self, x, layer: LayerSpec, p):
        # no cheaper exact path exists for a Hadamard product: build dW once, in x's dtype
        d = reshape_to(self._delta(p, None), layer.weight_shape, file=self.file, key=self.name)
        return layer.op(x, d)

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, alpha: float | None = None, *,
               use_tucker: bool = False, dora: str | None = None, use_scalar: bool = False,
               dtype: torch.dtype = FP32) -> "LoHa":
        """A trainable LoHa with LyCORIS init (w2a = 0, so dW = 0 at step 0)."""
        self = cls()
        out_dim, in_dim, *kernel = layer.weight_shape
        tucker_conv = use_tucker and any(k > 1 for k in kernel)
        for j, (a, b, t) in enumerate(PAIRS, 1):
            if tucker_conv:
                self.set_tensor(t, torch.randn(rank, rank, *kernel, dtype=dtype) * 0.1, True)
                a_shape, b_shape = (rank, out_dim), (rank, in_dim)
            else:
                setattr(self, t, None)
                a_shape, b_shape = (out_dim, rank), (rank, in_dim * math.prod(kernel))
            self.set_tensor(b, torch.randn(b_shape, dtype=dtype), True)
            # the second `a` starts at zero; with a scalar, the scalar (0) does that job instead
            zero = j == 2 and not use_scalar
            init = torch.zeros(a_shape, dtype=dtype) if zero else torch.randn(a_shape, dtype=dtype) * 0.1
            self.set_tensor(a, init, True)
        if use_scalar:
            self.scalar = torch.nn.Parameter(torch.zeros((), dtype=FP32))
        self.alpha = float(rank if alpha in (None, 0) else alpha)
        if dora:
            self.init_dora(layer.dense_weight(), dora)
        return self
