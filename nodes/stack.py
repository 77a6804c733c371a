"""LyCORIS Stack: several adapter files in one node (chainable), applied in one patch pass.

`LyCORIS Stack` only collects settings (a tuple of `StackEntry`, type LYCORIS_STACK), so stacks
chain without touching a model; `Apply LyCORIS Stack` reads the files and applies them all with
one clone and one merge/bypass pass, which gives the same model as chaining one Load LyCORIS
node per enabled slot in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths

from .apply import MODES, StackItem, apply_stack
from .host_compat import read_adapters
from .loaders import (CATEGORY, FILE_TOOLTIP, MODE_TOOLTIP, REPORT_TOOLTIP, SCHEDULE_TOOLTIP, STRENGTH,
                      file_signature)
from .report import show_on_node
from .schedule import SCHEDULE_TYPE

STACK_TYPE = "LYCORIS_STACK"
SLOTS = 5
NONE = "None"


@dataclass(frozen=True)
class StackEntry:
    """One enabled slot: a file of the `loras` folder and how to apply it."""

    lycoris_name: str
    strength_model: float
    strength_clip: float
    mode: str
    schedule: object = None  # StrengthSchedule of the model strength, or None


def _signature(name: str) -> tuple:
    path = folder_paths.get_full_path("loras", name)
    return file_signature(path) if path else (name,)


class LycorisStack:
    """Up to SLOTS adapters, each with its own switch, strengths and mode; chain for more."""

    CATEGORY = CATEGORY
    FUNCTION = "stack"
    RETURN_TYPES = (STACK_TYPE,)
    RETURN_NAMES = ("lycoris_stack",)
    OUTPUT_TOOLTIPS = ("The enabled slots after those of the input stack; wire into Apply LyCORIS "
                       "Stack or another LyCORIS Stack.",)
    DESCRIPTION = (f"Up to {SLOTS} LyCORIS/LoRA files with an on/off switch, model and text-encoder "
                   "strengths and merge/bypass each. Chain stacks for more; Apply LyCORIS Stack "
                   "applies them all in one pass, as chained Load LyCORIS nodes would.")

    @classmethod
    def INPUT_TYPES(cls):
        files = [NONE] + folder_paths.get_filename_list("loras")
        required = {}
        for i in range(1, SLOTS + 1):
            required[f"enabled_{i}"] = ("BOOLEAN", {"default": True, "tooltip": f"Slot {i} on or off."})
            required[f"lycoris_name_{i}"] = (files, {"default": NONE, "tooltip": FILE_TOOLTIP +
                                                     " None leaves the slot empty."})
            required[f"strength_model_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": f"Slot {i}: strength "
                                                         "on the diffusion model (0 leaves it untouched)."})
            required[f"strength_clip_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": f"Slot {i}: strength "
                                                        "on the text encoder (0 leaves it untouched)."})
            required[f"mode_{i}"] = (list(MODES), {"default": "auto", "tooltip": MODE_TOOLTIP})
        optional = {"lycoris_stack": (STACK_TYPE, {"tooltip": "A stack to extend: its adapters "
                                                              "come first."})}
        for i in range(1, SLOTS + 1):
            optional[f"schedule_{i}"] = (SCHEDULE_TYPE, {"tooltip": f"Slot {i}: " + SCHEDULE_TOOLTIP})
        return {"required": required, "optional": optional}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        """The files' signatures too: a file rewritten on disk must be read again downstream."""
        return tuple(_signature(kwargs[f"lycoris_name_{i}"]) for i in range(1, SLOTS + 1)
                     if kwargs.get(f"lycoris_name_{i}", NONE) != NONE)

    def stack(self, lycoris_stack=None, **slots):
        entries = list(lycoris_stack or ())
        for i in range(1, SLOTS + 1):
            name = slots.get(f"lycoris_name_{i}", NONE)
            if not slots.get(f"enabled_{i}", True) or name in (NONE, None, ""):
                continue
            entries.append(StackEntry(name, float(slots[f"strength_model_{i}"]),
                                      float(slots[f"strength_clip_{i}"]), slots[f"mode_{i}"],
                                      slots.get(f"schedule_{i}")))
        return (tuple(entries),)


class ApplyLycorisStack:
    """A LYCORIS_STACK onto MODEL (and CLIP) with one clone and one patch pass."""

    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The diffusion model with every adapter of the stack applied.",
                       "The text encoder with every adapter applied (None without a CLIP input).",
                       REPORT_TOOLTIP)
    DESCRIPTION = ("Apply every adapter of a LyCORIS stack in one pass: the same result as one "
                   "Load LyCORIS node per slot, chained in stack order. Nothing is applied when any "
                   "file does not fit the model.")

    def __init__(self):
        self._files: dict[str, tuple] = {}  # name -> (file signature, AdapterFile)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the stack to."}),
                "lycoris_stack": (STACK_TYPE, {"tooltip": "From a LyCORIS Stack node."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder; without it, text-encoder modules "
                                             "are skipped and counted in the report."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def _adapters(self, name: str):
        """The parsed file, reused while it does not change on disk."""
        path = folder_paths.get_full_path_or_raise("loras", name)
        signature = _signature(name)
        cached = self._files.get(name)
        if cached is None or cached[0] != signature:
            cached = (signature, read_adapters(path))
        return cached

    def apply(self, model, lycoris_stack, clip=None, unique_id=None):
        entries = [e for e in lycoris_stack if e.strength_model != 0 or
                   (clip is not None and e.strength_clip != 0)]
        files = {e.lycoris_name: self._adapters(e.lycoris_name) for e in entries}
        self._files = files  # keep only what the current stack uses
        items = [StackItem(files[e.lycoris_name][1], e.strength_model, e.strength_clip, e.mode,
                           schedule=e.schedule) for e in entries]
        if items:
            model, clip, report = apply_stack(model, clip, items)
        else:
            report = "LyCORIS stack: no enabled adapter with a non-zero strength, nothing applied"
        show_on_node(report, unique_id)
        return {"ui": {"text": [report]}, "result": (model, clip, report)}


NODE_CLASS_MAPPINGS = {"LycorisStack": LycorisStack, "ApplyLycorisStack": ApplyLycorisStack}
NODE_DISPLAY_NAME_MAPPINGS = {"LycorisStack": "LyCORIS Stack",
                              "ApplyLycorisStack": "Apply LyCORIS Stack"}
