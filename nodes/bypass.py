"""Bypass mode: adapters run beside the untouched layer, through one pack-owned injection.

Each ModelPatcher carries a `BypassRegistry` attachment (module path -> stacked entries); loaders
never change a registry, they attach a new one with their entries appended, so clones keep their
own view and stacking adds instead of replacing. One PatcherInjection under `INJECTION_KEY` installs
one forward wrapper per module when the host injects (after weights are loaded) and removes it on
eject. Works on hosts without a bypass of their own; never touches the weight, so fp8, GGUF and
other quantised storage keep working.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import comfy.utils
import torch
from comfy.patcher_extension import PatcherInjection

from ..lycoris_core import LayerSpec
from .host_compat import (cast_bias, dequantiser, dequantiser_for,  # noqa: F401 - re-exported
                          storage_reason, weight_is_cast_per_forward)
from .schedule import add_step_wrapper, current_percent

INJECTION_KEY = "lycoris_bypass"
ATTACHMENT_KEY = "lycoris_bypass"


@dataclass(frozen=True)
class BypassEntry:
    adapter: object
    strength: float
    offset: tuple[int, int, int] | None  # output rows (dim 0) of a fused weight, or None
    name: str
    schedule: object = None  # StrengthSchedule: strength multiplier per sampling percent, or None


class BypassRegistry:
    """Immutable per-patcher registry: module path -> entries, in the order loaders added them."""

    def __init__(self, entries: dict[str, tuple[BypassEntry, ...]] | None = None):
        self.entries = dict(entries or {})

    def with_entries(self, items: Iterable[tuple[str, BypassEntry]]) -> "BypassRegistry":
        new = dict(self.entries)
        for path, entry in items:
            new[path] = new.get(path, ()) + (entry,)
        return BypassRegistry(new)

    def on_model_patcher_clone(self) -> "BypassRegistry":
        return self  # never mutated: sharing is safe

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


def quantised_reason(root: torch.nn.Module, key: str) -> str | None:
    """Why the weight at `key` cannot be merged exactly (see `storage_reason`), or None."""
    path, name = key.rsplit(".", 1)
    return storage_reason(comfy.utils.get_attr(root, path), name)


def bypass_unsupported(target, root: torch.nn.Module) -> str | None:
    """Why this target cannot be bypassed (so it must be merged), or None."""
    if target.function is not None:
        return "the host transforms this weight's change"
    if target.offset is not None and target.offset[0] != 0:
        return "slice along the input axis"
    try:
        module = comfy.utils.get_attr(root, target.module_path)
    except AttributeError:
        return "no module at this path"
    if not isinstance(module, torch.nn.Module) or getattr(module, "weight", None) is None:
        return "not a layer with a weight"
    return None


# ----- the wrapper ---------------------------------------------------------------------------------
def _slice_layer(layer: LayerSpec, start: int, length: int) -> LayerSpec:
    shape = (length,) + tuple(layer.weight_shape[1:])
    weight = None if layer.weight is None else layer.weight.narrow(0, start, length)
    bias = None if layer.bias is None else layer.bias.narrow(0, start, length)
    whole = layer.dequantise
    rows = None if whole is None else (lambda device: whole(device).narrow(0, start, length))
    return dataclasses.replace(layer, weight_shape=shape, weight=weight, bias=bias, dequantise=rows)


def _after(layer: LayerSpec, earlier: tuple[BypassEntry, ...]) -> LayerSpec:
    """The layer as an adapter stacked after `earlier` sees it: its weight patched by them in
    order, as merge patches are applied (a DoRA norm of W + dW_1 + ... + dW_i, not of W + dW_i)."""
    def patched(device: torch.device) -> torch.Tensor:
        w = layer.dense_weight(device)
        for entry in earlier:
            if entry.offset is None:
                w = entry.adapter.merge(w, entry.strength)
            else:
                _, start, length = entry.offset
                w = w.clone()  # may still be the stored weight itself: never write into it
                rows = w.narrow(0, start, length)
                rows.copy_(entry.adapter.merge(rows, entry.strength))
        return w

    tag = tuple((id(e.adapter), e.strength, e.offset) for e in earlier)
    return dataclasses.replace(layer, dequantise=patched, weight_tag=tag)


def _stage(entry: BypassEntry, inner, layer: LayerSpec):
    """One adapter around `inner` (the layer's forward with earlier adapters already applied)."""
    adapter, m = entry.adapter, entry.strength
    if entry.offset is None:
        return lambda x: adapter.bypass(x, inner, m, layer)
    _, start, length = entry.offset
    sub = _slice_layer(layer, start, length)
    axis = -1 if layer.kind == "linear" else 1

    def sliced(x):
        full = inner(x)

        def part(u):
            return (full if u is x else inner(u)).narrow(axis, start, length)

        new = adapter.bypass(x, part, m, sub)
        total = full.shape[axis]
        pieces = [full.narrow(axis, 0, start), new.to(full.dtype),
                  full.narrow(axis, start + length, total - start - length)]
        return torch.cat(pieces, dim=axis)

    return sliced


class BypassForward:
    """Installed as `module.forward`: the original forward plus every stacked adapter."""

    def __init__(self, module: torch.nn.Module, entries: tuple[BypassEntry, ...]):
        self.module = module
        self.entries = entries
        previous = module.__dict__.get("forward")
        while isinstance(previous, BypassForward):  # a stale wrapper left by someone else's eject
            previous = previous.original
        self.original = previous  # an instance-level forward we wrap, or None for the class one
        self.active = True
        # adapters that read W (DoRA, set_weight, dense fallbacks) must see the dequantised weight
        self.dequantise = dequantiser_for(module)
        # lowvram / dynamic VRAM: the stored bias may miss other loaders' patches or not be loaded
        self.reads_cast_bias = weight_is_cast_per_forward(module) and any(
            e.adapter.depends_on_weight for e in entries)
        self.scheduled = any(e.schedule is not None for e in entries)

    def _entries_now(self) -> tuple[BypassEntry, ...]:
        """The entries at this step's strengths: scheduled ones scaled, those at 0 left out."""
        percent = current_percent() if self.scheduled else None
        if percent is None:
            return self.entries
        now = (e if e.schedule is None else
               dataclasses.replace(e, strength=e.strength * e.schedule.factor(percent))
               for e in self.entries)
        return tuple(e for e in now if e.strength != 0)

    def _base(self):
        if self.original is not None:
            return self.original
        return type(self.module).forward.__get__(self.module)

    def __call__(self, x, *args, **kwargs):
        base = self._base()
        entries = self._entries_now() if self.active else ()
        if not entries:
            return base(x, *args, **kwargs)

        def fwd(t):
            return base(t, *args, **kwargs)

        layer = LayerSpec.from_module(self.module)
        layer.dequantise = self.dequantise
        if self.reads_cast_bias:
            layer.bias = cast_bias(self.module, x.device)
        for i, entry in enumerate(entries):
            reads_weight = i > 0 and entry.adapter.depends_on_weight
            fwd = _stage(entry, fwd, _after(layer, entries[:i]) if reads_weight else layer)
        return fwd(x)

    def install(self) -> None:
        self.module.forward = self

    def remove(self) -> None:
        self.active = False
        if self.module.__dict__.get("forward") is self:
            if self.original is None:
                del self.module.forward
            else:
                self.module.forward = self.original


# wrappers currently installed, per underlying torch model (shared by all its clones)
_INSTALLED: "weakref.WeakKeyDictionary[torch.nn.Module, list[BypassForward]]" = weakref.WeakKeyDictionary()


def _eject(patcher) -> None:
    """Remove every wrapper of ours from the patcher's model (idempotent)."""
    for wrapper in _INSTALLED.pop(patcher.model, []):
        wrapper.remove()
        for entry in wrapper.entries:
            entry.adapter.clear_cache()  # device copies of factors go with the load


def _inject(patcher) -> None:
    _eject(patcher)
    registry = patcher.get_attachment(ATTACHMENT_KEY)
    if not registry:
        return
    installed = []
    for path, entries in registry.entries.items():
        wrapper = BypassForward(comfy.utils.get_attr(patcher.model, path), entries)
        wrapper.install()
        installed.append(wrapper)
    _INSTALLED[patcher.model] = installed


def add_bypass(patcher, items: Iterable[tuple]) -> int:
    """Stack `(target, strength)` or `(target, strength, schedule)` items onto a (cloned)
    ModelPatcher's bypass registry."""
    registry = patcher.get_attachment(ATTACHMENT_KEY) or BypassRegistry()
    entries = [(t.module_path, BypassEntry(t.adapter, s, t.offset, t.name, *rest))
               for t, s, *rest in items]
    if any(entry.schedule is not None for _, entry in entries):
        add_step_wrapper(patcher)
    patcher.set_attachments(ATTACHMENT_KEY, registry.with_entries(entries))
    patcher.set_injections(INJECTION_KEY, [PatcherInjection(inject=_inject, eject=_eject)])
    return len(entries)
