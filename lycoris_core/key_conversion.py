"""Run a state-dict converter (a host's LoRA key conversion) over a file before it is grouped.

Converters take and return `{key: tensor}`. Most only rename keys or read shapes, so they are
first run on shape-only placeholders: when every output is an input placeholder or a tensor the
converter made itself, the file's data is never read and stays memory-mapped. A converter that
computes with the values (splits, tests for zeros) fails on placeholders or returns derived ones;
it then runs again on the real tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .errors import LycorisFormatError
from .io import DTYPES, DictSource, RenamedSource

Converter = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def _placeholders(src) -> dict[str, torch.Tensor]:
    out = {}
    for key in src:
        dtype = DTYPES.get(src.dtype_name(key), (torch.float32, 4))[0]
        out[key] = torch.empty(src.shape(key), dtype=dtype, device="meta")
    return out


def _renaming(placeholders: dict[str, torch.Tensor], converted: Mapping) -> tuple[dict, dict] | None:
    """(new key -> old key, tensors the converter made), or None when an output derives from the
    placeholders' values (so the converter needs the real data)."""
    owner = {id(t): k for k, t in placeholders.items()}
    renamed, made = {}, {}
    for key, value in converted.items():
        if id(value) in owner:
            renamed[str(key)] = owner[id(value)]
        elif isinstance(value, torch.Tensor) and value.device.type != "meta":
            made[str(key)] = value
        else:
            return None
    return renamed, made


def convert_source(src, convert: Converter | None):
    """(`src` as `convert` sees it, number of changed keys: the file's keys it renamed, split or
    dropped, plus keys it made)."""
    if convert is None:
        return src, 0
    placeholders = _placeholders(src)
    try:
        converted = convert(dict(placeholders))
    except Exception:  # noqa: BLE001 - it computes with values: run it on the data below
        converted = None
    plan = None if converted is None else _renaming(placeholders, converted)
    if plan is not None:
        renamed, made = plan
        unchanged = {new for new, old in renamed.items() if new == old}
        changed = len(set(src) - unchanged) + len(made)
        return (src, 0) if not changed else (RenamedSource(src, renamed, made), changed)
    tensors = {k: src[k] for k in src}
    try:
        converted = convert(dict(tensors))
    except Exception as exc:  # noqa: BLE001 - the host's converter choked on this file
        raise LycorisFormatError(f"the host's key conversion failed: {type(exc).__name__}: {exc}",
                                 file=src.path) from exc
    kept = {id(t): k for k, t in tensors.items()}
    unchanged = {k for k, v in converted.items() if kept.get(id(v)) == k}
    made = sum(id(v) not in kept for v in converted.values())
    changed = len(set(tensors) - unchanged) + made
    return DictSource(dict(converted), src.metadata, name=src.path), changed
