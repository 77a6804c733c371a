"""Extract LyCORIS and Resize LyCORIS: the core's `extract` and `resize` commands as nodes, writing a
new file to the output folder, with a progress bar and cancel."""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths

from ..lycoris_core.adapter_file import load_file
from ..lycoris_core.save import save_file
from ..lycoris_core.tools.extract import DTYPES, extract, extracted_metadata, report_lines
from ..lycoris_core.tools.lowrank import RULES, RankRule, Solver
from ..lycoris_core.tools.resize import file_dtype, resize, resized_metadata
from .report import show_on_node

CATEGORY = "loaders/lycoris"
AS_STORED = "as stored"
RULE_VALUE = {"default": 0.9, "min": 0.0, "max": 1000.0, "step": 0.001}
RANK = {"default": 32, "min": 1, "max": 4096}
RULE_HELP = ("fixed: the rank below. sv_fro: smallest rank keeping `value` (0..1) of each module's "
             "Frobenius norm; sv_cumulative: smallest rank whose singular values sum to `value` "
             "(0..1) of the total; sv_ratio: singular values above s_max / `value` (>= 1); "
             "sv_threshold: singular values above `value`. With an sv_* rule, rank is the cap.")


def _progress(items, total):
    """The node's progress bar over the modules, and cancel between modules."""
    bar = comfy.utils.ProgressBar(max(1, total))
    for i, item in enumerate(items, 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        yield item
        bar.update_absolute(i)


def _rules(rank_rule: str, rank: int, value: float, conv_rank: int) -> tuple[RankRule, RankRule]:
    if rank_rule == "fixed":
        rule = RankRule("fixed", rank)
        return rule, RankRule("fixed", conv_rank) if conv_rank else rule
    return RankRule(rank_rule, value, rank), RankRule(rank_rule, value, conv_rank or rank)


def _out_path(prefix: str) -> str:
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory())
    return os.path.join(folder, f"{filename}_{counter:05}_.safetensors")


def _device():
    return comfy.model_management.get_torch_device()


def _rule_inputs() -> dict:
    return {
        "rank_rule": (list(RULES), {"default": "fixed", "tooltip": RULE_HELP}),
        "rank": ("INT", {**RANK, "tooltip": "The rank (fixed rule) or the rank cap (sv_* rules)."}),
        "value": ("FLOAT", {**RULE_VALUE, "tooltip": "The sv_* rule's value (unused when fixed)."}),
        "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip":
                              "Rank (or cap) of conv layers with kernels larger than 1x1; 0: as above."}),
    }


def _finish(out: str, result, what: str, unique_id, skip_unit: str = "tensor"):
    table, summary = report_lines(result.rows, result.skipped, what=what, skip_unit=skip_unit)
    report = "\n".join([f"wrote {out} ({result.seconds:.1f} s)"] + summary + [""] + table)
    show_on_node("\n".join([f"wrote {os.path.basename(out)}"] + summary), unique_id)
    return {"ui": {"text": [report]}, "result": (report,)}


class ExtractLycoris:
    """Two checkpoints -> a LoRA/LoCon of their difference, in the output folder."""

    CATEGORY = CATEGORY
    FUNCTION = "extract"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the file was written, and per module the rank, the share of the change "
                       "kept and the relative error.",)
    DESCRIPTION = ("Extract an adapter from tuned - base by truncated SVD, layer by layer (the "
                   "checkpoints are read memory-mapped, one weight at a time). The file loads in "
                   "Load LyCORIS and in ComfyUI's own LoRA loader.")

    @classmethod
    def INPUT_TYPES(cls):
        ckpts = folder_paths.get_filename_list("checkpoints")
        return {"required": {
            "base_ckpt": (ckpts, {"tooltip": "The checkpoint the model was tuned from."}),
            "tuned_ckpt": (ckpts, {"tooltip": "The tuned checkpoint."}),
            "algo": (["lora", "locon"], {"default": "locon", "tooltip":
                     "lora: Linear and 1x1 conv layers; locon: also larger conv kernels."}),
            **_rule_inputs(),
            "solver": (["randomized", "exact"], {"default": "randomized", "tooltip":
                       "randomized: range finder with power iterations, much faster on large layers; "
                       "the report gives the error it reached."}),
            "dtype": (list(DTYPES), {"default": "fp16"}),
            "filename_prefix": ("STRING", {"default": "loras/lycoris_extracted"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def extract(self, base_ckpt, tuned_ckpt, algo="locon", rank_rule="fixed", rank=32, value=0.9,
                conv_rank=0, solver="randomized", dtype="fp16",
                filename_prefix="loras/lycoris_extracted", unique_id=None):
        base = folder_paths.get_full_path_or_raise("checkpoints", base_ckpt)
        tuned = folder_paths.get_full_path_or_raise("checkpoints", tuned_ckpt)
        rule, conv_rule = _rules(rank_rule, rank, value, conv_rank)
        svd = Solver(randomized=solver == "randomized")
        result = extract(base, tuned, rule=rule, conv_rule=conv_rule, algo=algo, solver=svd,
                         device=_device(), iterate=_progress)
        if not result.adapters:
            raise ValueError(f"{tuned_ckpt}: no weight differs from {base_ckpt}; nothing to write")
        out = _out_path(filename_prefix)
        meta = extracted_metadata(result.adapters, algo=algo, rule=rule, conv_rule=conv_rule,
                                  solver=svd, base_name=base_ckpt, tuned_name=tuned_ckpt)
        save_file(result.adapters, out, meta, dtype=DTYPES[dtype])
        return _finish(out, result, "extracted", unique_id)


class ResizeLycoris:
    """A LoRA/LoCon/DoRA (or LoHa/LoKr) file -> the same change at a new rank, in the output folder."""

    CATEGORY = CATEGORY
    FUNCTION = "resize"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("Where the file was written, and per module the new rank and relative error.",)
    DESCRIPTION = ("Re-factor every module's change at a new rank by SVD (the best approximation of "
                   "that rank); DoRA keeps its magnitude, LoHa/LoKr become LoRA.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The file to resize."}),
            **_rule_inputs(),
            "keep_unsupported": ("BOOLEAN", {"default": False, "tooltip": "Copy modules of "
                                 "algorithms a LoRA cannot hold (OFT, (IA)^3, GLoRA, full, norm) "
                                 "unchanged instead of refusing the file."}),
            "dtype": ([AS_STORED, *DTYPES], {"default": AS_STORED}),
            "filename_prefix": ("STRING", {"default": "loras/lycoris_resized"}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def resize(self, lora_name, rank_rule="fixed", rank=32, value=0.9, conv_rank=0,
               keep_unsupported=False, dtype=AS_STORED, filename_prefix="loras/lycoris_resized",
               unique_id=None):
        # the file's own module names are kept (no host key conversion): the new file is a copy
        adapters = load_file(folder_paths.get_full_path_or_raise("loras", lora_name))
        rule, conv_rule = _rules(rank_rule, rank, value, conv_rank)
        _, result = resize(adapters, rule=rule, conv_rule=conv_rule, device=_device(),
                           keep_unsupported=keep_unsupported, iterate=_progress)
        out = _out_path(filename_prefix)
        meta = resized_metadata(adapters, result.adapters, rule, lora_name)
        save_file(result.adapters, out, meta,
                  dtype=DTYPES[dtype] if dtype in DTYPES else file_dtype(adapters))
        return _finish(out, result, "resized", unique_id, "module")


NODE_CLASS_MAPPINGS = {"ExtractLycoris": ExtractLycoris, "ResizeLycoris": ResizeLycoris}
NODE_DISPLAY_NAME_MAPPINGS = {"ExtractLycoris": "Extract LyCORIS", "ResizeLycoris": "Resize LyCORIS"}
