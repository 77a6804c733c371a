"""LyCORIS Block Weights / LyCORIS Block Info nodes, and the `/lycoris/blocks` route their UI uses.

Block Weights turns (preset, text spec, lbw_compat) into a `BlockStrengths` (type
LYCORIS_BLOCK_WEIGHTS) that both loaders take: the preset is applied first, the spec on top of it.
`lora_name` only tells the UI (and the node's summary) which blocks exist; the value sent to
Python, preset + spec + lbw_compat, fully determines the strengths.

The route (registered at import when the ComfyUI server exists) lists the blocks a file in the
`loras` folder touches, grouped for the UI, and resolves a spec to one value per block, so the web
extension never re-implements the spec grammar:

    GET  /lycoris/blocks?file=<loras-relative name>[&preset=..&spec=..&lbw_compat=1]
    POST /lycoris/blocks  {"file": .., "preset": .., "spec": .., "lbw_compat": ..}
    -> {file, arch, title, groups: [{id, title}], blocks: [{id, group, label, selector}],
        values: {block: value} | null, error: null | "bad block-strength spec token ...",
        presets: [{name, rules}]}

Only names listed by `folder_paths.get_filename_list("loras")` are opened (404 otherwise).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import folder_paths

from ..lycoris_core import LycorisError
from ..lycoris_core.blocks import (PRESETS, BlockSpecError, BlockStrengths, analyse, block_group,
                                   blocks_present, detect_arch, format_analysis, group_title,
                                   parse_spec)
from ..lycoris_core.blocks.names import BASE, OTHER, T5
from ..lycoris_core.blocks.spec import split_tokens
from ..lycoris_core.io import read_header
from ..lycoris_core.keys import group_keys
from .host_compat import read_adapters
from .report import show_on_node

log = logging.getLogger("comfyui-lycoris")

CATEGORY = "loaders/lycoris"
BLOCK_WEIGHTS_TYPE = "LYCORIS_BLOCK_WEIGHTS"
NO_FILE = "(none)"
CUSTOM = "custom"
ROUTE = "/lycoris/blocks"

_LABELS = {BASE: "BASE (CLIP)", T5: "T5", "IN": "IN (embedders)", "OUT": "OUT (final)",
           OTHER: "OTHER"}

FILE_TOOLTIP = ("The LyCORIS/LoRA file whose blocks get a slider (only used to know which blocks "
                "exist; the strengths apply to whatever loader this node feeds). (none): no sliders, "
                "the spec alone.")
PRESET_TOOLTIP = ("Applied first; the spec is applied on top of it (picking a preset in the editor "
                  "clears the spec, so the sliders show the preset). custom: no preset (every block "
                  "1 unless the spec says otherwise). INS/IND/MIDD/OUTD/OUTS/INALL/OUTALL/NONE/ALL/"
                  "ALL0.5 are the LoRA Block Weight presets, written as block rules.")
SPEC_TOOLTIP = ("Block strengths, items separated by , ; or new lines, later items win: "
                "IN04=0.5, OUT=0, M00=1.2, TE=0, D00-D09=0.8, re:attn2=0, default=1, a preset "
                "name, or an LBW vector (17/26 values SD1, 12/20 SDXL, 61 Flux). The sliders edit it.")
COMPAT_TOOLTIP = ("LoRA Block Weight compatibility: blocks a short vector or a built-in preset does "
                  "not list are set to 0 instead of keeping 1 (only matters for conv blocks of "
                  "LoCon files and vectors shorter than the full block list).")


# ----- files ----------------------------------------------------------------------------------

class UnknownFile(LookupError):
    """A name that is not in the loras folder list (never opened)."""


def lora_choices() -> list[str]:
    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    """The full path of a name from the loras list; other names are refused, never opened."""
    if not isinstance(name, str) or name not in lora_choices():
        raise UnknownFile(f"{name!r} is not a file of the loras folder list")
    path = folder_paths.get_full_path("loras", name)
    if not path:
        raise UnknownFile(f"{name!r} is listed in the loras folder but was not found on disk")
    return path


_NAMES_CACHE: "OrderedDict[tuple, list[str]]" = OrderedDict()
_NAMES_LOCK = threading.Lock()
_NAMES_CACHE_SIZE = 16


def file_module_names(path: str) -> list[str]:
    """Module names of a safetensors adapter file, read from its header only (cached by mtime)."""
    st = os.stat(path)
    signature = (path, st.st_mtime_ns, st.st_size)
    with _NAMES_LOCK:
        if signature in _NAMES_CACHE:
            _NAMES_CACHE.move_to_end(signature)
            return _NAMES_CACHE[signature]
    header, _ = read_header(path)
    modules, _, _ = group_keys(header)
    # a lone `<module>.weight` is no adapter (the loader skips it too)
    names = [n for n, keys in modules.items() if set(keys) != {"weight"}]
    with _NAMES_LOCK:
        _NAMES_CACHE[signature] = names
        while len(_NAMES_CACHE) > _NAMES_CACHE_SIZE:
            _NAMES_CACHE.popitem(last=False)
    return names


# ----- specs and block listings ------------------------------------------------------------------

def combine(preset: str | None, spec: str | None, lbw_compat: bool = False) -> BlockStrengths:
    """The strengths of (preset, spec): the preset's rules first, the spec's on top."""
    preset = (preset or CUSTOM).strip()
    if preset.upper() == CUSTOM.upper() or not preset:
        base = BlockStrengths()
    elif preset.upper() in PRESETS:
        base = parse_spec(preset.upper(), lbw_compat=lbw_compat)
    else:
        raise BlockSpecError(preset, f"unknown preset: expected {CUSTOM} or one of {', '.join(PRESETS)}")
    return base.then(parse_spec(spec or "", lbw_compat=lbw_compat))


def block_selector(block: str, present: Iterable[str]) -> str:
    """A spec selector that, among the file's blocks, applies to `block` alone (what a slider
    writes). BASE is written CLIP when the file also has T5 (BASE would cover both)."""
    if block == BASE and T5 in present:
        return "CLIP"
    return block


def block_listing(names: Iterable[str], strengths: BlockStrengths | None = None) -> dict:
    """The blocks a file touches, grouped for the UI, with their values under `strengths`."""
    names = list(names)
    arch = detect_arch(names)
    present = blocks_present(names, arch=arch)
    groups: list[str] = []
    blocks = []
    for block in present:
        group = block_group(block)
        if group not in groups:
            groups.append(group)
        blocks.append({"id": block, "group": group, "label": _LABELS.get(block, block),
                       "selector": block_selector(block, present)})
    out = {"arch": arch.name, "title": arch.title, "modules": len(names),
           "groups": [{"id": g, "title": group_title(g)} for g in groups], "blocks": blocks,
           "values": None}
    if strengths is not None:
        out["values"] = {b: strengths.block_value(b) for b in present}
    return out


def unmatched_selectors(spec: str | None, names: Iterable[str]) -> list[str]:
    """Selectors written as `NAME=value` in the spec that apply to nothing in the file (typos,
    blocks the file lacks); vectors and presets, which list every block, are not checked."""
    names = list(names)
    out: list[str] = []
    for token in split_tokens(spec or ""):
        if "=" not in token or token.split("=", 1)[0].strip().lower() == "default":
            continue
        for selector in parse_spec(token).bind(names).unmatched(names):
            if selector not in out:
                out.append(selector)
    return out


def preset_list() -> list[dict]:
    return [{"name": CUSTOM, "rules": ""}] + [{"name": n, "rules": r} for n, (r, _) in PRESETS.items()]


def blocks_request(params: Mapping) -> tuple[int, dict]:
    """(HTTP status, JSON body) of the block-list route for query/body `params`."""
    file = params.get("file") or ""
    preset = params.get("preset") or CUSTOM
    spec = params.get("spec") or ""
    compat = params.get("lbw_compat")
    compat = compat is True or str(compat).strip().lower() in ("1", "true", "yes", "on")
    if not all(isinstance(v, str) for v in (file, preset, spec)):
        return 400, {"error": "file, preset and spec must be strings"}
    body = {"file": None, "arch": None, "title": None, "modules": 0, "groups": [], "blocks": [],
            "values": {}, "error": None, "presets": preset_list()}
    names: list[str] = []
    if file and file != NO_FILE:
        try:
            names = file_module_names(lora_path(file))
        except UnknownFile as exc:
            return 404, {"error": str(exc)}
        except (LycorisError, OSError) as exc:
            return 422, {"error": f"cannot read the block list of {file!r}: {exc}"}
        body["file"] = file
    try:
        strengths = combine(preset, spec, compat)
    except BlockSpecError as exc:
        strengths, body["error"] = None, str(exc)
    if names:
        body.update(block_listing(names, strengths))
    if strengths is None:
        body["values"] = None
    return 200, body


# ----- nodes -----------------------------------------------------------------------------------

class LycorisBlockWeights:
    """Per-block strengths for the LyCORIS loaders (merge and bypass)."""

    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (BLOCK_WEIGHTS_TYPE,)
    RETURN_NAMES = ("block_weights",)
    OUTPUT_TOOLTIPS = ("Per-block strength multipliers; connect to a Load LyCORIS node's "
                       "block_weights input.",)
    DESCRIPTION = ("Per-block strengths for the LyCORIS loaders: one slider per block of the chosen "
                   "file (text encoder / IN / MID / OUT, or double / single for DiTs), a preset, and "
                   "a text spec the sliders edit. Works the same in merge and bypass mode.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": ([NO_FILE] + lora_choices(), {"tooltip": FILE_TOOLTIP}),
                "preset": ([CUSTOM] + list(PRESETS), {"default": CUSTOM, "tooltip": PRESET_TOOLTIP}),
                "spec": ("STRING", {"multiline": True, "default": "", "tooltip": SPEC_TOOLTIP}),
                "lbw_compat": ("BOOLEAN", {"default": False, "tooltip": COMPAT_TOOLTIP}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, spec):
        """A bad spec fails the prompt before anything runs, naming the token (linked: None)."""
        if spec is None:
            return True
        try:
            parse_spec(spec)
        except BlockSpecError as exc:
            return str(exc)
        return True

    def build(self, lora_name, preset, spec, lbw_compat=False, unique_id=None):
        strengths = combine(preset, spec, bool(lbw_compat))
        summary = strengths.describe()
        if lora_name and lora_name != NO_FILE:
            try:
                names = file_module_names(lora_path(lora_name))
            except (UnknownFile, LycorisError, OSError) as exc:
                log.warning("LyCORIS Block Weights: %s (the strengths still apply)", exc)
            else:
                strengths = strengths.bind(names)
                summary = strengths.describe(names)
                unused = unmatched_selectors(spec, names)
                if unused:
                    summary += f"\nno block of {lora_name} matches: {', '.join(unused)}"
        show_on_node(summary, unique_id)
        return {"ui": {"text": [summary]}, "result": (strengths,)}


class _BaseWeights(Mapping):
    """module name -> the model's current weight (fp32, CPU), read lazily one module at a time.

    Weights of another shape than the adapter's, and quantised storage (GGUF, int), count as
    absent; `skipped` counts them. Each lookup ticks the progress bar (and checks interrupts)."""

    def __init__(self, adapters: Mapping, sources: dict, pbar=None):
        self.adapters, self.sources, self.pbar = adapters, sources, pbar
        self.skipped = 0

    def __getitem__(self, name):
        import torch

        if self.pbar is not None:
            self.pbar.update(1)
        root, key, offset = self.sources[name]
        import comfy.utils

        try:
            weight = comfy.utils.get_attr(root, key)
        except AttributeError:
            raise KeyError(name) from None
        if (not isinstance(weight, torch.Tensor) or getattr(weight, "tensor_shape", None) is not None
                or weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64)):
            self.skipped += 1
            raise KeyError(name)
        weight = weight.detach()
        if offset is not None:
            weight = weight.narrow(*offset)
        expected = getattr(self.adapters[name], "target_shape", None)
        if expected is not None and tuple(expected) != tuple(weight.shape):
            self.skipped += 1
            raise KeyError(name)
        return weight.to("cpu", torch.float32)

    def __iter__(self):
        return iter(self.sources)

    def __len__(self):
        return len(self.sources)


def _preview(img) -> dict:
    """Save the chart in the temp folder so the node shows it."""
    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    name = f"lycoris_blocks_{uuid.uuid4().hex[:16]}.png"
    img.save(os.path.join(folder, name), compress_level=1)
    return {"filename": name, "subfolder": "", "type": "temp"}


class LycorisBlockInfo:
    """Which blocks a file changes, and how much."""

    CATEGORY = CATEGORY
    FUNCTION = "info"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("table", "chart")
    OUTPUT_TOOLTIPS = ("Per block: module count, |dW| and |dW|/|W| (with a model) at strength 1.",
                       "The same as a bar chart, one bar per block.")
    DESCRIPTION = ("Analyse a LyCORIS file per block: how many modules each block has and how much "
                   "it changes the weights at strength 1 (|dW|; with a model connected also "
                   "|dW|/|W|, and OFT/BOFT/GLoRA/IA3/DoRA blocks get numbers at all).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (lora_choices(), {"tooltip": "The LyCORIS/LoRA file to analyse."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "Optional base model: gives |dW|/|W| per block and "
                                               "the change of algorithms that depend on the weight "
                                               "(OFT, BOFT, GLoRA, IA3, DoRA)."}),
                "clip": ("CLIP", {"tooltip": "Optional text encoder, the same for text-encoder "
                                             "modules."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, **kwargs):
        path = folder_paths.get_full_path("loras", lora_name)
        if not path:
            return lora_name
        st = os.stat(path)
        return (path, st.st_mtime_ns, st.st_size)

    def info(self, lora_name, model=None, clip=None, unique_id=None):
        import comfy.utils

        from .block_chart import draw_blocks, to_image_tensor

        path = lora_path(lora_name)
        adapters = read_adapters(path)
        model_keys, sources, unmatched = {}, {}, 0
        if model is not None or clip is not None:
            from .keymap import CLIP, MODEL, KeyMap

            roots = {}
            if model is not None:
                roots[MODEL] = model.model
            if clip is not None:
                roots[CLIP] = clip.patcher.model
            resolution = KeyMap(model, clip).resolve(adapters)
            for t in resolution.targets:
                model_keys[t.name] = t.key
                sources[t.name] = (roots[t.part], t.key, t.offset)
            unmatched = len(resolution.unmatched)
        pbar = comfy.utils.ProgressBar(max(1, len(adapters)))
        bases = _BaseWeights(adapters, sources, pbar)
        rows = analyse(adapters, bases, model_keys=model_keys)
        arch = detect_arch(list(adapters))
        lines = [f"LyCORIS block info: {lora_name} ({arch.title}, {len(adapters)} modules)"]
        if model is None and clip is None:
            lines.append("no model connected: |dW| only (connect MODEL for |dW|/|W|)")
        else:
            lines.append(f"{len(sources)} module(s) found in the connected model(s)")
            if unmatched:
                lines.append(f"{unmatched} module(s) match nothing in the connected model(s)")
            if bases.skipped:
                lines.append(f"{bases.skipped} base weight(s) not used (other shape or quantised)")
        table = "\n".join(lines + [format_analysis(rows)])
        img = draw_blocks(rows, [block_group(r.block) for r in rows],
                          title=os.path.basename(lora_name))
        return {"ui": {"text": [table], "images": [_preview(img)]},
                "result": (table, to_image_tensor(img))}


NODE_CLASS_MAPPINGS = {
    "LycorisBlockWeights": LycorisBlockWeights,
    "LycorisBlockInfo": LycorisBlockInfo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LycorisBlockWeights": "LyCORIS Block Weights",
    "LycorisBlockInfo": "LyCORIS Block Info",
}


# ----- route -----------------------------------------------------------------------------------

async def handle_blocks(request):
    """aiohttp handler of GET/POST /lycoris/blocks (see the module docstring)."""
    import asyncio

    from aiohttp import web

    if request.method == "POST":
        try:
            params = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
        if not isinstance(params, dict):
            return web.json_response({"error": "the body must be a JSON object"}, status=400)
    else:
        params = dict(request.rel_url.query)
    status, body = await asyncio.to_thread(blocks_request, params)
    return web.json_response(body, status=status)


def register_routes(instance) -> bool:
    """Add the route to a PromptServer once; False when already there."""
    if getattr(instance, "_lycoris_block_routes", False):
        return False
    instance.routes.get(ROUTE)(handle_blocks)
    instance.routes.post(ROUTE)(handle_blocks)
    instance._lycoris_block_routes = True
    return True


def _register_at_import() -> None:
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and hasattr(instance, "routes"):
        register_routes(instance)


_register_at_import()
