"""GLoRA: dW = gamma * (W x_in (A1 A2) + B1 B2), a change that depends on the base weight W.

`x_in` multiplies W on its input-channel axis: (W x_in M)[o, j, k...] = sum_i W[o, i, k...] M[i, j].
Layouts (attributes always hold the 3.x roles):

    3.x (current):   a1 I x r, a2 r x I, b1 O x r, b2 r x I (x k...)      rank = a2.shape[0]
    <= 2.x (old):    a1 r x I, a2 I x r, b1 r x I, b2 O x r               rank = a1.shape[0]

The old layout is the 3.x one with a1<->a2 and b1<->b2 swapped (dW = gamma (B2 B1 + W A2 A1)).
When the shapes fit both (a square weight), the reading with the smaller rank wins: the other one
would have a rank larger than its own weight. A fully square file (rank = I = O) is read as 3.x,
the layout every current trainer writes (ComfyUI reads it as old). If the chosen reading does not
fit the weight it is applied to and the other one does, `check_target` switches to the other one.
"""
from __future__ import annotations

import math

import torch

from ..errors import LycorisError, LycorisShapeError
from ..layer import LayerSpec
from .base import FP32, Adapter
from .ops import kaiming_, product_bound, require
from .registry import register

NAMES = ("a1", "a2", "b1", "b2")
SWAP = {"a1": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}


def _layout_problem(a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor,
                    names: tuple[str, ...] = NAMES) -> str | None:
    """Why these tensors, read in the 3.x roles, are not a GLoRA module (None when they are).
    `names` are the file's names for the four tensors, used in the message."""
    n1, n2, m1, m2 = names
    for n, t in zip(names, (a1, a2, b1, b2)):
        if t.ndim < 2:
            return f"{n} must have at least 2 dims, found shape {list(t.shape)}"
        if t is not b2 and any(s != 1 for s in t.shape[2:]):
            return f"{n} must be a matrix or a 1x1 conv, found shape {list(t.shape)}"
    rank, in_dim = a2.shape[0], a2.shape[1]
    if a1.shape[1] != rank or b1.shape[1] != rank or b2.shape[0] != rank:
        return (f"ranks disagree: {n1} dim 1 = {a1.shape[1]}, {n2} dim 0 = {rank}, {m1} dim 1 = "
                f"{b1.shape[1]}, {m2} dim 0 = {b2.shape[0]}")
    if a1.shape[0] != in_dim:
        return f"input channels disagree: {n1} dim 0 = {a1.shape[0]}, {n2} dim 1 = {in_dim}"
    # b2 is r x I x k... (or r x I*K when flattened)
    if (b2.shape[1] != in_dim) if b2.ndim > 2 else (b2.shape[1] % in_dim != 0):
        return f"input channels disagree: {m2} dim 1 = {b2.shape[1]}, {n2} dim 1 = {in_dim}"
    return None


@register
class GLoRA(Adapter):
    algo = "glora"
    keys = {"a1.weight": "a1", "a2.weight": "a2", "b1.weight": "b1", "b2.weight": "b2",
            "bm.weight": "bm"}
    first_factor = "a2"  # the scalar multiplies the whole change: a2 and b2 (see prepare/export)
    row_block = 1

    def __init__(self) -> None:
        super().__init__()
        self.layout = "3.x"  # "3.x" | "old": the key names the file used
        self.ambiguous = False  # both layouts fit the shapes
        self.bm = None  # Tucker core: in LyCORIS's key list, never created, refused on load

    @classmethod
    def claims(cls, shapes):
        return "a1.weight" in shapes

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        if tensors.get("bm.weight") is not None:
            raise LycorisError("bm.weight (GLoRA Tucker core) is not supported: LyCORIS never writes "
                               "it", file=file, key=f"{name}.bm.weight")
        t = {n: require(tensors, f"{n}.weight", name=name, file=file) for n in NAMES}
        new_problem = _layout_problem(t["a1"], t["a2"], t["b1"], t["b2"])
        old_problem = _layout_problem(t["a2"], t["a1"], t["b2"], t["b1"], ("a2", "a1", "b2", "b1"))
        if new_problem and old_problem:
            raise LycorisShapeError(f"GLoRA factors do not fit together: {new_problem} (3.x layout; "
                                    f"old layout: {old_problem})", file=file, key=f"{name}.a1.weight")
        old = new_problem is not None
        self.ambiguous = new_problem is None and old_problem is None
        if self.ambiguous and t["a1"].shape[0] < t["a2"].shape[0]:
            old = True  # the old reading has the smaller rank
        self.layout = "old" if old else "3.x"
        for n in NAMES:
            self.set_tensor(n, t[SWAP[n]] if old else t[n])
        return self

    def _swap_layout(self) -> None:
        """Reinterpret the same file tensors in the other layout (ambiguous square files only)."""
        a1, a2, b1, b2 = self.a1, self.a2, self.b1, self.b2
        self.a1, self.a2, self.b1, self.b2 = a2, a1, b2, b1
        self.layout = "3.x" if self.layout == "old" else "old"
        self.clear_cache()

    @property
    def rank(self):
        return self.a2.shape[0]

    @property
    def in_dim(self) -> int:
        return self.a2.shape[1]

    @property
    def depends_on_weight(self) -> bool:
        return True  # the W x_in A1 A2 term

    @property
    def target_shape(self):
        kernel = tuple(self.b2.shape[2:]) if self.b2.ndim > 2 else ()
        return (self.b1.shape[0], self.b2.shape[1]) + kernel

    def _fits(self, shape: tuple[int, ...]) -> bool:
        want = self.target_shape
        return len(shape) >= 2 and shape[1] == self.in_dim and (
            want == shape or (math.prod(want) == math.prod(shape) and want[0] == shape[0]))

    def check_target(self, shape):
        shape = tuple(shape)
        if self._fits(shape):
            return
        if self.ambiguous:
            self._swap_layout()
            if self._fits(shape):
                return
            self._swap_layout()
        raise LycorisShapeError(
            f"glora adapter expects a weight of shape {list(self.target_shape)} but the layer has "
            f"{list(shape)} (file made for another model?)", file=self.file, key=self.name)

    def prepare(self, device, dtype):
        p = super().prepare(device, dtype)
        gamma = self.scale
        if self.scalar is not None:
            p["b2"] = p["b2"] * self.scalar.to(device, FP32)  # a2 got it as first_factor
        p["a1_mat"] = p["a1"].reshape(self.in_dim, self.rank)
        p["a2_mat"] = p["a2"].reshape(self.rank, self.in_dim) * gamma
        p["b1_mat"] = p["b1"].reshape(p["b1"].shape[0], self.rank)
        p["b2_mat"] = p["b2"].reshape(self.rank, -1) * gamma
        return p

    def diff_bound(self, weight_absmax):
        if weight_absmax is None:
            return None
        p = self.prepare(self.a1.device, FP32)
        # |(W x_in A1 A2)[o, j]| <= max|W| * sum_i |(A1 A2)[i, j]|
        #                       <= max|W| * sum_r (sum_i |A1[i, r]|) |A2[r, j]|
        a1_sums = p["a1_mat"].double().abs().sum(dim=0)
        mix = float((a1_sums @ p["a2_mat"].double().abs()).max())
        return weight_absmax * mix + product_bound(p["b1_mat"], p["b2_mat"])

    def diff(self, weight, rows, p):
        # W x_in (A1 A2): move the input axis last, multiply by the two thin factors, move back
        w_in_last = weight.movedim(1, -1)
        wa = ((w_in_last @ p["a1_mat"]) @ p["a2_mat"]).movedim(-1, 1)
        b1 = p["b1_mat"] if rows is None else p["b1_mat"][rows]
        return wa + (b1 @ p["b2_mat"]).reshape(weight.shape)

    def _mix_inputs(self, x: torch.Tensor, layer: LayerSpec, p) -> torch.Tensor:
        """gamma * A1 A2 x over the channel axis (the input change that W x_in M amounts to)."""
        if layer.kind == "linear":
            return (x @ p["a2_mat"].t()) @ p["a1_mat"].t()
        ones = (1,) * layer.conv_dim
        h = layer.op(x, p["a2_mat"].reshape(self.rank, self.in_dim, *ones),
                     stride=1, padding=0, dilation=1, groups=1)
        return layer.op(h, p["a1_mat"].reshape(self.in_dim, self.rank, *ones),
                        stride=1, padding=0, dilation=1, groups=1)

    def _b_path(self, x: torch.Tensor, layer: LayerSpec, p) -> torch.Tensor:
        """gamma * B1 B2 x (B2 carries the kernel, stride and padding of the layer)."""
        if layer.kind == "linear":
            return (x @ p["b2_mat"].t()) @ p["b1_mat"].t()
        ones = (1,) * layer.conv_dim
        h = layer.op(x, p["b2_mat"].reshape(self.rank, self.in_dim, *layer.weight_shape[2:]))
        return layer.op(h, p["b1_mat"].reshape(-1, self.rank, *ones),
                        stride=1, padding=0, dilation=1, groups=1)

    def bypass(self, x, base_forward, strength=1.0, layer=None):
        """f(x + m * gamma A1 A2 x) + m * gamma B1 B2 x: one call of the base layer, bias counted
        once, gamma applied once; equal to the merged layer by linearity."""
        layer = self._layer(layer)
        if strength == 0:
            return base_forward(x)
        if layer.kind not in ("linear", "conv") or layer.kind == "conv" and layer.groups != 1:
            raise LycorisError("GLoRA bypass needs a Linear or an ungrouped conv layer",
                               file=self.file, key=self.name)
        self.check_target(layer.weight_shape)
        dtype = x.dtype if x.is_floating_point() else FP32
        p = self._prepared(x.device, dtype)
        return base_forward(x + strength * self._mix_inputs(x, layer, p)) \
            + strength * self._b_path(x, layer, p)

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, alpha: float | None = None, *,
               use_scalar: bool = False, dtype: torch.dtype = FP32) -> "GLoRA":
        """A trainable GLoRA with LyCORIS init: a1, b1 Kaiming, a2 = b2 = 0 (so dW = 0); with
        `use_scalar`, all four Kaiming and a scalar 0 instead."""
        if layer.kind not in ("linear", "conv") or layer.kind == "conv" and layer.groups != 1:
            raise LycorisError(f"GLoRA needs a Linear or an ungrouped conv layer, not {layer.kind!r}")
        self = cls()
        shape = layer.weight_shape
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        ones = (1,) * len(kernel)
        zero_or_kaiming = kaiming_ if use_scalar else torch.nn.init.zeros_
        self.set_tensor("a1", kaiming_(torch.empty(in_dim, rank, *ones, dtype=dtype)), True)
        self.set_tensor("a2", zero_or_kaiming(torch.empty(rank, in_dim, *ones, dtype=dtype)), True)
        self.set_tensor("b1", kaiming_(torch.empty(out_dim, rank, *ones, dtype=dtype)), True)
        self.set_tensor("b2", zero_or_kaiming(torch.empty(rank, in_dim, *kernel, dtype=dtype)), True)
        if use_scalar:
            self.scalar = torch.nn.Parameter(torch.zeros((), dtype=FP32))
        self.alpha = float(rank if alpha in (None, 0) else alpha)
        return self

    def export(self, dtype=None):
        """LyCORIS keys in the layout the adapter was read in (3.x when created); scalar baked
        into a2 and b2 as LyCORIS does."""
        out = super().export(dtype)
        if self.scalar is not None:
            b2 = self.b2.detach() * self.scalar.detach().to(self.b2.dtype)
            out["b2.weight"] = (b2 if dtype is None else b2.to(dtype)).contiguous()
        if self.layout == "old":
            out = {(f"{SWAP[k[:2]]}.weight" if k[:2] in SWAP else k): v for k, v in out.items()}
        return out

    def extra_repr(self) -> str:
        return (f"glora {self.name} rank={self.rank} alpha={self.alpha} layout={self.layout}"
                f"{' (ambiguous)' if self.ambiguous else ''}")
