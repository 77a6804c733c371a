"""LyCORIS Info: a file's trigger words as a STRING to wire into a text encoder, and its full report
(hashes, algorithms, ranks, blocks, training arguments), computed by `lycoris_core.inspect`."""
from __future__ import annotations

import comfy.utils
import folder_paths

from ..lycoris_core.inspect import format_info, info_file
from .loaders import CATEGORY, FILE_TOOLTIP, file_signature
from .report import show_on_node

SEPARATOR = ", "


def _hash_progress(chunks, total):
    """The hashing read as a progress bar on the node (one tick per MiB)."""
    bar = comfy.utils.ProgressBar(max(1, total))
    for chunk in chunks:
        yield chunk
        bar.update(1)


class LycorisInfo:
    """File -> trigger words and report."""

    CATEGORY = CATEGORY
    FUNCTION = "info"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("trigger_words", "report")
    OUTPUT_TOOLTIPS = ("The file's trigger words, comma separated: declared ones first "
                       "(modelspec.trigger_phrase, a Civitai Helper .civitai.info or A1111 .json "
                       "beside the file), then the most frequent training tags.",
                       "sha256 and AutoV2/AutoV1/AutoV3 hashes, trigger words, training arguments, "
                       "algorithms, ranks, blocks, problems.")
    DESCRIPTION = ("What a LyCORIS/LoRA file holds and how to prompt it: wire `trigger_words` into a "
                   "text encoder (e.g. through a text-concatenate node); the report names the hashes "
                   "model sites show.")

    def __init__(self):
        self._cached = None  # ((signature, words), report): files are hashed once while unchanged

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lycoris_name": (folder_paths.get_filename_list("loras"), {"tooltip": FILE_TOOLTIP}),
                "max_words": ("INT", {"default": 5, "min": 0, "max": 200, "tooltip":
                                      "At most this many trigger words (0: none)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, lycoris_name, max_words=5, **kwargs):
        path = folder_paths.get_full_path("loras", lycoris_name)
        return (file_signature(path) if path else lycoris_name, max_words)

    def info(self, lycoris_name, max_words=5, unique_id=None):
        path = folder_paths.get_full_path_or_raise("loras", lycoris_name)
        key = (file_signature(path), max_words)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, info_file(path, triggers=max_words, hash_progress=_hash_progress))
        report = self._cached[1]
        words = SEPARATOR.join(report["trigger_words"])
        text = format_info(report)
        show_on_node(text, unique_id)
        return {"ui": {"text": [text]}, "result": (words, text)}


NODE_CLASS_MAPPINGS = {"LycorisInfo": LycorisInfo}
NODE_DISPLAY_NAME_MAPPINGS = {"LycorisInfo": "LyCORIS Info (trigger words)"}
