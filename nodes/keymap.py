"""File module name -> model key: the host's key maps first, then our normalisation.

The host (`comfy.lora.model_lora_keys_unet/clip`) knows every architecture it supports, including
offsets into fused weights and transform functions. Names it misses (`lycoris_`/`lora_transformer_`
prefixes on DiTs, peft `base_model.model.` paths, any other trainer prefix in front of a module path
the host knows) are looked up by their normalised path (prefix stripped, `.` -> `_`, lower case),
indexed from the host's own diffusion-model keys; diffusers paths of families the host knows only
natively (Wan) are tried in their native spelling (`lycoris_core.native_names`). Text-encoder names
the host maps only as `text_encoders.<key>` (the LLM encoders: Qwen2.5-VL, Gemma 2, Qwen3, Llama) are
looked up by their module path below the decoder's root, as kohya (`lora_te_layers_0_...`) and PEFT
(`base_model.model.model.layers.0...`) name them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import comfy.lora
import comfy.utils

from ..lycoris_core.blocks.names import is_text_encoder, unet_path
from ..lycoris_core.native_names import (host_text_encoder_path, native_candidates, piece_offset, swap_halves,
                                         text_encoder_path)

MODEL = "model"
CLIP = "clip"
# kohya names of a CLIPTextModel saved by transformers 5, which has no `text_model` level
_KOHYA_TE_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te\d*_)(?:encoder|embeddings|final_layer_norm)_")


@dataclass(frozen=True)
class Target:
    """Where one adapter goes: model part, state-dict key, optional slice and transform."""

    name: str  # module name in the file
    adapter: Any  # lycoris_core Adapter
    part: str  # MODEL | CLIP
    key: str  # state-dict key of the weight, e.g. "diffusion_model.x.weight"
    offset: tuple[int, int, int] | None = None  # (dim, start, length) into the weight
    function: Callable | None = None  # host transform of the weight change (e.g. swap_scale_shift)

    @property
    def module_path(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key

    @property
    def bias_key(self) -> str:
        return self.module_path + ".bias"

    @property
    def patch_key(self) -> str | tuple:
        """The key form `ModelPatcher.add_patches` takes."""
        return self._host_key(self.key, self.offset)

    @property
    def bias_patch_key(self) -> str | tuple:
        """The same for the bias: sliced like the output rows, transformed like the weight."""
        offset = self.offset if self.offset is not None and self.offset[0] == 0 else None
        return self._host_key(self.bias_key, offset)

    def _host_key(self, key: str, offset) -> str | tuple:
        if self.function is not None:
            return (key, offset, self.function)
        if offset is not None:
            return (key, offset)
        return key


@dataclass
class Resolution:
    """Targets found for a file, and the names that found none."""

    targets: list[Target] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # no key in any present model part
    text_encoder_skipped: list[str] = field(default_factory=list)  # TE names, no CLIP given


def _split_value(value) -> tuple[str, tuple | None, Callable | None]:
    """A host key-map value: "key", (key, offset) or (key, offset, function)."""
    if isinstance(value, str):
        return value, None, None
    key = value[0]
    offset = tuple(value[1]) if len(value) > 1 and value[1] is not None else None
    function = value[2] if len(value) > 2 else None
    return key, offset, function


class KeyMap:
    """Name lookup for one model (UNet/DiT) and/or one text encoder set."""

    def __init__(self, model=None, clip=None):
        # fresh dicts: the host functions have a mutable default argument
        self.unet = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
        self.clip = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
        self.has_model = model is not None
        self._model_root = model.model if model is not None else None
        self.has_clip = clip is not None
        self._normalised = self._index(self.unet)
        self._clip_keys = set(clip.cond_stage_model.state_dict()) if clip is not None else set()
        self._te_roots = self._text_encoder_roots(self.clip)
        self._te_paths = self._text_encoder_index(self._clip_keys)

    @staticmethod
    def _index(key_map: Mapping[str, Any]) -> dict[str, Any]:
        """normalised path -> value, for host names of weights; ambiguous paths are left out."""
        index: dict[str, Any] = {}
        ambiguous: set[str] = set()
        for name, value in key_map.items():
            key = _split_value(value)[0]
            if not key.endswith(".weight"):
                continue
            path = unet_path(name)
            if path in index and _split_value(index[path]) != _split_value(value):
                ambiguous.add(path)
            index.setdefault(path, value)
        for path in ambiguous:
            index.pop(path)
        return index

    @staticmethod
    def _text_encoder_roots(key_map: Mapping[str, Any]) -> dict[str, str]:
        """diffusers part -> host prefix (`text_encoder_2.` -> `clip_g.transformer.`), read off
        the host's own diffusers entries, so each model family's assignment is the host's."""
        roots: dict[str, str] = {}
        for name, value in key_map.items():
            part, _, rest = name.partition(".")
            key = value if isinstance(value, str) else None
            if part.startswith("text_encoder") and rest and key and key.endswith(f".{rest}.weight"):
                roots.setdefault(part + ".", key[: -len(f"{rest}.weight")])
        return roots

    @staticmethod
    def _text_encoder_index(keys) -> dict[str, str]:
        """normalised module path -> host text-encoder weight; paths two encoders share are left out."""
        index: dict[str, str] = {}
        ambiguous: set[str] = set()
        for key in keys:
            path = host_text_encoder_path(key)
            if path is None:
                continue
            if path in index:
                ambiguous.add(path)
            index.setdefault(path, key)
        for path in ambiguous:
            index.pop(path)
        return index

    def _text_encoder_key(self, name: str) -> str | None:
        """A text-encoder name the host map lacks: transformers 5 saves CLIPTextModel without its
        `text_model.` level (diffusers and kohya names alike), and the diffusers encoders'
        `text_projection` is in no host map."""
        kohya = _KOHYA_TE_WITHOUT_TEXT_MODEL.match(name)
        if kohya is not None:
            value = self.clip.get(f"{kohya.group(1)}text_model_{name[kohya.end(1):]}")
            return value if isinstance(value, str) else None
        part, _, rest = name.partition(".")
        prefix = self._te_roots.get(part + ".")
        if prefix is None or not rest:
            return None
        for path in (rest, "text_model." + rest):
            if prefix + path + ".weight" in self._clip_keys:
                return prefix + path + ".weight"
        return None

    def lookup(self, name: str) -> tuple[str, Any] | None:
        """(part, host value) for a file module name, or None."""
        # the host merges its maps with CLIP entries last, so they win on a clash
        if name in self.clip:
            return CLIP, self.clip[name]
        if self.has_clip:
            key = self._text_encoder_key(name)
            if key is not None:
                return CLIP, key
        if name in self.unet:
            return MODEL, self.unet[name]
        if self.has_model and not is_text_encoder(name.lower()):
            path = unet_path(name)
            value = self._normalised.get(path)
            if value is not None:
                return MODEL, value
            for rename in native_candidates(path):
                value = self._native_value(rename)
                if value is not None:
                    return MODEL, value
        if self.has_clip:
            key = self._te_paths.get(text_encoder_path(name) or "")
            if key is not None:
                return CLIP, key
        return None

    def _native_value(self, rename) -> Any:
        """The host value for a native spelling: its piece of a fused weight, its transform."""
        value = self._normalised.get(rename.path)
        if value is None:
            return None
        key, offset, function = _split_value(value)
        if rename.layout is not None:
            if offset is not None:
                return None
            weight = comfy.utils.get_attr(self._model_root, key)
            offset = piece_offset(rename.layout, rename.index, tuple(getattr(weight, "tensor_shape", None)
                                                                      or weight.shape))
            if offset is None:
                return None
        if rename.swap_halves:
            if function is not None:
                return None
            function = swap_halves
        return (key, offset, function) if function is not None else (key, offset) if offset else key

    def resolve(self, adapters: Mapping[str, Any]) -> Resolution:
        """Targets for every adapter of a file; names without a key are reported."""
        out = Resolution()
        for name, adapter in adapters.items():
            hit = self.lookup(name)
            if hit is None:
                if not self.has_clip and is_text_encoder(name.lower()):
                    out.text_encoder_skipped.append(name)
                else:
                    out.unmatched.append(name)
                continue
            part, value = hit
            key, offset, function = _split_value(value)
            out.targets.append(Target(name, adapter, part, key, offset, function))
        return out
