"""Bake LyCORIS into checkpoint: up to three adapter files merged into a checkpoint file, written to
the output folder (the core's `merge --base`, with a progress bar and cancel)."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths

from ..lycoris_core.io import read_header
from ..lycoris_core.tools.merge import DTYPES, bake_checkpoint
from .host_compat import read_adapters
from .report import show_on_node

CATEGORY = "loaders/lycoris"
BLOCK_WEIGHTS_TYPE = "LYCORIS_BLOCK_WEIGHTS"
NONE = "(none)"
AS_STORED = "as stored"
SLOTS = 3
STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


def _bake_progress(total: int):
    """A wrapper over the tensors written: the node's progress bar, and cancel between tensors."""
    def wrap(keys):
        bar = comfy.utils.ProgressBar(max(1, total))
        step = max(1, total // 100)
        for i, key in enumerate(keys, 1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            yield key
            if i % step == 0 or i == total:
                bar.update_absolute(i)
    return wrap


class BakeLycoris:
    """Checkpoint + adapters -> a new checkpoint file in the output folder."""

    CATEGORY = CATEGORY
    FUNCTION = "bake"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the checkpoint was written, what was merged, what matched nothing.",)
    DESCRIPTION = ("Merge up to three LyCORIS/LoRA files (any algorithm, with strengths and optional "
                   "block weights) into a copy of a checkpoint, saved in the output folder. Loading "
                   "the result equals loading the checkpoint and chaining Load LyCORIS in merge mode, "
                   "in this order. The checkpoint itself is never changed.")

    @classmethod
    def INPUT_TYPES(cls):
        loras = [NONE] + folder_paths.get_filename_list("loras")
        required = {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                          {"tooltip": "The checkpoint to bake into (read, never modified)."}),
        }
        for i in range(1, SLOTS + 1):
            required[f"lycoris_name_{i}"] = (loras, {"tooltip": f"Adapter {i}, merged after the ones above it."})
            required[f"strength_{i}"] = ("FLOAT", {**STRENGTH, "tooltip": f"Strength of adapter {i} "
                                                   "(diffusion model and text encoder alike)."})
        required["dtype"] = ([AS_STORED, *sorted(DTYPES)], {"default": AS_STORED, "tooltip":
                             "Float dtype of the written checkpoint; 'as stored' keeps each tensor's."})
        required["filename_prefix"] = ("STRING", {"default": "checkpoints/lycoris_baked",
                                                  "tooltip": "Output file name, in the output folder."})
        return {"required": required,
                "optional": {"block_weights": (BLOCK_WEIGHTS_TYPE, {"tooltip": "Optional per-block "
                                                                    "strengths, for every adapter."})},
                "hidden": {"unique_id": "UNIQUE_ID"}}

    def bake(self, ckpt_name, dtype=AS_STORED, filename_prefix="checkpoints/lycoris_baked",
             block_weights=None, unique_id=None, **slots):
        base = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        files = []
        for i in range(1, SLOTS + 1):
            name = slots.get(f"lycoris_name_{i}", NONE)
            if name and name != NONE:
                path = folder_paths.get_full_path_or_raise("loras", name)
                files.append((read_adapters(path), float(slots.get(f"strength_{i}", 1.0))))
        if not files:
            raise ValueError("choose at least one LyCORIS file to bake into the checkpoint")
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        out = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
        total = len(read_header(base)[0])
        result = bake_checkpoint(base, files, out, dtype=DTYPES.get(dtype), blocks=block_weights,
                                 wrap=_bake_progress(total))
        lines = [f"wrote {out}", f"{result.plan.modules} modules merged into {len(result.plan.weights)} "
                 f"weights of {ckpt_name} ({result.keys} tensors)"]
        lines += [f"{os.path.basename(a.path)} at {s:g}" for a, s in files]
        for path, names in result.plan.unmatched.items():
            lines.append(f"UNMATCHED in {os.path.basename(path)} ({len(names)}): " + ", ".join(names[:20])
                         + (" ..." if len(names) > 20 else ""))
        if result.plan.zero:
            lines.append(f"{result.plan.zero} modules at strength 0 (block weights)")
        report = "\n".join(lines)
        show_on_node(report, unique_id)
        return {"ui": {"text": [report]}, "result": (report,)}


NODE_CLASS_MAPPINGS = {"BakeLycoris": BakeLycoris}
NODE_DISPLAY_NAME_MAPPINGS = {"BakeLycoris": "Bake LyCORIS into checkpoint"}
