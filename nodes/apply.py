"""`apply_lycoris`: adapters onto a MODEL and/or CLIP, merged or bypassed, validated before any patch."""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import comfy.utils
import torch

from ..lycoris_core import LycorisError, LycorisOverflowError, LycorisShapeError
from .bypass import add_bypass, bypass_unsupported, quantised_reason
from .host_compat import dequantiser, stored_float_dtype
from .keymap import CLIP, MODEL, KeyMap, Target
from .merge_patch import add_merge_patches
from .report import build_report, grouped, part_line

log = logging.getLogger("comfyui-lycoris")

MODES = ("auto", "merge", "bypass")
MAX_LISTED_ERRORS = 10


@dataclass
class _Planned:
    target: Target
    strength: float
    method: str  # "merge" | "bypass"
    with_bias: bool  # merge: also patch the bias key
    schedule: object = None  # bypassed model targets of a scheduled item: StrengthSchedule


def _label(adapters) -> str:
    path = getattr(adapters, "path", None)
    return os.path.basename(path) if path else "adapters"


def _logical_shape(tensor) -> tuple[int, ...]:
    """A weight's shape as the model sees it (GGUF tensors keep it in `tensor_shape`)."""
    return tuple(getattr(tensor, "tensor_shape", None) or tensor.shape)


def _tensor_at(root, key: str | None):
    """The live tensor at `key` (not a state_dict() entry: quantised layers may export placeholders
    of another shape there), or None."""
    if key is None:
        return None
    try:
        value = comfy.utils.get_attr(root, key)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _target_shape(target: Target, weight) -> tuple[int, ...]:
    shape = list(_logical_shape(weight))
    if target.offset is not None:
        dim, start, length = target.offset
        if dim >= len(shape) or start < 0 or length <= 0 or start + length > shape[dim]:
            raise LycorisShapeError(f"slice {target.offset} does not fit {target.key} of shape {shape}",
                                    file=getattr(target.adapter, "file", None), key=target.name)
        shape[dim] = length
    return tuple(shape)


def _bias_change(target: Target, bias) -> tuple[bool, str | None]:
    """(patch the bias key, note): asks the adapter whether it changes the bias (validates shape)."""
    if bias is None:
        if target.adapter.merge_bias(None, 1.0) is not None:
            return False, "bias change ignored in merge mode: the layer has no bias"
        return False, None
    if target.offset is not None:
        bias = bias.narrow(0, target.offset[1], target.offset[2]) if target.offset[0] == 0 else bias
    return target.adapter.merge_bias(bias, 1.0) is not bias, None


def _method(mode: str, target: Target, root) -> tuple[str, str | None]:
    """("merge" | "bypass", reason for the report)."""
    if mode == "merge":
        return "merge", None
    unsupported = bypass_unsupported(target, root)
    if mode == "bypass":
        return ("merge", f"merged: cannot bypass ({unsupported})") if unsupported else ("bypass", None)
    reason = quantised_reason(root, target.key)
    if reason is None:
        return "merge", None
    if unsupported:
        return "merge", f"{reason}, merged: cannot bypass ({unsupported})"
    return "bypass", reason


def _scheduled_method(method: str, reason: str | None, target: Target, root) -> tuple[str, str | None]:
    """A schedule changes strength per step, which only bypass can do: scheduled targets are
    bypassed; one that cannot be is merged at its plain strength, and the report says so."""
    if method == "bypass":
        return method, reason
    unsupported = bypass_unsupported(target, root)
    if unsupported:
        return "merge", f"merged without schedule: cannot bypass ({unsupported})"
    return "bypass", "scheduled: bypassed"


def _range_strengths(strength: float, schedule) -> list[float]:
    """The strengths a module's change must fit: a schedule's curve stays between its two ends."""
    if schedule is None:
        return [strength]
    return [strength * s for s in {schedule.start_strength, schedule.end_strength} if s != 0]


def _plan(resolution, roots: dict, strengths: dict, mode: str, block_weights, schedule=None):
    """Validate every target and choose its method; raise before anything is patched.
    `schedule` applies to model targets only (text encoding is not stepped)."""
    plan: list[_Planned] = []
    errors: list[str] = []
    overflows: list[str] = []
    notes: Counter = Counter()
    zero = 0
    total = len(resolution.targets)
    pbar = comfy.utils.ProgressBar(max(1, total))
    step = max(1, total // 50)  # ~50 updates: each one may message the UI and checks for cancel
    for i, target in enumerate(resolution.targets, 1):
        if i % step == 0 or i == total:
            pbar.update_absolute(i)
        strength = strengths.get(target.part, 0.0)
        if strength != 0 and block_weights is not None:
            strength *= float(block_weights.strength(target.name, target.key))
        if strength == 0:
            zero += 1
            continue
        weight = _tensor_at(roots[target.part], target.key)
        if weight is None:
            errors.append(f"{target.name}: the {target.part} has no weight {target.key}")
            continue
        try:
            target.adapter.check_target(_target_shape(target, weight))
            with_bias, note = _bias_change(target, _tensor_at(roots[target.part], target.bias_key))
        except LycorisError as exc:
            errors.append(f"{target.name}: {exc.reason}")
            continue
        method, reason = _method(mode, target, roots[target.part])
        scheduled = schedule if target.part == MODEL else None
        if scheduled is not None:
            method, reason = _scheduled_method(method, reason, target, roots[target.part])
            scheduled = scheduled if method == "bypass" else None
        try:
            dtype = _range_dtype(roots[target.part], target.key, method)
            range_weight = _range_weight(target, roots[target.part], weight)
            for s in _range_strengths(strength, scheduled):
                target.adapter.check_range(dtype, s, range_weight)
        except LycorisOverflowError as exc:
            overflows.append(f"{target.name}: {exc.reason}")
            continue
        if reason:
            notes[(target.part, reason)] += 1
        if note and method == "merge":
            notes[(target.part, note)] += 1
        plan.append(_Planned(target, strength, method, with_bias and method == "merge", scheduled))
    return plan, errors, overflows, notes, zero


def _range_dtype(root, key: str, method: str) -> torch.dtype:
    """The dtype a module's change must fit: the weight's own plain float dtype; else, bypassed,
    the dtype the model computes in; else fp32 (merges into other storage are computed in fp32)."""
    compute = getattr(root, "manual_cast_dtype", None) if method == "bypass" else None
    return stored_float_dtype(root, key) or compute or torch.float32


def _range_weight(target: Target, root, weight: torch.Tensor) -> torch.Tensor | None:
    """The weight a module's change is computed from, when it depends on it (else None): as the
    layer computes with it (dequantised from other storage), sliced like the target."""
    if not target.adapter.depends_on_weight:
        return None
    if quantised_reason(root, target.key):
        if not target.key.endswith(".weight"):
            return None  # the host dequantises layer weights only: such a module is not checked
        with torch.no_grad():  # weights loaded in inference mode refuse autograd-tracked casts
            weight = dequantiser(comfy.utils.get_attr(root, target.module_path))(weight.device)
    if target.offset is not None:
        weight = weight.narrow(*target.offset)
    return weight


def _listed(errors: list[str]) -> str:
    shown = "\n".join(f"  {e}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"\n  ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return shown + more


def _raise_errors(label: str, errors: list[str], overflows: list[str], total: int) -> None:
    if errors:
        raise LycorisShapeError(f"{len(errors)} of {total} modules do not fit this model, nothing was "
                                f"applied (file made for another model?):\n{_listed(errors)}",
                                file=label)
    raise LycorisOverflowError(f"{len(overflows)} of {total} modules would make weights that are not "
                               f"finite in this model, nothing was applied:\n{_listed(overflows)}",
                               file=label)


@dataclass(frozen=True)
class StackItem:
    """One adapter file of a stack with its settings (see `apply_lycoris` for their meaning)."""

    adapters: Mapping
    strength_model: float
    strength_clip: float
    mode: str = "auto"
    block_weights: object = None
    schedule: object = None  # StrengthSchedule of the model strength over sampling steps, or None


@dataclass
class _ItemPlan:
    item: StackItem
    label: str
    strengths: dict
    resolution: object
    plan: list
    notes: Counter
    zero: int


def _plan_item(item: StackItem, keymap: KeyMap, roots: dict, model, clip) -> _ItemPlan:
    """Resolve and validate one item; raise (naming its file) before anything is patched."""
    if item.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {item.mode!r}")
    label = _label(item.adapters)
    strengths = {MODEL: float(item.strength_model) if model is not None else 0.0,
                 CLIP: float(item.strength_clip) if clip is not None else 0.0}
    resolution = keymap.resolve(item.adapters)
    plan, errors, overflows, notes, zero = _plan(resolution, roots, strengths, item.mode,
                                                 item.block_weights, item.schedule)
    if errors or overflows:
        _raise_errors(label, errors, overflows, len(resolution.targets))
    if not resolution.targets and resolution.unmatched:
        raise LycorisError("no module of this file matches the model (file made for another "
                           f"model?); {len(resolution.unmatched)} unmatched:\n"
                           + "\n".join(grouped(resolution.unmatched)), file=label)
    return _ItemPlan(item, label, strengths, resolution, plan, notes, zero)


def _report(planned: _ItemPlan, originals: dict, methods: dict) -> str:
    part_lines = []
    for part, original in originals.items():
        if original is None or planned.strengths[part] == 0:
            continue
        reasons = Counter({note: n for (p, note), n in planned.notes.items() if p == part})
        part_lines.append(part_line(part, planned.strengths[part], methods[part], reasons))
        if part == MODEL and planned.item.schedule is not None:
            part_lines.append(f"{part} strength schedule: {planned.item.schedule.describe()}")
    adapters = planned.item.adapters
    algos = Counter(getattr(a, "algo", type(a).__name__) for a in adapters.values())
    resolution = planned.resolution
    report = build_report(planned.label, algos, part_lines, unmatched=resolution.unmatched,
                          text_encoder_skipped=resolution.text_encoder_skipped,
                          zero_strength=planned.zero,
                          problems=list(getattr(adapters, "problems", []) or []),
                          converted_keys=getattr(adapters, "converted_keys", 0))
    if resolution.unmatched:
        log.warning("%s", report)
    else:
        log.info("%s", report)
    return report


def apply_stack(model, clip, items: Sequence[StackItem]):
    """Apply several adapter files to one clone of `model` / `clip` in one patch pass; returns
    (model, clip, report). The result equals chaining one `apply_lycoris` per item in order:
    merge patches go to the host in item order, bypass entries stack in item order. Every item
    is validated before any patch is added; a mismatch raises and leaves the inputs untouched."""
    keymap = KeyMap(model, clip)
    roots = {}
    if model is not None:
        roots[MODEL] = model.model
    if clip is not None:
        roots[CLIP] = clip.patcher.model
    planned = [_plan_item(item, keymap, roots, model, clip) for item in items]

    originals = {MODEL: model, CLIP: clip}
    out = dict(originals)
    counts = [{MODEL: Counter(), CLIP: Counter()} for _ in planned]
    for part, original in originals.items():
        merges, bypasses = [], []
        for i, p in enumerate(planned):
            if original is None or p.strengths[part] == 0:
                continue
            items_here = [x for x in p.plan if x.target.part == part]
            merged = [(x.target, x.strength, x.with_bias) for x in items_here if x.method == "merge"]
            bypassed = [(x.target, x.strength, x.schedule) for x in items_here if x.method == "bypass"]
            merges += merged
            bypasses += bypassed
            counts[i][part].update(merged=len(merged), bypassed=len(bypassed))
        if not (merges or bypasses):
            continue
        new = original.clone()
        patcher = new if part == MODEL else new.patcher
        if merges:
            add_merge_patches(patcher, merges, part)
        if bypasses:
            add_bypass(patcher, bypasses)
        out[part] = new
    report = "\n".join(_report(p, originals, c) for p, c in zip(planned, counts))
    return out[MODEL], out[CLIP], report


def apply_lycoris(model, clip, adapters: Mapping, strength_model: float, strength_clip: float,
                  mode: str = "auto", block_weights=None, schedule=None):
    """Apply adapters (name -> Adapter) to clones of `model` / `clip`; returns (model, clip, report).

    `mode`: "merge" patches weights at load time through the host, "bypass" runs the adapters
    beside the untouched layers, "auto" merges where exact and bypasses quantised layers.
    `block_weights`: None or an object with `strength(module_name, model_key) -> float`, a
    per-module multiplier on the part's strength. `schedule`: None or a StrengthSchedule, the
    model strength over the sampling steps (scheduled targets are bypassed). Every target is
    validated before any patch is added; a mismatch raises and leaves the inputs untouched.
    """
    return apply_stack(model, clip, [StackItem(adapters, strength_model, strength_clip, mode,
                                               block_weights, schedule)])
