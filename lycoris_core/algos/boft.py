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
from . import base
from .base import FP32
from .oft import OrthogonalAdapter, cayley
from .ops import abs_max, check_dim, require
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


def butterfly_stage(r: torch.Tensor, v: torch.Tensor, s: int) -> torch.Tensor:
    """Apply stage `s` (its n x b x b blocks `r`) to the last axis of `v`, in v's dtype."""
    n, b, _ = r.shape
    k = (b // 2) << s
    v = v.unflatten(-1, (-1, 2, k)).transpose(-1, -2).flatten(-3)  # pair channels k apart
    v = torch.einsum("kij,...kj->...ki", r, v.unflatten(-1, (n, b))).flatten(-2)
    return v.unflatten(-1, (-1, k, 2)).transpose(-1, -2).flatten(-3)  # undo the pairing


def butterfly(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply the M stages of `r` (M x n x b x b) to the last axis of `v`, in v's dtype."""
    for s in range(r.shape[0]):
        v = butterfly_stage(r[s], v, s)
    return v


# Merging: write the channel index as c = j + h * u (h = b / 2, j < h, u < 2^M). Stage s mixes j
# with bit s of u, so stages s0 .. s0 + S - 1 together mix (j, bits s0 .. s0 + S - 1 of u) for each
# value of the other bits: one dense block of B = h * 2^S channels. A batched matmul with such
# blocks does S stages at once for the flops of S stages when B <= 4h, and small-K batched GEMMs
# are so inefficient that up to B ~ 40 still wins. Between groups one permutation regroups rows.
GROUP_CHANNELS = 40


def stage_groups(r: torch.Tensor, rescale: torch.Tensor | None = None,
                 target: int = GROUP_CHANNELS) -> list[tuple[int, int, torch.Tensor]]:
    """(first stage, stage count, blocks) per group of consecutive stages; blocks is
    (blocks, B, B), block (u_high, u_low) and in-block index (bits of the group, j), rescale
    folded into the last group."""
    stages, n, b, _ = r.shape
    half = b // 2
    out_dim = n * b
    per = 1
    while half << (per + 1) <= target:
        per += 1
    groups = []
    for s0 in range(0, stages, per):
        count = min(per, stages - s0)
        size, low = half << count, 1 << s0
        high = out_dim // (size * low)
        # probe row q marks, in every block, the channel with in-block index q; pushing the rows
        # through the stages gives out[q, c] = block(c)[index(c), q]
        probe = torch.eye(size, device=r.device, dtype=r.dtype).reshape(size, 1, 1 << count, 1, half)
        probe = probe.expand(size, high, 1 << count, low, half).reshape(size, out_dim)
        for s in range(s0, s0 + count):
            probe = butterfly_stage(r[s], probe, s)
        blocks = probe.reshape(size, high, 1 << count, low, half).permute(1, 3, 2, 4, 0)
        blocks = blocks.reshape(high * low, size, size)
        if s0 + count == stages and rescale is not None:  # high == 1: blocks are (u_low)
            scale = rescale.reshape(1 << count, low, half).transpose(0, 1).reshape(low, size, 1)
            blocks = blocks * scale
        groups.append((s0, count, blocks.contiguous()))
    return groups


def butterfly_rows(groups, half: int, x: torch.Tensor,
                   scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The grouped transform applied to the rows of 2-d `x` (O x c, unit column stride); returns
    the result as a (u_grp, u_low, j, column) view of the last group's layout, which is the
    natural channel order once the first three axes are flattened. `scratch`: two flat fp32
    buffers of at least O * c elements, reused across calls (the result lives in one of them)."""
    out_dim, cols = x.shape
    if scratch is None:
        scratch = (x.new_empty(out_dim * cols), x.new_empty(out_dim * cols))
    out_buf, in_buf = (t[: out_dim * cols] for t in scratch)
    y = None
    prev = None
    for s0, count, blocks in groups:
        nb, size, _ = blocks.shape
        if prev is None:  # s0 == 0: natural channel order is already (u_high, bits of group, j)
            xin = x.reshape(nb, size, cols)
        else:  # (u_high, u_grp | u_low_prev, u_grp_prev, j) -> (u_high, u_grp_prev, u_low_prev, u_grp, j)
            high = out_dim // (size << s0)
            src = y.view(high, 1 << count, 1 << prev[0], 1 << prev[1], half, cols)
            xin = in_buf.view(high, 1 << prev[1], 1 << prev[0], 1 << count, half, cols)
            xin.copy_(src.permute(0, 3, 2, 1, 4, 5))
            xin = xin.view(nb, size, cols)
        y = torch.bmm(blocks, xin, out=out_buf.view(nb, size, cols))
        prev = (s0, count)
    s0, count = prev
    return y.view(1 << s0, 1 << count, half, cols).transpose(0, 1)


@register
class BOFT(OrthogonalAdapter):
    algo = "boft"
    keys = {"oft_blocks": "oft_blocks", "rescale": "rescale"}

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

    def diff_bound(self, weight_absmax):
        if weight_absmax is None:
            return None
        p = self.prepare(self.oft_blocks.device, FP32)
        # the largest row abs-sum of the whole transform is at most the product of each stage's
        # (the butterfly permutations keep it) times max |rescale|; subtracting W adds at most 1
        gain = float(p["r"].double().abs().sum(dim=-1).amax(dim=(1, 2)).prod())
        if "rescale" in p:
            gain *= abs_max(p["rescale"])
        return weight_absmax * (gain + 1)

    def rotate(self, v, p):
        out = butterfly(p["r"].to(v.dtype), v)
        scale = p.get("rescale")
        return out if scale is None else out * scale.to(v.dtype)

    def diff(self, weight, rows, p):
        cols = weight.reshape(weight.shape[0], -1).t()  # rows of W as the last axis
        return self.rotate(cols, p).t().reshape(weight.shape) - weight

    @property
    def row_block(self) -> int:  # merge takes all rows at once and streams column chunks
        return self.out_dim

    def add_delta(self, w, rows, p, alpha, dest):
        if rows.start != 0 or w.shape[0] != self.out_dim:
            return super().add_delta(w, rows, p, alpha, dest)
        if "_groups" not in p:
            self.prepare_merge(p, alpha)
        groups = p["_groups"]
        half = self.oft_blocks.shape[-1] // 2
        _, count, _ = groups[-1]
        split = (1 << count, -1, half)  # natural rows as (u_grp, u_low, j) of the last group
        w2, d2 = w.reshape(w.shape[0], -1), dest.view(dest.shape[0], -1)
        width = w2.shape[1]
        step = min(width, max(16, base.CHUNK_ELEMENTS // self.out_dim))
        scratch = (w2.new_empty(self.out_dim * step), w2.new_empty(self.out_dim * step))
        for f0 in range(0, width, step):  # the butterfly mixes rows only: columns are independent
            cols = slice(f0, min(width, f0 + step))
            y = butterfly_rows(groups, half, w2[:, cols], scratch)
            d = d2[:, cols].unflatten(0, split)
            if alpha == 1:
                d.copy_(y)
            else:
                torch.lerp(w2[:, cols].unflatten(0, split), y, alpha, out=d)

    def prepare_merge(self, p, strength):
        if "_groups" not in p:
            p["_groups"] = stage_groups(p["r"], p.get("rescale"))

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
