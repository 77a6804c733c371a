"""LyCORIS Stack inside ComfyUI: a stack equals the same files chained through Load LyCORIS nodes
(merge, bypass and mixed modes, several algorithms on the same layers), in one clone and one pass."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from host.adapters import Case, build_case
from host.helpers import load, module_outputs, pack_module, rel_err, unload_all

pytestmark = pytest.mark.usefixtures("quiet_warnings")
# several algorithms on the same UNet and CLIP layers: stacking order matters for OFT and DoRA
CASES = (Case("lora"), Case("loha"), Case("lokr"), Case("diag-oft"), Case("lora", (("dora", "out"),)))
STRENGTHS = ((0.8, 0.6), (-0.5, 1.0), (0.7, 0.3), (1.0, 0.9), (0.6, -0.4))
MODE_SETS = {"merge": ("merge",) * 5, "bypass": ("bypass",) * 5,
             "mixed": ("merge", "bypass", "auto", "bypass", "merge")}
EXACT = 1e-6  # same patches in the same order: equal up to float noise


@pytest.fixture(scope="module")
def stack_files(sd15, loras_dir):
    """(file name, model keys) per case, written to the loras folder."""
    model, clip, _ = sd15
    out = []
    for i, case in enumerate(CASES):
        files = build_case(case, model, clip, seed=10 + i)
        name = f"stack_{i}_{case.id}.safetensors"
        save_file({k: v.contiguous() for k, v in files.tensors.items()}, os.path.join(loras_dir, name))
        out.append((name, sorted(set(files.targets.values()))))
    return out


def _slots(entries, start=1):
    """Widget values of a LyCORIS Stack for (name, strength_model, strength_clip, mode, enabled)."""
    stack = pack_module("nodes.stack")
    values = {}
    for i in range(1, stack.SLOTS + 1):
        name, sm, sc, mode, on = entries[i - 1] if i <= len(entries) else (stack.NONE, 1.0, 1.0, "auto", True)
        values.update({f"lycoris_name_{i}": name, f"strength_model_{i}": sm, f"strength_clip_{i}": sc,
                       f"mode_{i}": mode, f"enabled_{i}": on})
    return values


def _chained(model, clip, names, modes):
    loader = pack_module("nodes.loaders").LoadLycoris
    for name, (sm, sc), mode in zip(names, STRENGTHS, modes):
        model, clip, _ = loader().load(model, clip, name, sm, sc, mode)["result"]
    return model, clip


def _stacked(model, clip, names, modes):
    """The same files through two chained stack nodes, with a disabled and an empty slot between."""
    stack = pack_module("nodes.stack")
    rows = [(n, sm, sc, m, True) for n, (sm, sc), m in zip(names, STRENGTHS, modes)]
    disabled, empty = (names[4], 5.0, 5.0, "merge", False), (stack.NONE, 1.0, 1.0, "auto", True)
    first = rows[:2] + [disabled, empty] + rows[2:3]
    (partial,) = stack.LycorisStack().stack(**_slots(first))
    (whole,) = stack.LycorisStack().stack(lycoris_stack=partial, **_slots(rows[3:]))
    assert [e.lycoris_name for e in whole] == list(names)
    out = stack.ApplyLycorisStack().apply(model, whole, clip)
    return out["result"]


def _outputs(model, clip, keys):
    """Each targeted layer's output with the patchers loaded (merge patches and injections)."""
    load(model, clip.patcher)
    out = module_outputs(model, clip, keys)
    unload_all()
    return out


@pytest.mark.parametrize("modes", list(MODE_SETS), ids=list(MODE_SETS))
def test_stack_equals_chained_loaders(modes, sd15, stack_files):
    model, clip, _ = sd15
    names = [n for n, _ in stack_files]
    keys = sorted({k for _, ks in stack_files for k in ks})
    chained = _outputs(*_chained(model, clip, names, MODE_SETS[modes]), keys)
    stack_model, stack_clip, report = _stacked(model, clip, names, MODE_SETS[modes])
    stacked = _outputs(stack_model, stack_clip, keys)
    base = _outputs(model, clip, keys)
    for key in keys:
        assert rel_err(chained[key], base[key]) > 1e-3, key  # every layer is changed at all
        assert rel_err(stacked[key], chained[key]) < EXACT, key
    # one clone of each input, holding every adapter
    assert stack_model.parent is model and stack_clip.patcher.parent is clip.patcher
    assert report.count("LyCORIS stack_") == len(names)


def test_merge_patches_are_the_chained_ones_in_order(sd15, stack_files):
    model, clip, _ = sd15
    names = [n for n, _ in stack_files]
    chain_model, chain_clip = _chained(model, clip, names, MODE_SETS["merge"])
    stack_model, stack_clip, _ = _stacked(model, clip, names, MODE_SETS["merge"])

    def described(patcher):
        return {k: [(p[0], p[1].module_name, type(p[1]).__name__) for p in v if
                    hasattr(p[1], "module_name")] for k, v in patcher.patches.items()}

    assert described(stack_model) == described(chain_model)
    assert described(stack_clip.patcher) == described(chain_clip.patcher)


def test_a_file_that_does_not_fit_applies_nothing(sd15, stack_files, loras_dir):
    from lycoris_core import LycorisError

    model, clip, _ = sd15
    bad = "stack_bad_shape.safetensors"
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 7, generator=g),
               f"{name}.lora_up.weight": torch.randn(5, 2, generator=g)}, os.path.join(loras_dir, bad))
    stack = pack_module("nodes.stack")
    rows = [(stack_files[0][0], 1.0, 1.0, "merge", True), (bad, 1.0, 1.0, "merge", True)]
    (entries,) = stack.LycorisStack().stack(**_slots(rows))
    before = (dict(model.patches), dict(clip.patcher.patches))
    with pytest.raises(LycorisError, match="stack_bad_shape"):
        stack.ApplyLycorisStack().apply(model, entries, clip)
    assert (dict(model.patches), dict(clip.patcher.patches)) == before


def test_empty_stack_returns_the_inputs(sd15):
    model, clip, _ = sd15
    stack = pack_module("nodes.stack")
    (entries,) = stack.LycorisStack().stack(**_slots([]))
    assert entries == ()
    out_model, out_clip, report = stack.ApplyLycorisStack().apply(model, entries, clip)["result"]
    assert out_model is model and out_clip is clip and "nothing applied" in report


def test_stack_without_clip_skips_text_encoder_modules(sd15, stack_files):
    model, _, _ = sd15
    stack = pack_module("nodes.stack")
    (entries,) = stack.LycorisStack().stack(**_slots([(stack_files[0][0], 1.0, 1.0, "merge", True)]))
    out_model, out_clip, report = stack.ApplyLycorisStack().apply(model, entries)["result"]
    assert out_clip is None and out_model is not model
    assert "text-encoder modules (no CLIP input)" in report


def test_registered_with_tooltips(lycoris_pack):
    for node_id in ("LycorisStack", "ApplyLycorisStack"):
        cls = lycoris_pack.NODE_CLASS_MAPPINGS[node_id]
        for section in ("required", "optional"):
            for name, (_, options) in cls.INPUT_TYPES().get(section, {}).items():
                assert options.get("tooltip"), f"{node_id}.{name}"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
