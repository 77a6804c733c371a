"""Run adapters around layers without touching their weights, and checkpoint blocks for training.

`attached` replaces each target module's `forward` (an instance attribute, so the class and every
other instance are untouched) by the adapter's bypass around the original forward, and puts the
original back on exit. The base weight is only read, never written, so frozen fp16/bf16 bases,
fp8 and other quantised layers whose own forward dequantises all work; the host's own forward
(weight casting, offloading) still runs for the base path.

`activations_copied` lets autograd run through inference code that updates activations in place
(a DiT's residual `x += ...` after `norm(x)` saved x): every activation autograd saves is copied
when saved. `autograd_safe` makes tensors created under `torch.inference_mode()` (as a host that loads models
inside inference mode produces) usable by autograd, once, with the same values; `frozen` keeps the
base model's parameters out of autograd while training. Adapters that read the dense weight in
bypass (DoRA's norm; the dense fallback of unusual layouts) take `module.weight` as the host stores
it, so there it must be a plain float tensor (fp8 is upcast; packed quantised formats are not).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..algos import Adapter
from ..layer import LayerSpec

_MISSING = object()


def _install(module: nn.Module, forward) -> object:
    """Set an instance-level forward; return what was there before (or _MISSING)."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    return previous


def _restore(module: nn.Module, previous: object) -> None:
    if previous is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def _bypass_forward(module: nn.Module, adapter: Adapter, strength: float, regularizer,
                    dequantiser_for):
    original = module.forward
    spec = LayerSpec.from_module(module)
    spec.dequantise = dequantiser_for(module) if dequantiser_for is not None else None

    def forward(x, *args, **kwargs):
        base = original if not (args or kwargs) else (lambda t: original(t, *args, **kwargs))
        # the host may swap the parameter objects (device moves, lowvram): read them per call
        spec.weight = getattr(module, "weight", None)
        spec.bias = getattr(module, "bias", None)
        if regularizer is not None and regularizer.active and torch.is_grad_enabled():
            return regularizer.forward(x, base, adapter, strength, spec)
        return adapter.bypass(x, base, strength, spec)

    return forward


@contextmanager
def attached(pairs: Iterable[tuple[nn.Module, Adapter]], *, strength: float = 1.0,
             regularizer=None, dequantiser_for=None) -> Iterator[None]:
    """Within the block, each module computes `adapter.bypass(x, original forward, strength)`.

    `regularizer` (e.g. `loop.Dropout`) is applied while grad is enabled. Modules are restored on
    exit, also after an exception; nest with other forward wrappers in LIFO order.
    `dequantiser_for(module)` gives a dequantiser for quantised storage (`LayerSpec.dequantise`).
    """
    done: list[tuple[nn.Module, object]] = []
    seen: set[int] = set()
    try:
        for module, adapter in pairs:
            if id(module) in seen:
                raise ValueError(f"module {type(module).__name__} given twice ({adapter.name})")
            seen.add(id(module))
            forward = _bypass_forward(module, adapter, strength, regularizer, dequantiser_for)
            done.append((module, _install(module, forward)))
        yield
    finally:
        for module, previous in reversed(done):
            _restore(module, previous)


def checkpoint_blocks(root: nn.Module) -> list[nn.Module]:
    """The outermost modules with parameters below `root`, looking through containers.

    ModuleList, ModuleDict and Sequential (including subclasses such as an LDM UNet's
    TimestepEmbedSequential, whose forward the UNet does not call) are opened; everything else
    with parameters is a block.
    """
    blocks = []
    for child in root.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            blocks.extend(checkpoint_blocks(child))
        elif any(True for _ in child.parameters()):
            blocks.append(child)
    return blocks


class _Recomputed(torch.autograd.Function):
    """A block run that keeps none of its activations; backward runs the block again with grad and
    backpropagates through that second run (checkpointing in the reentrant style).

    Torch's non-reentrant checkpoint keeps the tensors its recomputation saves by reference, so a
    block that updates one of them in place afterwards (a DiT's `x += f(norm(x))`) gets wrong
    gradients silently. Here the second run builds an ordinary graph, whose version counters catch
    such an update (the trainer then switches `activations_copied` on, which this recomputation
    honours). The first run records a graph too, with every saved tensor dropped, so code that asks
    `torch.is_grad_enabled()` (dropouts, DyLoRA's draw, un-cached factors) behaves as in training."""

    @staticmethod
    def forward(ctx, call, anchor, *tensors):
        ctx.call, ctx.rng = call, _rng_state(tensors)
        ctx.set_materialize_grads(False)  # an unused output passes None: its branch gets no gradient
        ctx.save_for_backward(*tensors)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):
            outputs = tuple(o.detach() for o in call(*tensors))
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        cpu, devices = ctx.rng
        with torch.random.fork_rng(devices=list(devices)), torch.enable_grad(), _copies_if_on():
            torch.set_rng_state(cpu)
            for device, state in devices.items():
                torch.cuda.set_rng_state(state, device)
            outputs = ctx.call(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, *[t.grad if t.requires_grad else None for t in inputs])


def _drop(tensor: torch.Tensor) -> None:
    return None


def _dropped(_) -> torch.Tensor:
    raise RuntimeError("internal: a checkpointed block's first run was backpropagated")


def _rng_state(tensors) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The CPU generator and those of the CUDA devices the block runs on: what dropouts draw from."""
    cuda = {t.device.index or 0 for t in tensors if t.device.type == "cuda"}
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in sorted(cuda)}


def _tensors_in(value, found: list) -> object:
    """`value` with every tensor inside it (lists, tuples, named tuples, dicts, dataclasses) replaced
    by its index in `found`, where it is appended; the inverse is `_filled`."""
    if isinstance(value, torch.Tensor):
        found.append(value)
        return _Slot(len(found) - 1)
    if isinstance(value, (list, tuple)):
        items = [_tensors_in(v, found) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((k, _tensors_in(v, found)) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # e.g. Flux/Chroma's modulation vectors (ModulationOut) handed to every block
        changes = {f.name: _tensors_in(getattr(value, f.name), found) for f in dataclasses.fields(value)
                   if f.init}
        return _Frozen(value, changes)
    return value


class _Slot(int):
    """Where a tensor was in a structure given to `_tensors_in`."""


class _Frozen:
    """A dataclass instance with its tensor fields taken out (see `_tensors_in`)."""

    def __init__(self, original, changes: dict):
        self.original, self.changes = original, changes


def _filled(template, tensors) -> object:
    if isinstance(template, _Slot):
        return tensors[template]
    if isinstance(template, (list, tuple)):
        items = [_filled(v, tensors) for v in template]
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    if isinstance(template, dict):
        return type(template)((k, _filled(v, tensors)) for k, v in template.items())
    if isinstance(template, _Frozen):
        return dataclasses.replace(template.original, **{k: _filled(v, tensors) for k, v in template.changes.items()})
    return template


def _checkpointed_forward(module: nn.Module):
    original = module.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        inputs: list[torch.Tensor] = []
        template = _tensors_in((args, kwargs), inputs)
        result = {}

        def call(*tensors):
            # a block that updates its inputs in place must not change the saved ones
            a, kw = _filled(template, [t.clone() for t in tensors])
            outputs: list[torch.Tensor] = []
            result["template"] = _tensors_in(original(*a, **kw), outputs)
            return tuple(outputs)

        anchor = torch.empty(0, requires_grad=True)  # backward runs even when no input needs grad
        outputs = _Recomputed.apply(call, anchor, *inputs)
        return _filled(result["template"], outputs)

    return forward


@contextmanager
def checkpointed(blocks: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, `blocks` keep no activations and run again in backward (`_Recomputed`:
    RNG state replayed, so dropout masks match; exact also for blocks that update activations in
    place). Restored on exit."""
    done: list[tuple[nn.Module, object]] = []
    try:
        for module in blocks:
            done.append((module, _install(module, _checkpointed_forward(module))))
        yield
    finally:
        for module, previous in reversed(done):
            _restore(module, previous)


def _pack(t: torch.Tensor):
    """A saved tensor as autograd keeps it: results of recorded ops copied; other tensors (weights,
    inputs) by reference with their version, so an in-place change is still caught."""
    return t.clone() if t.grad_fn is not None else (t, t._version)


def _unpack(saved) -> torch.Tensor:
    if not isinstance(saved, tuple):
        return saved
    t, version = saved
    if t._version != version:
        raise RuntimeError(f"a {tuple(t.shape)} tensor saved for backward was changed in place "
                           "before backward (one without autograd history, so it was not copied)")
    return t


_copying = 0  # activations_copied blocks open: checkpointed blocks copy in their second run too


@contextmanager
def activations_copied() -> Iterator[None]:
    """Within the block, tensors saved for backward that come out of recorded ops are copied when
    saved, so code that later updates them in place (`x += f(norm(x))`) cannot invalidate them.
    Costs a copy of each saved activation (up to twice their memory without checkpointing)."""
    global _copying
    _copying += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _copying -= 1


@contextmanager
def _copies_if_on() -> Iterator[None]:
    """`activations_copied` for a checkpointed block's second run (in backward, which may run on
    another thread) when the training step asked for copies."""
    if _copying:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    else:
        yield


@contextmanager
def frozen(*roots: nn.Module) -> Iterator[None]:
    """Within the block, no parameter below `roots` requires grad (the base model: autograd then
    stops at the earliest adapter instead of computing weight gradients for every layer); the
    previous flags are restored on exit."""
    params = [p for root in roots for p in root.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    """Quantised weights held as wrapper tensor subclasses (e.g. a host's QuantizedTensor)."""
    return callable(getattr(type(t), "__tensor_flatten__", None))


@contextmanager
def wrapper_weights_kept(root: nn.Module):
    """Put back the frozen wrapper-subclass parameters (quantised weights) that a host replaced
    while training ran outside inference mode: its copies made there break detach() inside
    inference mode, where the rest of the graph runs (the values never change: they are frozen)."""
    kept = [(m, n, p) for m in root.modules() for n, p in m.named_parameters(recurse=False)
            if _is_wrapper_subclass(p)]
    try:
        yield
    finally:
        for module, name, param in kept:
            module._parameters[name] = param


def autograd_safe(*roots: nn.Module) -> int:
    """Replace inference-mode parameters and buffers below `roots` by normal copies (same values,
    same names, new Parameter objects); return how many were replaced.

    Tensors made under `torch.inference_mode()` cannot be saved for backward, and a frozen layer
    saves its weight to pass gradients on to earlier adapters. Call outside inference mode.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("autograd_safe must run outside torch.inference_mode()")
    count = 0
    with torch.no_grad():
        for root in roots:
            for module in root.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if _is_wrapper_subclass(p):
                        # frozen quantised storage is only dequantised, never saved for backward;
                        # a normal copy of one breaks its own detach() under inference mode
                        continue
                    if p.is_inference():
                        # a new Parameter: setting `.data` leaves the object flagged as inference
                        module._parameters[name] = nn.Parameter(p.data.clone(), requires_grad=p.requires_grad)
                        count += 1
                for name, b in list(module.named_buffers(recurse=False)):
                    if b is not None and b.is_inference():
                        module._buffers[name] = b.clone()
                        count += 1
    return count
