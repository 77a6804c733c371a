"""Load LyCORIS nodes: a file from the `loras` folder onto MODEL (and CLIP), merged or bypassed."""
from __future__ import annotations

import os

import folder_paths

from .host_compat import read_adapters
from .apply import MODES, apply_lycoris
from .report import show_on_node
from .schedule import SCHEDULE_TYPE

CATEGORY = "loaders/lycoris"
BLOCK_WEIGHTS_TYPE = "LYCORIS_BLOCK_WEIGHTS"

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
MODE_TOOLTIP = ("auto: merge into the weights where that is exact, run beside quantised layers "
                "(fp8 storage, GGUF, other custom ops) without touching them. merge: always merge "
                "(patched by ComfyUI at load time, like core LoRAs). bypass: never touch the weights; "
                "the adapter runs beside each layer on every step (slower, exact on any storage).")
FILE_TOOLTIP = ("A LyCORIS/LoRA file from the loras folder: LoRA/LoCon, LoHa, LoKr, (IA)^3, GLoRA, "
                "Diag-OFT, BOFT, full/diff, norms, DoRA, mixed files.")
BLOCK_TOOLTIP = "Optional per-block strengths (from a LyCORIS block-weights node); multiply the strengths."
SCHEDULE_TOOLTIP = ("Optional strength over the sampling steps (from a LyCORIS Strength Schedule "
                    "node) for the diffusion model; scheduled layers run in bypass.")
REPORT_TOOLTIP = "What was applied where, what was skipped and why (unmatched keys are listed here)."


def file_signature(path: str) -> tuple:
    """What changes when a file of the loras folder is rewritten: its path, mtime and size."""
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


class LoadLycoris:
    """Model and CLIP loader."""

    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter applied.",
                       "The text encoder with the adapter applied.", REPORT_TOOLTIP)
    DESCRIPTION = ("Apply a LyCORIS file (any algorithm, mixed files included) to the model and the "
                   "text encoder, merged or bypassed. Chain any number of loaders; bypass loaders "
                   "stack, and merge and bypass loaders can be mixed.")

    def __init__(self):
        self._loaded = None  # (file signature, AdapterFile): reused while the file is unchanged

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the adapter to."}),
                "clip": ("CLIP", {"tooltip": "The text encoder to apply the adapter to."}),
                "lycoris_name": (folder_paths.get_filename_list("loras"), {"tooltip": FILE_TOOLTIP}),
                "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "Strength on the diffusion model; "
                                             "0 leaves it untouched, negative values subtract."}),
                "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": "Strength on the text encoder; "
                                            "0 leaves it untouched, negative values subtract."}),
                "mode": (list(MODES), {"default": "auto", "tooltip": MODE_TOOLTIP}),
            },
            "optional": {
                "block_weights": (BLOCK_WEIGHTS_TYPE, {"tooltip": BLOCK_TOOLTIP}),
                "schedule": (SCHEDULE_TYPE, {"tooltip": SCHEDULE_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, lycoris_name, **kwargs):
        path = folder_paths.get_full_path("loras", lycoris_name)
        return file_signature(path) if path else lycoris_name

    def adapters(self, lycoris_name: str):
        """The parsed file, cached on the node while it does not change on disk."""
        path = folder_paths.get_full_path_or_raise("loras", lycoris_name)
        signature = file_signature(path)
        if self._loaded is None or self._loaded[0] != signature:
            self._loaded = None
            self._loaded = (signature, read_adapters(path))
        return self._loaded[1]

    def load(self, model, clip, lycoris_name, strength_model, strength_clip, mode="auto",
             block_weights=None, schedule=None, unique_id=None):
        if strength_model == 0 and strength_clip == 0:
            report = f"LyCORIS {lycoris_name}: both strengths are 0, nothing applied"
            return {"ui": {"text": [report]}, "result": (model, clip, report)}
        adapters = self.adapters(lycoris_name)
        model, clip, report = apply_lycoris(model, clip, adapters, strength_model, strength_clip,
                                            mode, block_weights, schedule)
        show_on_node(report, unique_id)
        return {"ui": {"text": [report]}, "result": (model, clip, report)}


class LoadLycorisModelOnly(LoadLycoris):
    """Diffusion-model-only loader: text-encoder modules of the file are skipped, not unmatched."""

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The diffusion model with the adapter applied.", REPORT_TOOLTIP)
    FUNCTION = "load_model_only"
    DESCRIPTION = ("Apply a LyCORIS file to the diffusion model only (text-encoder modules of the "
                   "file are skipped and counted in the report), merged or bypassed.")

    @classmethod
    def INPUT_TYPES(cls):
        types = super().INPUT_TYPES()
        required = types["required"]
        del required["clip"], required["strength_clip"]
        return types

    def load_model_only(self, model, lycoris_name, strength_model, mode="auto", block_weights=None,
                        schedule=None, unique_id=None):
        out = self.load(model, None, lycoris_name, strength_model, 0.0, mode, block_weights, schedule,
                        unique_id)
        model, _, report = out["result"]
        return {"ui": out["ui"], "result": (model, report)}


NODE_CLASS_MAPPINGS = {
    "LycorisLoader": LoadLycoris,
    "LycorisLoaderModelOnly": LoadLycorisModelOnly,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LycorisLoader": "Load LyCORIS",
    "LycorisLoaderModelOnly": "Load LyCORIS (model only)",
}
