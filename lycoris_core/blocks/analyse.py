"""Block analyser: how much each block of a file changes the model, so users see what it touches."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from ..algos.base import FP32, Adapter
from .archs import Arch, module_blocks
from .names import block_sort_key


class BlockChange(NamedTuple):
    """One block of the analysis. `norm_delta` = ‖ΔW‖ (Frobenius over the block's modules, fp32,
    strength 1, weights only: bias deltas are left out); `rel_change` = ‖ΔW‖ / ‖W‖ when every
    module's base weight was given; either is None when it cannot be known, and `note` says why."""

    block: str
    n_modules: int
    norm_delta: float | None
    rel_change: float | None
    note: str = ""


@torch.no_grad()
def module_change(adapter: Adapter, base: torch.Tensor | None) -> tuple[float, float | None] | None:
    """(‖ΔW‖², ‖W‖² or None) of one module in fp32; None when the base weight is needed but absent."""
    if base is not None:
        w = base.to(FP32)
        return float((adapter.merge(w, 1.0) - w).square().sum()), float(w.square().sum())
    shape = adapter.target_shape
    if adapter.depends_on_weight or shape is None:
        return None
    device = next((p.device for p in adapter.parameters()), torch.device("cpu"))
    delta = adapter.merge(torch.zeros(shape, dtype=FP32, device=device), 1.0)
    return float(delta.square().sum()), None


def _note(missing: list[Adapter]) -> str:
    if not missing:
        return ""
    algos = sorted({a.algo + ("+dora" if a.dora_scale is not None else "")
                    + ("+set_weight" if getattr(a, "set_weight", None) is not None else "")
                    for a in missing})
    return f"needs base weights ({len(missing)} module(s): {', '.join(algos)})"


def analyse(adapters: Mapping[str, Adapter], base_weights: Mapping[str, torch.Tensor] | None = None,
            *, model_keys: Mapping[str, str | tuple] | None = None,
            arch: str | Arch | None = None) -> list[BlockChange]:
    """Per block (canonical order): module count, ‖ΔW‖ and ‖ΔW‖/‖W‖ at strength 1.

    `base_weights` maps module names (the adapters' keys) to the weights they patch. Without a
    module's base, a zero weight stands in only where ΔW does not depend on W
    (`Adapter.depends_on_weight` is False: LoRA, LoHa, LoKr, full `diff`, norm); W-dependent modules
    (OFT, BOFT, GLoRA, IA3, DoRA, `set_weight`) make the block report "needs base weights" instead
    of a wrong number.
    """
    bases = base_weights or {}
    groups: dict[str, list[str]] = {}
    for name, block in module_blocks(adapters, model_keys, arch).items():
        groups.setdefault(block, []).append(name)
    rows = []
    for block in sorted(groups, key=block_sort_key):
        delta_sq, base_sq, missing, all_bases = 0.0, 0.0, [], True
        for name in groups[block]:
            found = module_change(adapters[name], bases.get(name))
            if found is None:
                missing.append(adapters[name])
                continue
            delta_sq += found[0]
            if found[1] is None:
                all_bases = False
            else:
                base_sq += found[1]
        norm = None if missing else math.sqrt(delta_sq)
        rel = norm / math.sqrt(base_sq) if norm is not None and all_bases and base_sq > 0 else None
        rows.append(BlockChange(block, len(groups[block]), norm, rel, _note(missing)))
    return rows


def format_analysis(rows: Iterable[BlockChange]) -> str:
    """The analysis as a small fixed-width table (for a node's text output or a log)."""
    lines = [f"{'block':<8}{'modules':>8}{'|dW|':>12}{'|dW|/|W|':>12}  note"]
    for r in rows:
        norm = "-" if r.norm_delta is None else f"{r.norm_delta:.4g}"
        rel = "-" if r.rel_change is None else f"{r.rel_change:.4g}"
        lines.append(f"{r.block:<8}{r.n_modules:>8}{norm:>12}{rel:>12}  {r.note}".rstrip())
    return "\n".join(lines)
