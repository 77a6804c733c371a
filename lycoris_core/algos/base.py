"""The Adapter base class: one set of parameters serving merge, bypass and training.

Every algorithm defines the change at strength 1 as a function of the base weight,
`D(W) = W(1) - W`, and strength is affine: `W(m) = W + m * D(W)`. DoRA, the alpha/rank scale,
the trainable scalar, strength 0, dtype handling and row-chunked merging live here once.
"""
from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from torch import nn

from ..errors import LycorisError, LycorisOverflowError, LycorisShapeError
from ..layer import LayerSpec
from .ops import abs_max

FP32 = torch.float32
CHUNK_ELEMENTS = 1 << 19  # rows are merged in ~2 MB fp32 chunks: cache friendly, no full fp32 copy
DORA_EPS = torch.finfo(torch.float32).eps

def scalar_value(t: torch.Tensor | float | int | None, *, file: str | None, key: str) -> float | None:
    """A 0-d or 1-element tensor (any dtype) or a number as float; None stays None."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise LycorisShapeError(f"expected a single number, found shape {list(t.shape)}",
                                    file=file, key=key)
        value = float(t.reshape(()).float().item())
    else:
        value = float(t)
    if math.isnan(value):
        raise LycorisError("value is NaN", file=file, key=key)
    return value


class Adapter(nn.Module):
    """Base of every algorithm. Subclasses declare their file keys and implement `diff`."""

    algo: ClassVar[str] = ""
    # file suffix -> attribute name, for every tensor the algorithm owns (alpha/dora_scale excluded)
    keys: ClassVar[dict[str, str]] = {}
    # attribute that absorbs the trainable scalar on export (the first factor of the product)
    first_factor: ClassVar[str] = ""
    uses_alpha: ClassVar[bool] = True
    # file suffixes holding a number or flag rather than a factor (any dtype, not checked as float)
    flags: ClassVar[frozenset[str]] = frozenset()
    supports_dora: ClassVar[bool] = False
    # merge in row chunks of this many rows (0: the diff needs the whole weight at once)
    row_block: int = 1
    # chunks hold up to chunk_factor * CHUNK_ELEMENTS elements: algorithms whose merge kernel
    # needs no temporaries (one in-place addmm / addcmul) take larger chunks
    chunk_factor: ClassVar[int] = 1
    # an fp32 weight is merged in one call over all rows (the kernel is one in-place BLAS call
    # that blocks for the cache itself; chunking only adds calls)
    whole_fp32: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.file: str | None = None
        self.alpha: float | None = None
        self.dora_scale: nn.Parameter | None = None
        self.dora_axis: str | None = None  # "out" | "in"
        self.scalar: nn.Parameter | None = None
        self._cache: dict = {}

    # ----- what a subclass provides -------------------------------------------------------
    @classmethod
    def claims(cls, shapes: dict[str, tuple[int, ...]]) -> bool:
        """True when these file suffixes (with shapes) are this algorithm's; by default, when any
        of its `keys` is present."""
        return any(suffix in shapes for suffix in cls.keys)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, name: str = "",
                     file: str | None = None) -> "Adapter":
        """Build from a module's file tensors (suffix -> tensor); validate shapes."""
        raise NotImplementedError

    @classmethod
    def load(cls, tensors: dict[str, torch.Tensor], *, name: str = "",
             file: str | None = None) -> "Adapter":
        """`from_tensors` plus the checks every algorithm shares: no empty tensor, float factors
        with finite values, a numeric alpha."""
        for suffix, t in tensors.items():
            key = f"{name}.{suffix}"
            if t.numel() == 0:
                raise LycorisShapeError(f"tensor is empty (shape {list(t.shape)}): a rank-0 or "
                                        "zero-size factor changes nothing and cannot be scaled",
                                        file=file, key=key)
            if suffix == "alpha" and t.dtype == torch.bool:
                raise LycorisError("alpha is stored as bool: expected a number (alpha/rank is the "
                                   "scale)", file=file, key=key)
            if suffix == "alpha" or suffix in cls.flags:
                continue
            if not t.is_floating_point():
                raise LycorisError(f"dtype {str(t.dtype).replace('torch.', '')} is not a float "
                                   "dtype: adapter factors must be F16, BF16, F32, F64 or F8",
                                   file=file, key=key)
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise LycorisError(f"{bad} of {t.numel()} values are NaN or Inf", file=file, key=key)
        self = cls.from_tensors(tensors, name=name, file=file)
        if cls.uses_alpha:
            alpha = scalar_value(tensors.get("alpha"), file=file, key=f"{name}.alpha")
            if alpha is not None and math.isinf(alpha) and self.alpha_matters():
                raise LycorisError("alpha is infinite", file=file, key=f"{name}.alpha")
            self.alpha = alpha
        return self

    def alpha_matters(self) -> bool:
        """Whether alpha enters the math (LoKr with two full factors ignores it)."""
        return self.rank is not None

    @property
    def rank(self) -> int | None:
        """The rank that alpha is divided by (None when alpha plays no role)."""
        return None

    @property
    def target_shape(self) -> tuple[int, ...] | None:
        """The weight shape implied by the factors (None when it cannot be known)."""
        return None

    @property
    def depends_on_weight(self) -> bool:
        """Whether the change `W(1) - W` depends on the base weight W (always with DoRA); when it
        does not, a zero weight may stand in for W. Algorithms that read W override this."""
        return self.dora_scale is not None

    def diff(self, weight: torch.Tensor, rows: slice | None, p: dict) -> torch.Tensor:
        """fp32 `W(1) - W` without DoRA, for `weight` (fp32; only `rows` of it when given)."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, layer: LayerSpec, p: dict) -> torch.Tensor:
        """Additive bypass term `D(W) x` (no bias); default builds D densely."""
        w = layer.dense_weight(x.device)
        if w is None:
            w = torch.zeros(layer.weight_shape, device=x.device, dtype=FP32)
        d = self.diff(w, None, self._prepared(x.device, FP32)).to(x.dtype)
        return layer.op(x, d)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Factors on `device` in fp32 (scalar folded into the first), possibly precombined by
        subclasses; the base then casts them to `dtype`."""
        p = {attr: getattr(self, attr).to(device=device, dtype=FP32)
             for attr in self.keys.values() if getattr(self, attr, None) is not None}
        if self.scalar is not None and self.first_factor in p:
            p[self.first_factor] = p[self.first_factor] * self.scalar.to(device, FP32)
        return p

    # ----- shared behaviour -----------------------------------------------------------------
    @property
    def scale(self) -> float:
        """gamma = alpha / rank, applied exactly once; 1 when alpha is absent or unused."""
        rank = self.rank
        if not self.uses_alpha or self.alpha is None or rank is None:
            return 1.0
        if self.alpha == 0:
            return 1.0  # training libraries read alpha 0 as alpha = rank (documented deviation)
        return self.alpha / rank

    def _trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def _prepared(self, device: torch.device, dtype: torch.dtype) -> dict:
        """`prepare` cast to `dtype`, cached per device/dtype unless training."""
        training = self._trainable() and torch.is_grad_enabled()
        key = (str(device), dtype)
        if not training and key in self._cache:
            return self._cache[key]
        p = self.prepare(device, dtype)
        if dtype != FP32:
            p = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in p.items()}
        if not training:
            self._cache[key] = p
        return p

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)

    def clear_cache(self) -> None:
        """Drop prepared factors (call after changing parameters in place outside training)."""
        self._cache = {}

    def check_target(self, shape: torch.Size | tuple[int, ...]) -> None:
        """Raise LycorisShapeError unless this adapter fits a weight of `shape`."""
        want = self.target_shape
        if want is None:
            return
        shape = tuple(shape)
        if want == shape:
            return
        if math.prod(want) == math.prod(shape) and want[0] == shape[0]:
            return  # same data, other layout (2-d LoRA on a 1x1 conv and the reverse)
        raise LycorisShapeError(
            f"{self.algo} adapter expects a weight of shape {list(want)} but the layer has "
            f"{list(shape)} (file made for another model?)", file=self.file, key=self.name)

    def full_diff(self, weight: torch.Tensor, rows: slice | None, p: dict) -> torch.Tensor:
        """`W(1) - W` including DoRA, fp32."""
        d = self.diff(weight, rows, p)
        if self.dora_scale is None:
            return d
        merged = weight + d
        mag = self.dora_scale.to(weight.device, FP32)
        if self.dora_axis == "out":
            mag = mag.reshape(-1)[rows] if rows is not None else mag.reshape(-1)
            norm = self._dora_norm(merged.reshape(merged.shape[0], -1)) + DORA_EPS
            factor = (mag / norm).reshape((-1,) + (1,) * (weight.ndim - 1))
        else:
            norm = self._dora_norm(merged.transpose(0, 1).reshape(merged.shape[1], -1)) + DORA_EPS
            factor = (mag.reshape(-1) / norm).reshape((1, -1) + (1,) * (weight.ndim - 2))
        return merged * factor - weight

    @staticmethod
    def _dora_norm(rows: torch.Tensor) -> torch.Tensor:
        """Row norms of `W + dW` for DoRA, NaN where not finite: an infinite norm (squares beyond
        fp32) would scale the weight silently to zero; NaN reaches the merge's overflow check
        instead, with no extra device sync."""
        norm = rows.norm(dim=1)
        return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.nan))

    def merge(self, weight: torch.Tensor, strength: float = 1.0, *, inplace: bool = False,
              store_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The patched weight `W + m * D(W)`, computed in fp32 on the weight's device.

        Returns a new tensor in the weight's dtype, or writes into `weight` when `inplace`.
        Strength 0 returns the weight unchanged (bit-identical). A result that is not finite, or
        beyond the range of the weight's dtype or of `store_dtype` (the dtype the caller will
        store it in), raises LycorisOverflowError naming file and module; the weight is then
        untouched unless `inplace` (ComfyUI merges into a working copy it discards on error).
        """
        self.check_target(weight.shape)
        if strength == 0 or weight.numel() == 0:
            return weight if inplace else weight.clone()
        limits = (weight.dtype, store_dtype)
        what = f"merged weight at strength {strength:g}"
        grad = torch.is_grad_enabled() and (weight.requires_grad or self._trainable())
        chunked = not grad and self.row_block > 0 and not (self.dora_scale is not None
                                                           and self.dora_axis == "in")
        if not chunked:
            p = self._prepared(weight.device, FP32)
            w = weight.to(FP32)
            new = w + strength * self.full_diff(w, None, p)
            if not grad:  # training sees a non-finite loss itself; no sync on every step
                self._check_fits([torch.aminmax(new)], limits, what)
            if inplace:
                with torch.no_grad():
                    weight.copy_(new)
                return weight
            return new.to(weight.dtype)
        out = weight if inplace else torch.empty_like(weight)
        rows_total = weight.shape[0]
        row_elems = max(1, weight[0].numel())
        budget = CHUNK_ELEMENTS * self.chunk_factor
        step = max(self.row_block, (budget // row_elems) // self.row_block * self.row_block)
        if self.whole_fp32 and weight.dtype == FP32:
            step = rows_total
        extremes = []  # (min, max) of each fp32 chunk, checked once at the end: one device sync
        with torch.no_grad():
            p = self._prepared(weight.device, FP32)
            self.prepare_merge(p, strength)
            for start in range(0, rows_total, step):
                rows = slice(start, min(start + step, rows_total))
                if weight.dtype == FP32:
                    self.merge_rows(weight[rows], rows, p, strength, out[rows])
                    extremes.append(torch.aminmax(out[rows]))
                else:
                    scratch = weight[rows].to(FP32)
                    self.merge_rows(scratch, rows, p, strength, scratch)
                    extremes.append(torch.aminmax(scratch))
                    out[rows] = scratch
        self._check_fits(extremes, limits, what)
        return out

    def _check_fits(self, extremes: list, dtypes: tuple, what: str) -> None:
        """Raise LycorisOverflowError unless the (min, max) pairs of fp32 values are finite and
        within the range of every float dtype in `dtypes` (None entries are ignored)."""
        if not extremes:
            return
        values = torch.stack([v for pair in extremes for v in pair]).double().cpu()
        floats = [d for d in dtypes if d is not None and d.is_floating_point]
        limit = min((torch.finfo(d).max for d in floats), default=math.inf)
        if bool((values.abs() <= limit).all()):  # NaN compares false
            return
        if not bool(torch.isfinite(values).all()):
            reason = ("has NaN or Inf values: the factors' product overflows float32 (or the "
                      "weight already held them)")
        else:
            narrow = min(floats, key=lambda d: torch.finfo(d).max)
            reason = (f"reaches {float(values.abs().max()):.4g}, beyond the range of "
                      f"{str(narrow).replace('torch.', '')} (±{limit:g}): finite factors whose "
                      "product overflows")
        raise LycorisOverflowError(f"{what} {reason}; module refused", file=self.file, key=self.name)

    def delta_bound(self, weight_absmax: float | None = None) -> float | None:
        """An upper bound of max |W(1) - W| from the factors (no dense product) and, where the
        change depends on W, `weight_absmax` = max |W|; None when that is needed and not given."""
        if self.dora_scale is None:
            return self.diff_bound(weight_absmax)
        if weight_absmax is None:
            return None
        # every entry of d * M / ||M|| is at most |d| along the DoRA axis, whatever M = W + dW is
        return abs_max(self.dora_scale) + weight_absmax

    def diff_bound(self, weight_absmax: float | None) -> float | None:
        """An upper bound of max |D(W)| without DoRA, as `delta_bound` describes it."""
        raise NotImplementedError

    def check_range(self, dtype: torch.dtype, strength: float = 1.0,
                    weight: torch.Tensor | None = None) -> None:
        """Raise LycorisOverflowError when this module's change at `strength` cannot be held in
        `dtype` (the dtype a layer computes or stores in); call it before bypassing or merging.

        `weight` is the layer's weight as it computes with it (any float dtype); it is read only
        when the change depends on W (one min/max pass), and such a module is not checked
        without it. Cheap for every file that fits: the bound of `delta_bound` and the bias
        change; only a module whose bound exceeds the range is built densely to confirm, so a
        loose bound never refuses a module.
        """
        if strength == 0:
            return
        bias = self.merge_bias(None, strength)  # the bias change itself: a vector, checked exactly
        if bias is not None:
            self._check_fits([torch.aminmax(bias.detach().to(FP32))], (dtype,),
                             f"bias change at strength {strength:g}")
        reads_weight = self.depends_on_weight and weight is not None
        bound = self.delta_bound(abs_max(weight) if reads_weight else None)
        if bound is None or abs(strength) * bound <= torch.finfo(dtype).max:
            return
        if reads_weight:
            base = weight.detach().to(FP32)
        elif self.target_shape is not None:
            base = torch.zeros(self.target_shape, dtype=FP32, device=next(self.parameters()).device)
        else:
            return
        with torch.no_grad():
            change = self.merge(base, strength, inplace=not reads_weight)  # raises beyond float32
            if reads_weight:
                change.sub_(base)
        self._check_fits([torch.aminmax(change)], (dtype,), f"change at strength {strength:g}")

    def prepare_merge(self, p: dict, strength: float) -> None:
        """Add to the prepared factors what every chunk of a merge at this strength shares
        (called once per merge, before the chunks run)."""

    def merge_rows(self, w: torch.Tensor, rows: slice, p: dict, strength: float,
                   dest: torch.Tensor) -> None:
        """Write fp32 `w + m * D(w)` for these rows into `dest` (which may alias `w`).

        Without DoRA this is `add_delta`; output-axis DoRA is fused around it (the input axis
        needs whole columns and is merged unchunked).
        """
        if self.dora_scale is None:
            self.add_delta(w, rows, p, strength, dest)
            return
        if self.dora_axis != "out":
            torch.add(w, self.full_diff(w, rows, p), alpha=strength, out=dest)
            return
        # W(m) = W + m (f (W + dW) - W) = (1 - m) W + m f (W + dW), with f = d / ||W + dW|| per row
        in_place = dest.data_ptr() == w.data_ptr()
        merged = dest if strength == 1 or not in_place else torch.empty_like(w)
        self.add_delta(w, rows, p, 1.0, merged)
        flat = merged.reshape(merged.shape[0], -1)
        mag = self.dora_scale.to(w.device, FP32).reshape(-1)[rows]
        factor = (mag / (self._dora_norm(flat) + DORA_EPS)).reshape((-1,) + (1,) * (w.ndim - 1))
        if strength == 1:
            merged.mul_(factor)
            if merged is not dest:
                dest.copy_(merged)
            return
        merged.mul_(factor * strength)
        torch.add(merged, w, alpha=1 - strength, out=dest)

    def add_delta(self, w: torch.Tensor, rows: slice, p: dict, alpha: float,
                  dest: torch.Tensor) -> None:
        """Write fp32 `w + alpha * D(w)` (no DoRA) for these rows into `dest` (may alias `w`).

        Algorithms with a fused kernel (LoRA: one addmm, LoHa: one addcmul) override this to
        skip the temporary D.
        """
        torch.add(w, self.diff(w, rows, p), alpha=alpha, out=dest)

    def merge_bias(self, bias: torch.Tensor | None, strength: float = 1.0) -> torch.Tensor | None:
        """The patched bias; most algorithms leave it alone."""
        return bias

    def bypass(self, x: torch.Tensor, base_forward, strength: float = 1.0,
               layer: LayerSpec | nn.Module | None = None) -> torch.Tensor:
        """Forward of the wrapped layer at `strength` without touching its weight.

        Equals `layer.op(x, merge(W, strength), merge_bias(b, strength))` up to float rounding.
        `layer` (a LayerSpec or the module itself) is needed for convs, DoRA and weight-dependent
        algorithms; a Linear is assumed when it is omitted.
        """
        layer = self._layer(layer)
        y = base_forward(x)
        if strength == 0:
            return y
        dtype = x.dtype if x.is_floating_point() else FP32
        p = self._prepared(x.device, dtype)
        if self.dora_scale is None:
            return self.bypass_plain(x, y, strength, layer, p)
        return self._bypass_dora(x, y, base_forward, strength, layer, p)

    def bypass_plain(self, x, y, strength, layer, p):
        """`y + m * D(W) x` for additive algorithms; output/input transforms override this."""
        return torch.add(y, self.delta_forward(x, layer, p), alpha=strength)  # one kernel, no m * h pass

    def _layer(self, layer) -> LayerSpec:
        if isinstance(layer, LayerSpec):
            return layer
        if isinstance(layer, nn.Module):
            return LayerSpec.from_module(layer)
        shape = self.target_shape
        if shape is None or len(shape) != 2:
            raise LycorisError(f"{self.algo} bypass needs the layer (a LayerSpec or the module)",
                               file=self.file, key=self.name)
        return LayerSpec("linear", shape)

    def _dora_factor(self, layer: LayerSpec, device) -> torch.Tensor:
        """d / ||W + dW|| along the DoRA axis, from the dense base weight, cached per weight."""
        if layer.weight is None:
            raise LycorisError("DoRA bypass needs the layer's weight for its norm",
                               file=self.file, key=self.name)
        wt = layer.weight
        # inference tensors (ComfyUI runs prompts in inference mode) keep no version counter
        version = 0 if wt.is_inference() else wt._version
        key = ("dora", wt.data_ptr(), version, layer.weight_tag, str(device))
        if key not in self._cache or self._trainable():
            w = layer.dense_weight(device)
            p = self._prepared(device, FP32)
            merged = w + self.diff(w, None, p)
            if self.dora_axis == "out":
                norm = self._dora_norm(merged.reshape(merged.shape[0], -1))
            else:
                norm = self._dora_norm(merged.transpose(0, 1).reshape(merged.shape[1], -1))
            factor = self.dora_scale.to(device, FP32).reshape(-1) / (norm + DORA_EPS)
            if self._trainable():
                return factor
            if not bool(torch.isfinite(factor).all()):  # once per cached weight
                raise LycorisOverflowError("DoRA norm of W + dW is not finite (the update is too large "
                                           "for float32); module refused", file=self.file, key=self.name)
            self._cache[key] = factor
        return self._cache[key]

    def _bypass_dora(self, x, y, base_forward, m, layer, p):
        s = self._dora_factor(layer, x.device).to(y.dtype)
        if self.dora_axis == "out":
            bias = layer.bias
            wx = y if bias is None else y - layer.channel_view(bias.to(y.dtype), y)
            merged = wx + self.delta_forward(x, layer, p)
            return y + m * (layer.channel_view(s, merged) * merged - wx)
        xs = x * layer.channel_view(s.to(x.dtype), x)
        return y + m * (base_forward(xs) + self.delta_forward(xs, layer, p) - y)

    # ----- tensors apart from configuration (hosts that move or rebuild patches) -----------
    def tensor_names(self) -> tuple[str, ...]:
        """Names of every tensor this adapter computes with (its own parameters), in a fixed order."""
        return tuple(name for name, _ in self.named_parameters(recurse=False))

    def tensor_values(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.tensor_names())

    def with_tensors(self, values) -> "Adapter":
        """This adapter with its tensors replaced by `values` (same order as `tensor_names`, e.g.
        moved to another device by a host), sharing everything else; `self` when nothing changed."""
        names = self.tensor_names()
        values = tuple(values)
        if len(values) != len(names):
            raise LycorisError(f"expected {len(names)} tensors ({', '.join(names)}), got {len(values)}",
                               file=self.file, key=self.name)
        current = self.tensor_values()
        if all(v is c for v, c in zip(values, current)):
            return self
        new = copy.copy(self)
        new._parameters = dict(self._parameters)  # copy.copy would share the parameter dict
        new._cache = {}
        for name, old, value in zip(names, current, values):
            if tuple(value.shape) != tuple(old.shape):
                raise LycorisShapeError(f"{name} has shape {list(value.shape)}, expected "
                                        f"{list(old.shape)}", file=self.file, key=self.name)
            if not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            new._parameters[name] = value
        return new

    # ----- files and training -------------------------------------------------------------
    def export(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors in the standard LyCORIS layout (suffix -> tensor), scalar baked in."""
        out = {}
        for suffix, attr in self.keys.items():
            t = getattr(self, attr, None)
            if t is None:
                continue
            t = t.detach()
            if attr == self.first_factor and self.scalar is not None:
                t = t * self.scalar.detach().to(t.dtype)
            out[suffix] = t
        if self.uses_alpha and self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach()
        if dtype is not None:
            out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
        return {k: v.contiguous() for k, v in out.items()}

    def set_tensor(self, attr: str, value: torch.Tensor | None, trainable: bool = False) -> None:
        """Register a factor as a Parameter (frozen unless training)."""
        if value is None:
            setattr(self, attr, None)
            return
        setattr(self, attr, nn.Parameter(value, requires_grad=trainable))

    def load_dora(self, tensors: dict[str, torch.Tensor], out_dim: int, in_dim: int) -> None:
        """Read `dora_scale` and decide its axis from its shape (1-d = output axis, PEFT)."""
        t = tensors.get("dora_scale")
        if t is None:
            return
        if not self.supports_dora:
            raise LycorisError(f"dora_scale is not supported for {self.algo}",
                               file=self.file, key=f"{self.name}.dora_scale")
        shape = tuple(t.shape)
        rest_one = all(s == 1 for s in shape[1:])
        if shape[0] == out_dim and rest_one:
            axis = "out"
        elif len(shape) >= 2 and shape[0] == 1 and shape[1] == in_dim and all(s == 1 for s in shape[2:]):
            axis = "in"
        else:
            raise LycorisShapeError(
                f"dora_scale of shape {list(shape)} fits neither the output axis ({out_dim}) nor the "
                f"input axis ({in_dim})", file=self.file, key=f"{self.name}.dora_scale")
        self.dora_axis = axis
        self.set_tensor("dora_scale", t.to(FP32))

    def init_dora(self, weight: torch.Tensor, axis: str) -> None:
        """Trainable magnitude initialised to the exact norm of W (so W' = W at step 0)."""
        w = weight.detach().to(FP32)
        if axis == "out":
            mag = w.reshape(w.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (w.ndim - 1))
        elif axis == "in":
            mag = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
            mag = mag.reshape((1, -1) + (1,) * (w.ndim - 2))
        else:
            raise ValueError(f"DoRA axis must be 'out' or 'in', not {axis!r}")
        self.dora_axis = axis
        self.set_tensor("dora_scale", mag + DORA_EPS, trainable=True)

    def extra_repr(self) -> str:
        return f"{self.algo} {self.name} rank={self.rank} alpha={self.alpha} dora={self.dora_axis}"
