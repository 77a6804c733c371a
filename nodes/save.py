"""Save LyCORIS: a LYCORIS value to a new, numbered safetensors file in the `loras` folder.

Files are written in the standard LyCORIS layout with kohya `ss_*` and `modelspec.*` metadata
(what the train node recorded, else what can be read off the adapters), atomically, and never over
an existing file: `<prefix>_00001_.safetensors`, `_00002_`, ... The prefix may contain subfolders;
it must stay inside the loras folder.
"""
from __future__ import annotations

import os
import re

import torch

import folder_paths

from ..lycoris_core import LycorisError
from ..lycoris_core.algos import Adapter
from ..lycoris_core.save import save_file, standard_metadata
from .train import CATEGORY, LYCORIS_TYPE

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAX_TRIES = 100


def loras_root() -> str:
    """The first `loras` folder (where ComfyUI's model manager puts LoRAs)."""
    return folder_paths.get_folder_paths("loras")[0]


def split_prefix(prefix: str, root: str, label: str = "loras") -> tuple[str, str]:
    """(absolute folder inside root, file stem) for a prefix like `lycoris/my_style`."""
    prefix = prefix.strip().replace("\\", "/")
    if not prefix or prefix.endswith("/"):
        raise ValueError(f"filename prefix {prefix!r} needs a file name part")
    folder = os.path.abspath(os.path.join(root, os.path.dirname(prefix)))
    if os.path.commonpath([folder, os.path.abspath(root)]) != os.path.abspath(root):
        raise ValueError(f"filename prefix {prefix!r} leaves the {label} folder")
    return folder, os.path.basename(prefix)


def next_free_path(root: str, prefix: str) -> str:
    """`<prefix>_NNNNN_.safetensors` with NNNNN one above the highest existing number."""
    folder, stem = split_prefix(prefix, root)
    os.makedirs(folder, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d+)_\.safetensors$")
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    return os.path.join(folder, f"{stem}_{max(numbers, default=0) + 1:05d}_.safetensors")


def metadata_for(lycoris, title: str) -> dict[str, str]:
    """The value's own metadata (a trained or loaded file) or metadata read off the adapters,
    with the output name and title set."""
    meta = dict(getattr(lycoris, "metadata", None) or {})
    if not meta.get("ss_network_module"):
        meta.update(standard_metadata(lycoris))
    meta["ss_output_name"] = title
    meta["modelspec.title"] = title
    return meta


def save_lycoris(lycoris, prefix: str, dtype: torch.dtype | None, root: str | None = None) -> str:
    """Write `lycoris` to the next free numbered file under `root`; return its path."""
    if not lycoris or not any(isinstance(a, Adapter) for a in lycoris.values()):
        raise LycorisError("nothing to save: the LYCORIS value holds no adapter")
    root = root or loras_root()
    for _ in range(MAX_TRIES):
        path = next_free_path(root, prefix)
        title = os.path.splitext(os.path.basename(path))[0]
        try:
            return save_file(lycoris, path, metadata_for(lycoris, title), dtype=dtype)
        except FileExistsError:
            continue  # another save took this number meanwhile
    raise LycorisError(f"no free file name for prefix {prefix!r} after {MAX_TRIES} tries", file=root)


class SaveLycoris:
    """Output node writing a LYCORIS value to the loras folder."""

    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lycoris_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name inside the loras folder (as LoRA loaders list it).",)
    DESCRIPTION = ("Save a LyCORIS adapter (e.g. from LyCORIS Train) as a standard LyCORIS safetensors "
                   "file with kohya ss_* metadata in the loras folder. Files are numbered and never "
                   "overwritten.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lycoris": (LYCORIS_TYPE, {"tooltip": "The adapter to save."}),
                "filename_prefix": ("STRING", {"default": "lycoris/trained", "tooltip": "Path inside "
                                    "the loras folder; _00001_.safetensors etc. is appended."}),
                "save_dtype": (list(SAVE_DTYPES), {"default": "fp16", "tooltip": "Dtype of the saved "
                               "tensors (alpha is always stored exactly in fp32)."}),
            },
        }

    def save(self, lycoris, filename_prefix, save_dtype):
        path = save_lycoris(lycoris, filename_prefix, SAVE_DTYPES[save_dtype])
        name = os.path.relpath(path, loras_root()).replace(os.sep, "/")
        return {"ui": {"text": [name]}, "result": (name,)}


NODE_CLASS_MAPPINGS = {"SaveLycoris": SaveLycoris}
NODE_DISPLAY_NAME_MAPPINGS = {"SaveLycoris": "Save LyCORIS"}
