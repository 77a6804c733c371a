"""Small tensor helpers shared by several algorithms."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LycorisError, LycorisShapeError


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """W[o, i, k...] = sum_ab out_factor[o, a] * core[a, b, k...] * in_factor[b, i]."""
    a, b = core.shape[:2]
    kernel = core.shape[2:]
    mixed = out_factor.reshape(-1, a) @ core.reshape(a, -1)  # O x (b * K)
    mixed = mixed.reshape(-1, b, math.prod(kernel))
    full = torch.einsum("obk,bi->oik", mixed, in_factor.reshape(b, -1))
    return full.reshape(full.shape[0], full.shape[1], *kernel)


def product_bound(a: torch.Tensor, b: torch.Tensor) -> float:
    """An upper bound of max |(a @ b)_ij| without the product: the largest row norm of `a` times the
    largest column norm of `b` (Cauchy-Schwarz), in float64 so the bound itself cannot overflow."""
    return float(a.double().norm(dim=1).max() * b.double().norm(dim=0).max())


def abs_max(t: torch.Tensor) -> float:
    """max |t| with one min/max pass and no copy of `t`."""
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi))


def reshape_to(t: torch.Tensor, shape: tuple[int, ...], *, file: str | None, key: str) -> torch.Tensor:
    """Reshape a product to the target weight shape, failing clearly when sizes differ."""
    if tuple(t.shape) == tuple(shape):
        return t
    if t.numel() != math.prod(shape):
        raise LycorisShapeError(f"update of shape {list(t.shape)} cannot patch a weight of shape "
                                f"{list(shape)}", file=file, key=key)
    return t.reshape(shape)


def require(tensors: dict[str, torch.Tensor], suffix: str, *, name: str,
            file: str | None) -> torch.Tensor:
    """Fetch a required tensor or raise naming the missing key."""
    t = tensors.get(suffix)
    if t is None:
        raise LycorisError(f"missing required key {suffix!r}", file=file, key=f"{name}.{suffix}")
    return t


def check_dim(actual: int, expected: int, what: str, *, file: str | None, key: str) -> None:
    """Raise a shape error when two sizes that must agree do not (e.g. ranks inside a module)."""
    if actual != expected:
        raise LycorisShapeError(f"{what}: {actual} does not match {expected}", file=file, key=key)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """LyCORIS/kohya default init for a down-type factor (Kaiming uniform, a=sqrt(5))."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split dim into (m, n), m <= n, m * n = dim, as LyCORIS's LoKr does (factor -1: most square)."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n, length = new_m, new_n, new_m + new_n
    return (m, n) if m <= n else (n, m)


def dora_in_dim(shape: tuple[int, ...], dora: torch.Tensor | None) -> int:
    """Input size that an input-axis dora_scale of a weight of `shape` must match: `I` of a conv
    shape; of a flat `O × I·K` shape, the `I` a conv-shaped dora_scale (`1×I×1…`) names, or
    else the row width itself, the best we know."""
    width = shape[1]
    if len(shape) > 2:
        return width
    conv_in_axis = dora is not None and dora.ndim > 2 and dora.shape[0] == 1 and dora.shape[1] > 0
    if conv_in_axis and width % dora.shape[1] == 0:
        return dora.shape[1]
    return width
