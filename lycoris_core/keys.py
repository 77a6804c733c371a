"""Split file keys into (module, canonical suffix) across the kohya/LyCORIS, diffusers and peft families."""
from __future__ import annotations

from collections.abc import Iterable

from .algos.registry import known_suffixes

# other trainers' spellings -> our canonical LyCORIS suffix; matched at the end of a key after a "."
ALIASES: dict[str, str] = {
    "lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
    "lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
    "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale",
    # XLabs Flux processors (`double_blocks.0.processor.qkv_lora1.down.weight`)
    "down.weight": "lora_down.weight", "up.weight": "lora_up.weight",
}
# PEFT's DoRA magnitude spellings: always the output axis, whatever the tensor's shape suggests
PEFT_MAGNITUDE_ENDINGS = tuple("." + s for s, c in ALIASES.items() if c == "dora_scale")


def is_peft_magnitude(key: str | None) -> bool:
    """Whether a file key is a PEFT `lora_magnitude_vector` (rather than a LyCORIS `dora_scale`)."""
    return key is not None and key.endswith(PEFT_MAGNITUDE_ENDINGS)


# old diffusers attention processors glue the suffix on with "_" (…processor.to_q_lora.up.weight)
GLUED_ALIASES: dict[str, str] = {"_lora.down.weight": "lora_down.weight",
                                 "_lora.up.weight": "lora_up.weight"}
# keys that are understood but never patch a weight
IGNORED_SUFFIXES: dict[str, str] = {
    "bias_indices": "sparse bias residual from old extract tools is not applied",
    "bias_values": "sparse bias residual from old extract tools is not applied",
    "bias_size": "sparse bias residual from old extract tools is not applied",
    "scale": "A1111-only 'scale' key is not used (alpha/rank is)",
}


def _suffix_table(suffixes: Iterable[str] | None) -> list[tuple[str, str]]:
    """(key ending, canonical suffix), longest ending first so the most specific one wins
    (`…to_q_lora.up.weight` is the glued LoRA spelling, not IA3's bare `weight`)."""
    table = {"." + s: s for s in (suffixes or known_suffixes())}
    table.update({"." + s: c for s, c in ALIASES.items()})
    table.update({"." + s: s for s in IGNORED_SUFFIXES})
    table.update(GLUED_ALIASES)
    return sorted(table.items(), key=lambda item: -len(item[0]))


def _split(key: str, table: list[tuple[str, str]]) -> tuple[str, str | None]:
    for ending, canonical in table:
        if key.endswith(ending):
            return key[: -len(ending)], canonical
    return (key.split(".", 1)[0] if "." in key else key), None


def split_key(key: str, suffixes: Iterable[str] | None = None) -> tuple[str, str | None]:
    """(module, canonical suffix), or (best-guess module, None) when no suffix is known."""
    return _split(key, _suffix_table(suffixes))


def group_keys(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str],
                                              list[tuple[str, str]]]:
    """({module: {canonical suffix: file key}}, [keys with no known suffix], [(key, earlier key)
    for keys that name a module's suffix another key already named, e.g. `lora_A` and
    `lora_down` of one module]); the first key of a clash is the one kept."""
    table = _suffix_table(None)
    modules: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    clashes: list[tuple[str, str]] = []
    for key in keys:
        module, suffix = _split(key, table)
        if suffix is None:
            unknown.append(key)
        elif suffix in modules.setdefault(module, {}):
            clashes.append((key, modules[module][suffix]))
        else:
            modules[module][suffix] = key
    return modules, unknown, clashes
