"""Fresh trainable adapters for selected layers, and trainable copies of saved ones (resume).

Works over the algorithm registry: an algorithm is trainable when its class has a `create`
classmethod, and the layer kinds it trains are found by asking `create` for a tiny layer of each
kind, so new algorithms need no change here.
"""
from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algos import REGISTRY, Adapter
from ..algos.registry import TRAINING_ONLY
from ..errors import LycorisError
from ..layer import LayerSpec
from .targets import Target

_PROBES = {
    "linear": lambda: LayerSpec("linear", (16, 16), weight=torch.ones(16, 16)),
    "conv": lambda: LayerSpec("conv", (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1, torch.ones(16, 16, 3, 3)),
    "norm": lambda: LayerSpec("norm", (16,), weight=torch.ones(16), bias=torch.zeros(16),
                              norm_type="layer"),
}


@functools.lru_cache(maxsize=None)
def _kinds_of(cls: type) -> tuple[str, ...]:
    kinds = []
    for kind, spec in _PROBES.items():
        try:
            cls.create(spec(), **_accepted(cls, {"rank": 4}))
        except Exception:  # noqa: BLE001  (a probe: any refusal means "not this kind")
            continue
        kinds.append(kind)
    return tuple(kinds)


def layer_kinds(algo: str) -> tuple[str, ...]:
    """The layer kinds ("linear", "conv", "norm") that `algo` can train; empty if none."""
    cls = _algorithm(algo)
    if cls is None:
        raise LycorisError(f"unknown algorithm {algo!r} (known: {', '.join(sorted([*REGISTRY, *TRAINING_ONLY]))})")
    if not callable(getattr(cls, "create", None)):
        return ()
    return _kinds_of(cls)


def default_kinds(algo: str) -> tuple[str, ...]:
    """The layer kinds to select for `algo`: Linear/Conv when it trains them, else norm layers
    (norms are trained only by algorithms made for nothing else, as LyCORIS's `norm`)."""
    kinds = layer_kinds(algo)
    return tuple(k for k in kinds if k != "norm") or kinds


def trainable_algorithms() -> list[str]:
    """Registered algorithms that can be trained, in registry order."""
    return [name for name in (*REGISTRY, *TRAINING_ONLY) if layer_kinds(name)]


def _algorithm(algo: str) -> type | None:
    """The class of `algo`: a file-format algorithm or a training-only one (DyLoRA)."""
    return REGISTRY.get(algo) or TRAINING_ONLY.get(algo)


def _accepted(cls: type, options: Mapping[str, object]) -> dict[str, object]:
    """The subset of `options` that `cls.create` takes (by keyword)."""
    params = inspect.signature(cls.create).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params and k not in ("layer", "dtype")}


@dataclass
class Built:
    """What `create_adapters` made: name -> adapter, name -> module, and options each algorithm ignored."""

    adapters: dict[str, Adapter]
    modules: dict[str, nn.Module]
    ignored: dict[str, list[str]] = field(default_factory=dict)

    def pairs(self) -> list[tuple[nn.Module, Adapter]]:
        return [(self.modules[n], a) for n, a in self.adapters.items()]


def create_adapters(targets: Iterable[Target], algo: str, rank: int = 4, alpha: float | None = None, *,
                    conv_rank: int | None = None, conv_alpha: float | None = None,
                    device: torch.device | str | None = None,
                    dequantiser_for: Callable[[nn.Module], Callable | None] | None = None,
                    oft_blocks: int = 0, **options) -> Built:
    """A fresh adapter of `algo` (standard init, dW = 0, fp32, requires_grad) for every target.

    Convs with a spatial kernel use `conv_rank`/`conv_alpha` (default: the linear values). Options
    an algorithm's `create` does not take (e.g. `factor` for LoRA) are dropped and listed in
    `Built.ignored["options"]`; `None` options are left to the algorithm's default. Targets of a
    kind the algorithm cannot train are skipped (`ignored["layer kind"]`), and so are layers whose
    `create` refuses these settings (`ignored["cannot create"]`, with the reason; e.g. BOFT needs a
    block size that splits the channels). Raises when no adapter at all could be made.
    `dequantiser_for(module)` gives a dequantiser for layers with quantised storage (see
    `LayerSpec.dequantise`), so DoRA starts from the true weight norm.
    `oft_blocks` > 0 gives Diag-OFT a fixed number of blocks per layer (block size = output
    channels / blocks) instead of a fixed block size (`rank`); layers it does not divide are left out.
    """
    cls = _algorithm(algo)
    if cls is None or not layer_kinds(algo):
        raise LycorisError(f"algorithm {algo!r} cannot be trained (trainable: "
                           f"{', '.join(trainable_algorithms())})")
    kinds = layer_kinds(algo)
    given = {k: v for k, v in options.items() if v is not None}
    accepted = _accepted(cls, {"rank": rank, "alpha": alpha, **given})
    ignored = {"options": sorted(k for k in given if k not in accepted)}
    skipped: list[str] = []
    unfit: list[str] = []
    built = Built({}, {}, ignored)
    for t in targets:
        if t.kind not in kinds:
            skipped.append(t.name)
            continue
        spec = LayerSpec.from_module(t.module)
        spec.dequantise = dequantiser_for(t.module) if dequantiser_for is not None else None
        kw = dict(accepted)
        if t.kernel_is_spatial:
            if "rank" in kw and conv_rank:
                kw["rank"] = conv_rank
            if "alpha" in kw and conv_alpha is not None:
                kw["alpha"] = conv_alpha
        try:
            adapter = cls.create(spec, **kw)
            if oft_blocks:
                _set_block_count(adapter, oft_blocks)
        except LycorisError as exc:
            unfit.append(f"{t.name} ({spec.kind} {list(spec.weight_shape)}): {exc.reason}")
            continue
        adapter.name = t.name
        if device is not None:
            adapter.to(device)
        built.adapters[t.name] = adapter
        built.modules[t.name] = t.module
    if skipped:
        built.ignored["layer kind"] = skipped
    if unfit:
        built.ignored["cannot create"] = unfit
    if not built.adapters:
        if unfit:
            raise LycorisError(f"{algo} fits none of the {len(unfit)} selected layers with these "
                               f"settings; first: {unfit[0]}")
        raise LycorisError(f"no layer to train: {algo} trains {'/'.join(kinds)} layers and the "
                           "selection holds none")
    return built


def _set_block_count(adapter: Adapter, blocks: int) -> None:
    """Re-lay a fresh Diag-OFT's zero blocks as `blocks` blocks of out_dim / blocks channels."""
    current = getattr(adapter, "oft_blocks", None)
    if current is None or current.ndim != 3:
        raise LycorisError(f"a fixed number of blocks applies to diag-oft only, not {adapter.algo}")
    n, b, _ = current.shape
    out_dim = n * b
    if blocks < 1 or out_dim % blocks:
        raise LycorisError(f"{blocks} blocks do not split {out_dim} output channels")
    size = out_dim // blocks
    adapter.set_tensor("oft_blocks", torch.zeros(blocks, size, size, dtype=current.dtype,
                                                 device=current.device), True)


def trainable_copy(adapter: Adapter, device: torch.device | str | None = None) -> Adapter:
    """A deep copy of a loaded adapter with fp32 parameters that require grad (the source is untouched)."""
    new = copy.deepcopy(adapter)
    new.clear_cache()
    new.to(device=device, dtype=torch.float32)
    for p in new.parameters():
        p.requires_grad_(p.is_floating_point())
    return new


def resume_adapters(saved: Mapping[str, Adapter], modules: Mapping[str, nn.Module], *,
                    device: torch.device | str | None = None) -> tuple[Built, list[str]]:
    """Trainable copies of `saved` adapters for the layers `modules` names; (built, names not found).

    `modules` maps every name a saved module may carry to its layer (a host may know several
    names for one layer). Each adapter keeps its saved name, so the result saves the same keys.
    """
    built = Built({}, {})
    missing = []
    for name, adapter in saved.items():
        module = modules.get(name)
        if module is None:
            missing.append(name)
            continue
        adapter.check_target(module.weight.shape)
        copy_ = trainable_copy(adapter, device)
        copy_.name = name
        built.adapters[name] = copy_
        built.modules[name] = module
    if not built.adapters:
        raise LycorisError(f"none of the {len(saved)} saved modules matches a layer of this model "
                           f"(first: {next(iter(saved), '-')})")
    return built, missing


def scalar_parameters(adapters: Mapping[str, Adapter]) -> dict[str, dict[str, torch.Tensor]]:
    """For every adapter with a trainable scalar, its parameters as trained (CPU copies).

    A saved file holds the scalar baked into the factors. Training cannot continue exactly from
    that product: the optimizer's moments belong to the scalar and the unscaled factors, and the
    gradients differ between the two parameterisations. A resume state keeps these instead."""
    return {name: {k: p.detach().cpu().clone() for k, p in a.named_parameters()}
            for name, a in adapters.items() if a.scalar is not None}


def restore_scalar(adapter: Adapter, parameters: Mapping[str, torch.Tensor]) -> None:
    """Give a resumed copy of a `use_scalar` adapter back the scalar and unscaled factors it was
    trained with (from `scalar_parameters`), after checking that they export to the tensors it
    was loaded with (so they belong to this file)."""
    loaded = {k: t.clone() for k, t in adapter.export().items()}  # export shares the factors' storage
    if "scalar" not in parameters:
        raise LycorisError("the saved parameters hold no scalar", key=adapter.name)
    device = next(adapter.parameters()).device
    adapter.scalar = nn.Parameter(torch.zeros((), dtype=torch.float32, device=device))
    own = dict(adapter.named_parameters())
    if set(own) != set(parameters):
        raise LycorisError(f"the saved parameters ({', '.join(sorted(parameters))}) are not this "
                           f"{adapter.algo} adapter's ({', '.join(sorted(own))})", key=adapter.name)
    with torch.no_grad():
        for name, value in parameters.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise LycorisError(f"saved {name} has shape {list(value.shape)}, the adapter's "
                                   f"{list(own[name].shape)}", key=adapter.name)
            own[name].copy_(value)
    adapter.clear_cache()
    for suffix, tensor in adapter.export().items():
        want = loaded[suffix].float()
        if not torch.allclose(tensor.float(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max())):
            raise LycorisError(f"the saved scalar and factors do not give the adapter's {suffix}: they "
                               "belong to another file", key=adapter.name)


def freeze(adapters: Mapping[str, Adapter]) -> None:
    """Finish training: no grad, drop cached factors, ready for merge/bypass/export."""
    for a in adapters.values():
        a.requires_grad_(False)
        a.clear_cache()
