"""What an adapter needs to know about the layer it wraps: kind, conv geometry, weight and bias."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_rms_norm(module: nn.Module) -> bool:
    """torch's RMSNorm and the RMSNorm classes of DiT code bases (same name, an `eps`, a 1-d+ scale
    called `weight`): the output is rms_norm(x) * weight, whatever the class's own arithmetic."""
    torch_rms = getattr(nn, "RMSNorm", None)
    if torch_rms is not None and isinstance(module, torch_rms):
        return True
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "eps")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


@dataclass
class LayerSpec:
    """A Linear, ConvNd or norm layer described by value, with live references to weight/bias."""

    kind: str  # "linear" | "conv" | "norm"
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    norm_type: str = ""  # "layer" | "group" | "rms" for kind == "norm"
    eps: float | None = 1e-5  # None: torch's default for the input dtype (RMSNorm)
    num_groups: int = 1
    # for quantised storage (scaled fp8, GGUF, ...): device -> the fp32 weight the layer computes
    # with; `weight` then stays the raw stored tensor (its identity keys cached DoRA norms)
    dequantise: Callable[[torch.device], torch.Tensor] | None = None
    # identifies what `dense_weight` returns when it is not the stored weight itself (e.g. the
    # weight as patched by adapters stacked before this one): keys cached DoRA norms with it
    weight_tag: object = None

    @property
    def conv_dim(self) -> int:
        return len(self.weight_shape) - 2

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "LayerSpec":
        """A plain layer for a bare weight: 2-d Linear, 3-5-d conv with stride 1 and no padding."""
        shape = tuple(weight.shape)
        if len(shape) == 2:
            return cls("linear", shape, weight=weight, bias=bias)
        if len(shape) in (3, 4, 5):
            n = len(shape) - 2
            return cls("conv", shape, (1,) * n, (0,) * n, (1,) * n, 1, weight, bias)
        if len(shape) == 1:
            return cls("norm", shape, weight=weight, bias=bias, norm_type="layer")
        raise ValueError(f"no layer kind for a weight of shape {list(shape)}")

    @classmethod
    def from_module(cls, module: nn.Module) -> "LayerSpec":
        """Describe a torch layer (subclasses such as host-specific ops included)."""
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(module, nn.modules.conv._ConvNd):
            n = len(module.kernel_size)
            return cls("conv", tuple(weight.shape), _tuple(module.stride, n),
                       module.padding if isinstance(module.padding, str) else _tuple(module.padding, n),
                       _tuple(module.dilation, n), module.groups, weight, bias)
        if isinstance(module, nn.Linear):
            return cls("linear", tuple(weight.shape), weight=weight, bias=bias)
        if isinstance(module, nn.GroupNorm):
            return cls("norm", tuple(weight.shape), weight=weight, bias=bias, norm_type="group",
                       eps=module.eps, num_groups=module.num_groups)
        if isinstance(module, nn.LayerNorm):
            return cls("norm", tuple(weight.shape), weight=weight, bias=bias, norm_type="layer",
                       eps=module.eps)
        if weight is not None and is_rms_norm(module):
            return cls("norm", tuple(weight.shape), weight=weight, bias=bias, norm_type="rms",
                       eps=module.eps)
        if weight is not None:
            return cls.from_weight(weight, bias)
        raise TypeError(f"cannot wrap {type(module).__name__}: it has no weight")

    def dense_weight(self, device: torch.device | None = None) -> torch.Tensor | None:
        """The layer's effective weight in fp32 on `device` (default: the weight's own), dequantised
        when its storage needs it."""
        if device is None:
            device = self.weight.device if self.weight is not None else torch.device("cpu")
        if self.dequantise is not None:
            return self.dequantise(device).to(device=device, dtype=torch.float32)
        if self.weight is None:
            return None
        return self.weight.to(device=device, dtype=torch.float32)

    def op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           **overrides) -> torch.Tensor:
        """Run this layer's operation with another weight (same stride/padding/groups unless overridden)."""
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv":
            n = weight.ndim - 2
            kw = dict(stride=self.stride or 1, padding=self.padding or 0,
                      dilation=self.dilation or 1, groups=self.groups)
            kw.update(overrides)
            return _CONV_FN[n](x, weight, bias, **kw)
        raise TypeError(f"layer kind {self.kind!r} has no weight operation")

    def channel_view(self, vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Shape a per-channel vector to broadcast over x's channel axis (last for Linear, 1 for conv)."""
        vec = vec.reshape(-1)
        if self.kind == "conv":
            return vec.reshape((1, -1) + (1,) * (x.ndim - 2))
        return vec
