"""Optimiser, learning-rate schedule, parameter groups, dropouts and the training step.

Nothing here knows about diffusion or a host: the caller supplies a function that returns the loss
for one step, with the adapters attached (see `attach.attached`).

Weight decay skips parameters that must not be pulled towards zero: DoRA magnitudes
(`dora_scale`, initialised to the norm of W), OFT `rescale` (initialised to 1), trainable scalars,
and the dense deltas of `full` and `norm` adapters (LyCORIS decays them all, see
lycoris-formats.md section 6). An Adapter class may name more in a `no_decay` class attribute.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..algos import Adapter
from ..errors import LycorisError
from ..layer import LayerSpec



@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimiser class lives, the pip package that provides it, and keywords it always
    gets (e.g. Adafactor with a fixed learning rate instead of its own relative step)."""

    module: str
    attr: str
    package: str | None = None  # None: part of torch
    defaults: tuple[tuple[str, object], ...] = ()

    def load(self, name: str) -> type[torch.optim.Optimizer]:
        """The optimiser class; a LycorisError naming the package to install when it is missing."""
        try:
            return getattr(importlib.import_module(self.module), self.attr)
        except ImportError as exc:
            raise LycorisError(f"optimizer {name} needs the package {self.package!r}, which is not "
                               f"installed here: pip install {self.package} ({exc})") from None


# every optimiser offered; the optional ones are listed always and explain themselves when missing
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "AdamW": OptimizerSpec("torch.optim", "AdamW"),
    "Adam": OptimizerSpec("torch.optim", "Adam"),
    "SGD": OptimizerSpec("torch.optim", "SGD"),
    "RMSprop": OptimizerSpec("torch.optim", "RMSprop"),
    "AdamW8bit": OptimizerSpec("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Adafactor": OptimizerSpec("transformers.optimization", "Adafactor", "transformers",
                               (("relative_step", False), ("scale_parameter", False),
                                ("warmup_init", False))),
    "Prodigy": OptimizerSpec("prodigyopt", "Prodigy", "prodigyopt"),
}
SCHEDULES = ("constant", "cosine")
NO_DECAY_NAMES = frozenset({"dora_scale", "rescale", "scalar"})
NO_DECAY_ALGOS = frozenset({"full", "norm"})


def decays(adapter: Adapter, param_name: str) -> bool:
    """Whether weight decay applies to this parameter of this adapter."""
    if adapter.algo in NO_DECAY_ALGOS:
        return False
    leaf = param_name.rsplit(".", 1)[-1]
    return leaf not in NO_DECAY_NAMES and leaf not in getattr(adapter, "no_decay", ())


def param_groups(adapters: Mapping[str, Adapter], weight_decay: float = 0.0,
                 lrs: Mapping[str, float] | None = None) -> list[dict]:
    """Optimiser groups: decayed and not decayed, and per learning rate when `lrs` gives some
    adapters (by name) their own (e.g. the text encoder's); empty groups left out. Groups with
    their own rate carry an "lr" key; the others take the optimiser's."""
    lrs = lrs or {}
    buckets: dict[tuple, list] = {}
    for name, adapter in adapters.items():
        for pname, p in adapter.named_parameters():
            if p.requires_grad:
                buckets.setdefault((lrs.get(name), decays(adapter, pname)), []).append(p)
    if not buckets:
        raise LycorisError("no trainable parameter in the adapters")
    groups = []
    for (lr, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] is not None, not kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups


FUSED = frozenset({"Adam", "AdamW"})  # fused SGD is much slower on CPU in torch 2.x


def _fused_devices() -> tuple[str, ...]:
    """Device types with fused Adam kernels in this torch (CPU since 2.4)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return ("cuda", "cpu") if (major, minor) >= (2, 4) else ("cuda",)


def make_optimizer(adapters: Mapping[str, Adapter], name: str = "AdamW", lr: float = 1e-4,
                   weight_decay: float = 0.0, lrs: Mapping[str, float] | None = None,
                   **kwargs) -> torch.optim.Optimizer:
    """One of OPTIMIZERS over the adapters' trainable parameters, with the no-decay group split off
    and adapters named in `lrs` in groups of their own learning rate.

    Adam/AdamW use torch's fused kernels (one kernel for all parameters, ~5x faster than the loop)
    when every parameter is a float tensor on CPU or CUDA, unless `fused` is given.
    """
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise LycorisError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    cls = spec.load(name)
    kwargs = {**dict(spec.defaults), **kwargs}
    groups = param_groups(adapters, weight_decay, lrs)
    params = [p for g in groups for p in g["params"]]
    if name in FUSED and "fused" not in kwargs and all(
            p.is_floating_point() and p.device.type in _fused_devices() for p in params):
        kwargs["fused"] = True
    return cls(groups, lr=lr, **kwargs)


def lr_factor(step: int, total: int, schedule: str = "constant", warmup: int = 0) -> float:
    """Learning-rate multiplier at `step` (0-based): linear warm-up over `warmup` steps, then
    constant or a cosine decay to 0 at `total`."""
    if schedule not in SCHEDULES:
        raise LycorisError(f"unknown lr schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Dropout:
    """Training-time regularisers applied around each adapter's contribution.

    - `module_dropout`: with this probability an adapter is skipped for one forward call.
    - `rank_dropout`: zero the adapter's change on a random subset of output channels (one draw per
      call; LyCORIS's "drop rows of dW" for LoHa/LoKr/full, applied to any algorithm), divided by
      the kept fraction when `rank_dropout_scale`.
    - `dropout`: element-wise dropout on the adapter's change to the layer output.
    Random draws use torch's global generator, so activation checkpointing replays them exactly.
    """

    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise LycorisError(f"{name} must be in [0, 1), found {p}")

    @property
    def active(self) -> bool:
        return self.enabled and (self.dropout > 0 or self.rank_dropout > 0 or self.module_dropout > 0)

    def forward(self, x: torch.Tensor, base_forward: Callable, adapter: Adapter, strength: float,
                layer: LayerSpec) -> torch.Tensor:
        """The adapted layer's output with the regularisers applied."""
        if self.module_dropout > 0 and float(torch.rand(())) < self.module_dropout:
            return base_forward(x)
        if self.dropout == 0 and self.rank_dropout == 0:
            return adapter.bypass(x, base_forward, strength, layer)
        first: list[torch.Tensor] = []

        def base_once(t):
            y = base_forward(t)
            if not first:
                first.append(y)
            return y

        out = adapter.bypass(x, base_once, strength, layer)
        y = first[0]
        delta = out - y
        if self.rank_dropout > 0:
            axis = 1 if layer.kind == "conv" or layer.norm_type == "group" else delta.ndim - 1
            keep = (torch.rand(delta.shape[axis], device=delta.device) >= self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp_min(1e-6)
            shape = [1] * delta.ndim
            shape[axis] = -1
            delta = delta * keep.reshape(shape)
        if self.dropout > 0:
            delta = F.dropout(delta, self.dropout, training=True)
        return y + delta


class Trainer:
    """Optimiser + schedule + gradient clipping (+ fp16 loss scaling) over a set of adapters.

    With `accumulation` N each `step` calls the loss function N times and backpropagates each loss
    divided by N before one optimiser update: for a loss that is a mean over its batch, N calls on
    batches of b samples give the gradient of one batch of N*b samples.
    `lrs` gives adapters (by name) their own learning rate (same schedule), e.g. a text encoder's.
    """

    def __init__(self, adapters: Mapping[str, Adapter], *, steps: int, lr: float = 1e-4,
                 optimizer: str = "AdamW", weight_decay: float = 0.0, schedule: str = "constant",
                 warmup_steps: int = 0, max_grad_norm: float = 0.0, loss_scaling: bool = False,
                 accumulation: int = 1, optimizer_kwargs: Mapping[str, object] | None = None,
                 lrs: Mapping[str, float] | None = None):
        if accumulation < 1:
            raise LycorisError(f"gradient accumulation must be >= 1, found {accumulation}")
        self.adapters = adapters
        self.steps = steps
        self.accumulation = accumulation
        self.optimizer = make_optimizer(adapters, optimizer, lr, weight_decay, lrs=lrs,
                                        **(optimizer_kwargs or {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps, schedule, warmup_steps))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.max_grad_norm = max_grad_norm
        device = self.params[0].device.type
        self.scaler = torch.amp.GradScaler(device) if loss_scaling else None
        self.step_count = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """One optimiser step on the loss `loss_fn()` returns (averaged over `accumulation` calls);
        the loss as a float.

        Raises LycorisError (naming the step) when a loss is NaN or Inf, before any update.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.accumulation):
            loss = loss_fn()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LycorisError(f"loss is {value} at step {self.step_count + 1}: lower the learning "
                                   "rate or use a wider training dtype")
            total += value
            if self.accumulation > 1:
                loss = loss / self.accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return total / self.accumulation

    # ----- state, keyed by parameter name so a resumed run may list its adapters in any order -----
    def named_parameters(self) -> dict[str, torch.Tensor]:
        """Every trained parameter by `<adapter name>.<parameter name>`."""
        out = {}
        for name, adapter in self.adapters.items():
            for pname, p in adapter.named_parameters():
                if p.requires_grad:
                    out[f"{name}.{pname}"] = p
        return out

    def state_dict(self) -> dict:
        """Optimiser state per parameter name, the schedule position and the loss scaler: what a
        resumed run needs to continue exactly (tensors on the CPU)."""
        ids = {id(p): n for n, p in self.named_parameters().items()}
        per_param = {ids[id(p)]: {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                                  for k, v in st.items()}
                     for p, st in self.optimizer.state.items() if id(p) in ids}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"step": self.step_count, "param_state": per_param, "groups": groups,
                "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state_dict()` of an earlier run with the same adapters (in any order)."""
        named = self.named_parameters()
        saved = state["param_state"]
        missing = sorted(n for n in named if n not in saved)
        if missing and saved:
            raise LycorisError(f"the optimizer state has no entry for {len(missing)} trainable "
                               f"parameters (first: {missing[0]})")
        index = {id(p): i for i, p in enumerate(self.params)}
        current = self.optimizer.state_dict()
        current["state"] = {index[id(p)]: dict(saved[name]) for name, p in named.items() if name in saved}
        current["param_groups"] = [{**saved_group, "params": group["params"]}
                                   for group, saved_group in zip(current["param_groups"], state["groups"])]
        self.optimizer.load_state_dict(current)  # torch moves each state to its parameter's device
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
