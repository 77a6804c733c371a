"""DyLoRA: a LoRA trained so that its first r ranks form a usable LoRA on their own, for every
multiple r of a block size (Valipour et al. 2023; LyCORIS `algo=dylora`, `block_size`).

Every training forward draws, per module and from torch's global generator (so activation
checkpointing replays the draw), a number of blocks n uniformly from 1..rank/block_size, and runs
the LoRA cut to its first r = n * block_size ranks with the scale alpha / r. The blocks before the
last one used are detached and the later ones unused, as in lycoris-lora: each block is a
parameter of its own, so a step moves only the blocks that had a gradient (no momentum or weight
decay step for the others). Outside training it is the plain full-rank LoRA, and it saves as one
(`lora_down`/`lora_up`/`alpha`), which every LoRA reader loads; `truncated` cuts such a file to r
ranks, and keeping alpha makes that file's scale alpha / r, exactly what was trained at rank r.
Its metadata records `algo` dylora and `block_size` (LyCORIS's names; kohya's own DyLoRA calls it
`unit`), from which `as_dylora` makes a resumed file's LoRAs DyLoRAs again.

lycoris-lora 3.3 scales by alpha / n (blocks, not ranks): the same for block size 1, and for larger
blocks its full-rank training is block_size times stronger than the file it saves. Ours trains at
what its file (and every truncation of it) gives; that equals lycoris-lora run with alpha /
block_size.
"""
from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import nn

from ..algos.base import FP32, Adapter
from ..algos.lora import LoRA
from ..algos.ops import kaiming_
from ..algos.registry import register_training
from ..errors import LycorisError, LycorisShapeError
from ..layer import LayerSpec


@register_training
class DyLoRA(LoRA):
    """A trainable LoRA/LoCon whose ranks are trained as nested blocks; saves as a plain LoRA."""

    algo = "dylora"
    supports_dora = False

    def __init__(self) -> None:
        super().__init__()
        self.block_size = 1
        self.blocks = 0
        self.mid = None

    @classmethod
    def claims(cls, shapes):
        return False  # its files hold a plain LoRA and load as one

    @classmethod
    def from_tensors(cls, tensors, *, name="", file=None):
        raise LycorisError("a DyLoRA file is a plain LoRA file: load it as lora", file=file, key=name)

    # ----- the factors: one parameter per block, read as the LoRA's up/down ----------------------
    def _parts(self, which: str, count: int) -> list[torch.Tensor]:
        return [getattr(self, f"{which}_{i}") for i in range(count)]

    @property
    def up(self) -> torch.Tensor:
        return torch.cat(self._parts("up", self.blocks), dim=1)

    @property
    def down(self) -> torch.Tensor:
        return torch.cat(self._parts("down", self.blocks), dim=0)

    @property
    def rank(self) -> int:
        return self.blocks * self.block_size

    @property
    def target_shape(self):
        first = self.down_0
        return (self.up_0.shape[0],) + tuple(first.shape[1:])

    # ----- training: a random leading cut of the blocks ------------------------------------------
    def prepare(self, device, dtype):
        if not (self._trainable() and torch.is_grad_enabled()):
            return super().prepare(device, dtype)
        return self.cut(int(torch.randint(1, self.blocks + 1, ())), device)

    def cut(self, used: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The prepared factors (fp32) of the first `used` blocks at scale alpha / their rank; only
        the last block used passes gradients."""
        if not 1 <= used <= self.blocks:
            raise LycorisError(f"DyLoRA has {self.blocks} blocks, cannot use {used}", key=self.name)
        ups, downs = self._parts("up", used), self._parts("down", used)
        up = torch.cat([u.detach() for u in ups[:-1]] + ups[-1:], dim=1).to(device, FP32)
        down = torch.cat([d.detach() for d in downs[:-1]] + downs[-1:], dim=0).to(device, FP32)
        rank = used * self.block_size
        return {"up": up, "down": down, "down_full": down, "down_mat": down.reshape(rank, -1),
                "up_mat": up.reshape(up.shape[0], rank) * (self.alpha / rank)}

    def delta_forward(self, x, layer: LayerSpec, p):
        if layer.kind == "linear" or layer.groups != 1:
            return super().delta_forward(x, layer, p)
        down = p["down"]
        if down.ndim == 2:  # a 1x1 conv LoRA stored flat (resumed from another trainer's file)
            down = down.reshape(down.shape[0], -1, *layer.weight_shape[2:])
        h = layer.op(x, down)  # the layer's own stride/padding, down at the cut's rank
        up = p["up_mat"].reshape(*p["up_mat"].shape, *([1] * layer.conv_dim))
        return layer.op(h, up, stride=1, padding=0, dilation=1, groups=1)

    @classmethod
    def create(cls, layer: LayerSpec, rank: int = 4, alpha: float | None = None, *,
               block_size: int = 4, dtype: torch.dtype = FP32) -> "DyLoRA":
        """A trainable DyLoRA with LoRA's init (down Kaiming-uniform, up = 0, so dW = 0 at step 0)."""
        shape = layer.weight_shape
        if len(shape) < 2:
            raise LycorisError(f"DyLoRA trains Linear and Conv layers, not a {layer.kind} layer")
        if block_size < 1 or rank % block_size:
            raise LycorisError(f"rank {rank} is not a multiple of the DyLoRA block size {block_size}")
        self = cls()
        self.block_size, self.blocks = block_size, rank // block_size
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        down = kaiming_(torch.empty(rank, in_dim, *kernel, dtype=dtype))
        for i, part in enumerate(down.split(block_size)):
            self.register_parameter(f"down_{i}", nn.Parameter(part.clone()))
            self.register_parameter(f"up_{i}", nn.Parameter(
                torch.zeros(out_dim, block_size, *([1] * len(kernel)), dtype=dtype)))
        self.alpha = float(rank if alpha in (None, 0) else alpha)
        return self

    @classmethod
    def from_lora(cls, lora: LoRA, block_size: int) -> "DyLoRA":
        """A DyLoRA holding a LoRA's factors (same values, dtype, device and requires_grad), to go on
        training a DyLoRA-trained file as DyLoRA."""
        where = dict(file=lora.file, key=lora.name)
        if lora.mid is not None or lora.dora_scale is not None or lora.scalar is not None:
            raise LycorisError("only a plain LoRA continues as DyLoRA (this one has a Tucker core, "
                               "DoRA or a scalar)", **where)
        if block_size < 1 or lora.rank % block_size:
            raise LycorisShapeError(f"rank {lora.rank} is not a multiple of the DyLoRA block size "
                                    f"{block_size} the file records", **where)
        self = cls()
        self.name, self.file = lora.name, lora.file
        self.block_size, self.blocks = block_size, lora.rank // block_size
        for i, (up, down) in enumerate(zip(lora.up.split(block_size, dim=1), lora.down.split(block_size))):
            self.register_parameter(f"down_{i}", nn.Parameter(down.detach().clone(), lora.down.requires_grad))
            self.register_parameter(f"up_{i}", nn.Parameter(up.detach().clone(), lora.up.requires_grad))
        self.alpha = float(lora.rank if lora.alpha in (None, 0) else lora.alpha)
        return self


def recorded_block_size(metadata: Mapping[str, str] | None) -> int | None:
    """The block size a file's `ss_network_args` records for `algo` dylora; None for other files."""
    try:
        args = json.loads((metadata or {}).get("ss_network_args") or "{}")
    except ValueError:
        return None
    if not isinstance(args, dict) or args.get("algo") != DyLoRA.algo:
        return None
    try:
        return int(args.get("block_size", 1))
    except (TypeError, ValueError):
        raise LycorisError(f"ss_network_args has block_size {args.get('block_size')!r}, not a number") from None


def as_dylora(adapters: Mapping[str, Adapter], metadata: Mapping[str, str] | None) -> dict[str, Adapter]:
    """`adapters` with every plain LoRA made a DyLoRA when the file's metadata says it was trained as
    one (so resuming goes on training nested blocks); other adapters, and other files, unchanged."""
    block = recorded_block_size(metadata)
    if block is None:
        return dict(adapters)
    return {name: DyLoRA.from_lora(a, block) if type(a) is LoRA else a for name, a in adapters.items()}


def _lora_suffix(key: str) -> str | None:
    """The LoRA factor suffix of a file key (`<module>.lora_up.weight` or a bare `lora_up.weight`)."""
    for suffix in ("lora_down.weight", "lora_up.weight", "lora_mid.weight"):
        if key == suffix or key.endswith("." + suffix):
            return suffix
    return None


def truncated(tensors: Mapping[str, torch.Tensor], rank: int, *, file: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA state dict (`<module>.lora_down/lora_up.weight`, `alpha`) cut to its first `rank` ranks.

    Alpha is kept, so each module's scale becomes alpha / rank: for a DyLoRA-trained file and a
    multiple of its block size, the LoRA it was trained as at that rank. Other keys are copied.
    """
    if rank < 1:
        raise LycorisError(f"cannot cut a LoRA to rank {rank}", file=file)
    out = {}
    for key, t in tensors.items():
        suffix = _lora_suffix(key)
        if suffix == "lora_mid.weight":
            raise LycorisError("a Tucker core cannot be cut by rank", file=file, key=key)
        axis = {"lora_down.weight": 0, "lora_up.weight": 1}.get(suffix)
        if axis is None:
            out[key] = t
            continue
        if t.shape[axis] < rank:
            raise LycorisShapeError(f"has rank {t.shape[axis]}, cannot cut it to rank {rank}",
                                    file=file, key=key)
        out[key] = t.narrow(axis, 0, rank).contiguous()
    return out
