"""Diag-OFT: rotate the output channels of W by a block-diagonal orthogonal matrix.

File layout (LyCORIS >= 2024-02; kohya `networks/oft.py` writes the same tensors under `oft_unet_`):
`oft_blocks` n x b x b, `alpha` = the constraint c (not a scale), optional `rescale` O x 1 [x 1 ...]
(1-d `(O,)` in files from Feb 2024). Block k acts on output channels kb ... kb+b-1:

    Q_k = B_k - B_k^T,  Q <- Q * cO / (||Q||_F + 1e-8) when that norm (all blocks jointly) exceeds cO,
    R_k = (I + Q_k)(I - Q_k)^-1   (Cayley, fp32),
    W'[kb+j] = rescale[kb+j] * sum_i R_k[i, j] W[kb+i]     (R_k^T applied to the block of rows).

Strength follows the package rule W(m) = W + m (W' - W): the total transform (rotation and rescale)
is interpolated linearly. Without `rescale` this is LyCORIS's own `I + m (R - I)`. With `rescale`,
LyCORIS applies the rescale at every strength (`rescale * (I + m(R - I))^T W`, so its m = 0 is not W);
LyCORIS minus ours is `(1 - m)(rescale - 1) W`; ours is exactly the base weight at m = 0.
The bias is never rotated: bypass rotates `y - bias` and keeps the bias, so it equals merge exactly.
alpha <= 0 or absent means no bound, as in LyCORIS (kohya clamps even at alpha 0, collapsing Q to 0,
and puts its 1e-8 on both sides of the ratio: a ~1e-8 relative difference).

Legacy `oft_diag` (n x b x b, no alpha, no rescale key) is read by `LegacyDiagOFT` below.
"""
from __future__ import annotations

import math

import torch

from ..errors import LycorisError, LycorisShapeError, warn
from ..layer import LayerSpec
from .base import FP32, Adapter, scalar_value
from .ops import check_dim, factorization, require
from .registry import register

NORM_EPS = 1e-8  # LyCORIS adds this to ||Q||_F before comparing with the bound


def cayley(blocks: torch.Tensor, constraint: float | None, out_dim: int) -> torch.Tensor:
    """fp32 rotations `(I + Q)(I - Q)^-1` for `Q = B - B^T` over the last two axes of `blocks`.

    With a positive finite `constraint` c, Q is scaled down so that ||Q||_F (all blocks together)
    stays within c * out_dim, as LyCORIS and kohya do.
    """
    b = blocks.to(FP32)
    q = b - b.transpose(-1, -2)
    if constraint is not None and constraint > 0 and math.isfinite(constraint):
        bound = constraint * out_dim
        norm = torch.linalg.vector_norm(q) + NORM_EPS
        q = torch.where(norm > bound, q * bound / norm, q)  # no host sync, differentiable
    eye = torch.eye(q.shape[-1], device=q.device, dtype=FP32)
    # R = (I - Q)^-1 (I + Q) = (I - Q^2)^-1 (I + Q)^2: polynomials in Q commute, and for skew Q,
    # I - Q^2 = (I - Q)^T (I - Q) is symmetric with eigenvalues 1 + s^2 >= 1, so a Cholesky solve
    # is well conditioned (no pivoting: the batched LU of torch 2.14.1's CPU build returns invalid
    # pivots for identity blocks after the thread count changed, so R = I crashed a fresh OFT)
    plus = eye + q
    factor = torch.linalg.cholesky(eye - q @ q)
    return torch.cholesky_solve(plus @ plus, factor)


def channels_last(y: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    """A layer output with its channel axis moved last (a view)."""
    return y.movedim(1, -1) if layer.kind == "conv" else y


def channels_back(y: torch.Tensor, layer: LayerSpec) -> torch.Tensor:
    return y.movedim(-1, 1) if layer.kind == "conv" else y


class OrthogonalAdapter(Adapter):
    """What Diag-OFT and BOFT share: constraint instead of alpha, rescale, output-side bypass.

    Subclasses set `out_dim` and `oft_blocks` and implement `rotate` (channels-last transform at
    strength 1, rescale included) and `diff`.
    """

    uses_alpha = False  # alpha is the constraint: kept in `self.constraint`, never a scale
    supports_dora = False

    def __init__(self) -> None:
        super().__init__()
        self.constraint: float | None = None
        self.out_dim = 0
        self.oft_blocks: torch.nn.Parameter | None = None
        self.rescale: torch.nn.Parameter | None = None

    def _load_shared(self, tensors: dict[str, torch.Tensor]) -> None:
        """Constraint (the file's alpha; absent = unconstrained) and the optional rescale."""
        self.constraint = scalar_value(tensors.get("alpha"), file=self.file, key=f"{self.name}.alpha")
        rescale = tensors.get("rescale")
        if rescale is not None:
            if rescale.numel() != self.out_dim or (rescale.ndim > 1 and rescale.shape[0] != self.out_dim):
                raise LycorisShapeError(
                    f"rescale of shape {list(rescale.shape)} does not fit {self.out_dim} output channels",
                    file=self.file, key=f"{self.name}.rescale")
        self.set_tensor("rescale", rescale)
        self.load_dora(tensors, self.out_dim, 0)  # raises: DoRA is not defined for rotations

    @classmethod
    def _new_for(cls, layer: LayerSpec, constraint: float) -> "OrthogonalAdapter":
        """An empty adapter for `create`, refusing layers that have no output channels to rotate."""
        if layer.kind not in ("linear", "conv"):
            raise LycorisError(f"{cls.algo} trains Linear and conv layers, not {layer.kind}")
        self = cls()
        self.out_dim = layer.weight_shape[0]
        self.constraint = float(constraint)
        return self

    def rescale_vector(self, device: torch.device) -> torch.Tensor | None:
        """The per-output-channel factor as a 1-d fp32 vector (any stored layout)."""
        if self.rescale is None:
            return None
        return self.rescale.to(device=device, dtype=FP32).reshape(-1)

    @property
    def depends_on_weight(self) -> bool:
        return True  # the rows of W are rotated

    def rotate(self, v: torch.Tensor, p: dict) -> torch.Tensor:
        """The strength-1 transform of channels-last `v` (..., O), in v's dtype."""
        raise NotImplementedError

    def check_target(self, shape):
        shape = tuple(shape)
        if len(shape) < 2 or shape[0] != self.out_dim:
            raise LycorisShapeError(
                f"{self.algo} adapter rotates {self.out_dim} output channels but the layer weight "
                f"has shape {list(shape)} (file made for another model?)", file=self.file, key=self.name)

    def bypass_plain(self, x, y, strength, layer: LayerSpec, p):
        """`y + m (rot(y - b) - (y - b))`: the base output rotated with the bias taken out."""
        if layer.kind not in ("linear", "conv"):
            raise LycorisError(f"{self.algo} applies to Linear and conv layers, not {layer.kind}",
                               file=self.file, key=self.name)
        if layer.kind == "conv" and layer.groups != 1:
            # rotating a grouped conv's kernel rows mixes groups, which no output rotation can
            # reproduce: add the dense op(x, dW) instead
            if layer.weight is None:
                raise LycorisError(f"{self.algo} bypass on a grouped conv needs the layer's weight",
                                   file=self.file, key=self.name)
            return super().bypass_plain(x, y, strength, layer, p)
        v = y if layer.bias is None else y - layer.channel_view(layer.bias.to(y.dtype), y)
        vl = channels_last(v, layer)
        return y + strength * channels_back(self.rotate(vl, p) - vl, layer)

    def export(self, dtype=None):
        out = super().export(dtype)
        if "oft_blocks" in out:
            alpha = torch.tensor(float(self.constraint or 0.0))  # 0 = unconstrained, as LyCORIS reads it
            out["alpha"] = alpha.to(dtype) if dtype is not None else alpha
        return out

    def extra_repr(self) -> str:
        shape = None if self.oft_blocks is None else list(self.oft_blocks.shape)
        return (f"{self.algo} {self.name} blocks={shape} constraint={self.constraint} "
                f"rescale={self.rescale is not None}")


@register
class DiagOFT(OrthogonalAdapter):
    algo = "diag-oft"
    keys = {"oft_blocks": "oft_blocks", "rescale": "rescale"}

    @classmethod
    def claims(cls, shapes):
        return len(shapes.get("oft_blocks", ())) == 3

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        self._load_blocks(tensors, "oft_blocks")
        self._load_shared(tensors)
        return self

    def _load_blocks(self, tensors: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
        """Read the square n x b x b blocks stored under `suffix`: they rotate n * b output channels."""
        blocks = require(tensors, suffix, name=self.name, file=self.file)
        n, b, b2 = blocks.shape
        check_dim(b2, b, f"{suffix} blocks must be square", file=self.file, key=f"{self.name}.{suffix}")
        self.out_dim = n * b
        self.set_tensor(suffix, blocks)
        return blocks

    @property
    def block_size(self) -> int:
        return self.oft_blocks.shape[-1]

    @property
    def row_block(self) -> int:  # merge streams whole blocks of rows
        return self.block_size

    def blocks_matrix(self, device: torch.device) -> torch.Tensor:
        """The n x b x b block matrices R_k in fp32."""
        return cayley(self.oft_blocks.to(device), self.constraint, self.out_dim)

    def prepare(self, device, dtype):
        p = {"r": self.blocks_matrix(device)}  # once per prepare, shared by every merge chunk
        scale = self.rescale_vector(device)
        if scale is not None:
            p["rescale"] = scale
        return p

    def diff(self, weight, rows, p):
        b = self.block_size
        r, scale = p["r"], p.get("rescale")
        if rows is not None:
            if rows.start % b or rows.stop % b:
                raise ValueError(f"rows {rows} are not aligned to blocks of {b}")
            r = r[rows.start // b: rows.stop // b]
            scale = None if scale is None else scale[rows]
        w = weight.reshape(r.shape[0], b, -1)
        new = torch.einsum("kij,kif->kjf", r, w)  # block k of rows <- R_k^T @ block k
        if scale is not None:
            new = new * scale.reshape(r.shape[0], b, 1)
        return (new - w).reshape(weight.shape)

    def diff_bound(self, weight_absmax):
        if weight_absmax is None:
            return None
        p = self.prepare(next(self.parameters()).device, FP32)
        _, m = self._blend(p, 1.0)  # diag(s_k) R_k^T per block: D_k = (M_k - I) W_k
        change = m.double() - torch.eye(self.block_size, dtype=torch.float64, device=m.device)
        return weight_absmax * float(change.abs().sum(dim=-1).max())

    def prepare_merge(self, p, strength):
        p["_blend"] = self._blend(p, strength)

    def _blend(self, p: dict, alpha: float) -> tuple[float, torch.Tensor]:
        """(alpha, M) with M_k = alpha diag(s_k) R_k^T + (1 - alpha) I for every block k."""
        r, b = p["r"], self.block_size
        m = r.transpose(1, 2) * alpha
        scale = p.get("rescale")
        if scale is not None:
            m = m * scale.reshape(r.shape[0], b, 1)
        m = m + torch.eye(b, device=r.device, dtype=FP32) * (1 - alpha)
        return alpha, m.contiguous()

    def add_delta(self, w, rows, p, alpha, dest):
        # W(m) = W + m (s R^T W - W) blockwise = M_k W_k with M_k = m diag(s_k) R_k^T + (1 - m) I:
        # one batched matmul per chunk instead of rotate, rescale, subtract and add
        b = self.block_size
        if rows.start % b or w.shape[0] % b:
            return super().add_delta(w, rows, p, alpha, dest)  # raises: unaligned rows
        blend = p.get("_blend")
        if blend is None or blend[0] != alpha:
            blend = self._blend(p, alpha)
        k0 = rows.start // b
        count = w.shape[0] // b
        w3 = w.reshape(count, b, -1)
        if dest.data_ptr() == w.data_ptr():
            dest.view(count, b, -1).copy_(torch.bmm(blend[1][k0:k0 + count], w3))
        else:
            torch.bmm(blend[1][k0:k0 + count], w3, out=dest.view(count, b, -1))

    def rotate(self, v, p):
        r = p["r"].to(v.dtype)
        out = torch.einsum("kij,...ki->...kj", r, v.unflatten(-1, (r.shape[0], -1))).flatten(-2)
        scale = p.get("rescale")
        return out if scale is None else out * scale.to(v.dtype)

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, constraint: float = 0.0, *,
               rescaled: bool = False, dtype: torch.dtype = FP32) -> "DiagOFT":
        """A trainable Diag-OFT with LyCORIS init (oft_blocks = 0 so R = I; rescale = 1).

        `rank` is LyCORIS's `lora_dim`: the block size is `factorization(O, rank)[0]`, i.e. rank
        itself when rank divides O and rank^2 <= O. `constraint` is stored as `alpha`.
        """
        self = cls._new_for(layer, constraint)
        out_dim = self.out_dim
        b, n = factorization(out_dim, rank)
        self.set_tensor("oft_blocks", torch.zeros(n, b, b, dtype=dtype), True)
        if rescaled:
            shape = (out_dim,) + (1,) * (len(layer.weight_shape) - 1)
            self.set_tensor("rescale", torch.ones(shape, dtype=dtype), True)
        return self


@register
class LegacyDiagOFT(DiagOFT):
    """LyCORIS Diag-OFT files from Oct 2023 to Feb 2024: one key `oft_diag` (n x b x b).

    From Nov 2023 it holds the final block matrices M_k = R_k (Cayley done, rescale folded in);
    from Oct 2023 it held a raw trainable D_k with M_k = I + D_k. The key is the same; we read the
    R form and switch to the raw form (with a warning) when the blocks sit near 0: rotation blocks have
    rows of norm ~1 (exactly 1 without rescale, whatever the angle), a raw delta trained from zero has
    rows far below that, so the test is RMS row norm < 0.5. Both apply `W'_k = M_k^T W_k`; strength is
    affine.
    """

    algo = "diag-oft-legacy"
    keys = {"oft_diag": "oft_diag"}

    @classmethod
    def claims(cls, shapes):
        return len(shapes.get("oft_diag", ())) == 3 and "oft_blocks" not in shapes

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        self = cls()
        self.name, self.file = name, file
        blocks = self._load_blocks(tensors, "oft_diag")
        row_rms = float(blocks.to(FP32).norm()) / math.sqrt(self.out_dim)
        self.raw_delta = row_rms < 0.5
        if self.raw_delta:
            warn(f"legacy oft_diag blocks have RMS row norm {row_rms:.3g} (near 0, where rotation "
                 "blocks have ~1): read as the Oct 2023 raw form, block matrix I + oft_diag",
                 file=file, key=f"{name}.oft_diag")
        return self

    @property
    def block_size(self) -> int:
        return self.oft_diag.shape[-1]

    def blocks_matrix(self, device):
        m = self.oft_diag.to(device=device, dtype=FP32)
        if self.raw_delta:
            m = m + torch.eye(m.shape[-1], device=device, dtype=FP32)
        return m

    def extra_repr(self) -> str:
        form = "raw I+D" if self.raw_delta else "R"
        return f"{self.algo} {self.name} blocks={list(self.oft_diag.shape)} form={form}"

    @classmethod
    def create(cls, *args, **kwargs):
        raise LycorisError("the legacy oft_diag layout is read-only: train with diag-oft")
