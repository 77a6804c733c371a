"""BOFT (butterfly OFT): a product of M block-diagonal rotations, each between butterfly permutations.

File layout: `oft_blocks` M x n x b x b (b even, n = O / b a power of two, M = log2(n) + 1),
`alpha` = the constraint (bound c * O on ||Q||_F over all stages and blocks, as in Diag-OFT),
optional `rescale` O x 1 [x 1 ...]. Stage s (k = 2^s * b / 2) regroups the channels as (-1, 2, k),
swaps the last two axes, applies `R_{s,blk}` (not its transpose) to each of the n consecutive
groups of b channels, and undoes the regrouping. After the last stage, `rescale` multiplies each
output channel. The same transform acts on the rows of W (merge) or on the output channels (bypass).

Strength (our canonical rule): W(m) = W + m (W' - W), the *total* transform interpolated linearly.
LyCORIS 3.3.0 instead interpolates every stage, `R_s(m) = m R_s + (1 - m) I`, and multiplies the
interpolated stages, which is not affine in m (and keeps `rescale` at m = 0). Both agree at m = 1,
the strength the adapter was trained at; at other strengths ours is the weight-space interpolation
every other algorithm uses (m = 0 is the base weight, bit-identical).
"""
from __future__ import annotations

import torch

from ..errors import LycorisShapeError
from ..layer import LayerSpec
from .base import FP32
from .oft import OrthogonalAdapter, cayley
from .ops import check_dim, require
from .registry import register


def power2_factorization(dim: int, max_block: int = -1) -> tuple[int, int] | None:
    """(b, n) with b the largest even divisor of dim not above max_block such that n = dim / b is a
    power of two (LyCORIS's BOFT rule); None when there is none. max_block <= 0 means no limit."""
    limit = dim if max_block <= 0 else max_block
    for b in range(min(limit, dim) // 2 * 2, 1, -2):
        n, rest = divmod(dim, b)
        if rest == 0 and n & (n - 1) == 0:
            return b, n
    return None


def butterfly(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply the M stages of `r` (M x n x b x b) to the last axis of `v`, in v's dtype."""
    stages, n, b, _ = r.shape
    for s in range(stages):
        k = (b // 2) << s
        v = v.unflatten(-1, (-1, 2, k)).transpose(-1, -2).flatten(-3)  # pair channels k apart
        v = torch.einsum("kij,...kj->...ki", r[s], v.unflatten(-1, (n, b))).flatten(-2)
        v = v.unflatten(-1, (-1, k, 2)).transpose(-1, -2).flatten(-3)  # undo the pairing
    return v


@register
class BOFT(OrthogonalAdapter):
    algo = "boft"
    keys = {"oft_blocks": "oft_blocks", "rescale": "rescale"}
    row_block = 0  # the butterfly mixes channels across the whole weight

    @classmethod
    def claims(cls, shapes):
        return len(shapes.get("oft_blocks", ())) == 4

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        key = f"{name}.oft_blocks"
        blocks = require(tensors, "oft_blocks", name=name, file=file)
        stages, n, b, b2 = blocks.shape
        check_dim(b2, b, "oft_blocks blocks must be square", file=file, key=key)
        if b % 2 or n < 1 or n & (n - 1):
            raise LycorisShapeError(f"BOFT needs an even block size and a power-of-two block count, "
                                    f"found {b} and {n}", file=file, key=key)
        check_dim(stages, n.bit_length(), f"BOFT stages for {n} blocks (log2(n) + 1)", file=file, key=key)
        self.out_dim = n * b
        self.set_tensor("oft_blocks", blocks)
        self._load_shared(tensors)
        return self

    def prepare(self, device, dtype):
        p = {"r": cayley(self.oft_blocks.to(device), self.constraint, self.out_dim)}
        scale = self.rescale_vector(device)
        if scale is not None:
            p["rescale"] = scale
        return p

    def rotate(self, v, p):
        out = butterfly(p["r"].to(v.dtype), v)
        scale = p.get("rescale")
        return out if scale is None else out * scale.to(v.dtype)

    def diff(self, weight, rows, p):
        cols = weight.reshape(weight.shape[0], -1).t()  # rows of W as the last axis
        return self.rotate(cols, p).t().reshape(weight.shape) - weight

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, constraint: float = 0.0, *,
               rescaled: bool = False, dtype: torch.dtype = FP32) -> "BOFT":
        """A trainable BOFT with LyCORIS init (oft_blocks = 0 so every R = I; rescale = 1).

        `rank` is LyCORIS's `lora_dim`: the largest even block size b <= rank with O / b a power
        of two. `constraint` is stored as `alpha`.
        """
        self = cls._new_for(layer, constraint)
        out_dim = self.out_dim
        found = power2_factorization(out_dim, rank)
        if found is None:
            raise LycorisShapeError(f"BOFT cannot split {out_dim} output channels into an even block "
                                    f"size <= {rank} times a power of two")
        b, n = found
        self.set_tensor("oft_blocks", torch.zeros(n.bit_length(), n, b, b, dtype=dtype), True)
        if rescaled:
            shape = (out_dim,) + (1,) * (len(layer.weight_shape) - 1)
            self.set_tensor("rescale", torch.ones(shape, dtype=dtype), True)
        return self
