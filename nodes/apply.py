"""`apply_lycoris`: adapters onto a MODEL and/or CLIP, merged or bypassed, validated before any patch."""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
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


def _plan(resolution, roots: dict, strengths: dict, mode: str, block_weights):
    """Validate every target and choose its method; raise before anything is patched."""
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
        try:
            target.adapter.check_range(_range_dtype(roots[target.part], target.key, method), strength,
                                       _range_weight(target, roots[target.part], weight))
        except LycorisOverflowError as exc:
            overflows.append(f"{target.name}: {exc.reason}")
            continue
        if reason:
            notes[(target.part, reason)] += 1
        if note and method == "merge":
            notes[(target.part, note)] += 1
        plan.append(_Planned(target, strength, method, with_bias and method == "merge"))
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


def apply_lycoris(model, clip, adapters: Mapping, strength_model: float, strength_clip: float,
                  mode: str = "auto", block_weights=None):
    """Apply adapters (name -> Adapter) to clones of `model` / `clip`; returns (model, clip, report).

    `mode`: "merge" patches weights at load time through the host, "bypass" runs the adapters
    beside the untouched layers, "auto" merges where exact and bypasses quantised layers.
    `block_weights`: None or an object with `strength(module_name, model_key) -> float`, a
    per-module multiplier on the part's strength. Every target is validated before any patch is
    added; a mismatch raises and leaves the inputs untouched.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    label = _label(adapters)
    strengths = {MODEL: float(strength_model) if model is not None else 0.0,
                 CLIP: float(strength_clip) if clip is not None else 0.0}
    algos = Counter(getattr(a, "algo", type(a).__name__) for a in adapters.values())
    keymap = KeyMap(model, clip)
    resolution = keymap.resolve(adapters)
    roots = {}
    if model is not None:
        roots[MODEL] = model.model
    if clip is not None:
        roots[CLIP] = clip.patcher.model
    plan, errors, overflows, notes, zero = _plan(resolution, roots, strengths, mode, block_weights)
    if errors or overflows:
        _raise_errors(label, errors, overflows, len(resolution.targets))
    if not resolution.targets and resolution.unmatched:
        raise LycorisError("no module of this file matches the model (file made for another "
                           f"model?); {len(resolution.unmatched)} unmatched:\n"
                           + "\n".join(grouped(resolution.unmatched)), file=label)

    out = {MODEL: model, CLIP: clip}
    part_lines = []
    for part, original in ((MODEL, model), (CLIP, clip)):
        items = [p for p in plan if p.target.part == part]
        if original is None or strengths[part] == 0:
            continue
        methods: Counter = Counter()
        if items:
            new = original.clone()
            patcher = new if part == MODEL else new.patcher
            merges = [(p.target, p.strength, p.with_bias) for p in items if p.method == "merge"]
            bypasses = [(p.target, p.strength) for p in items if p.method == "bypass"]
            if merges:
                add_merge_patches(patcher, merges, part)
            if bypasses:
                add_bypass(patcher, bypasses)
            methods.update(merged=len(merges), bypassed=len(bypasses))
            out[part] = new
        reasons = Counter({note: n for (p, note), n in notes.items() if p == part})
        part_lines.append(part_line(part, strengths[part], methods, reasons))

    problems = list(getattr(adapters, "problems", []) or [])
    report = build_report(label, algos, part_lines, unmatched=resolution.unmatched,
                          text_encoder_skipped=resolution.text_encoder_skipped, zero_strength=zero,
                          problems=problems, converted_keys=getattr(adapters, "converted_keys", 0))
    if resolution.unmatched:
        log.warning("%s", report)
    else:
        log.info("%s", report)
    return out[MODEL], out[CLIP], report
