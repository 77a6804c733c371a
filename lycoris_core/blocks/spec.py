"""Block-strength specs: parse text/JSON into rules, resolve a multiplier per module.

The grammar is documented in the package docstring (`lycoris_core.blocks`).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from ..errors import LycorisError
from .archs import ARCHS, LAYOUTS, block_of, detect_arch, module_blocks, module_names
from .names import BASE, OTHER, T5, block_id, block_sort_key, split_id


class BlockSpecError(LycorisError):
    """A block-strength spec that cannot be parsed; `token` is the offending piece of text."""

    def __init__(self, token: str, reason: str):
        self.token = token
        super().__init__(f"bad block-strength spec token {token!r}: {reason}")


# ----- selectors -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    """What a rule applies to. `text` is its canonical spelling (used by to_spec/to_json).

    kinds: `all` (every block but OTHER), `set` (listed ids), `family` (a code with or without
    number: IN matches IN and IN00…), `range` (code with lo <= number <= hi), `regex` (module names).
    """

    text: str
    kind: str
    ids: frozenset[str] = frozenset()
    code: str = ""
    lo: int = 0
    hi: int = 0
    pattern: re.Pattern | None = None

    def matches(self, block: str, name: str = "", key: str | None = None) -> bool:
        """Whether the rule applies to a module of `block` named `name` (model key `key`)."""
        if self.kind == "regex":
            return bool(self.pattern.search(name) or (key and self.pattern.search(key)))
        if self.kind == "all":
            return block != OTHER
        if self.kind == "set":
            return block in self.ids
        code, index = split_id(block)
        if self.kind == "family":
            return block == self.code or (code == self.code and index is not None)
        return code == self.code and index is not None and self.lo <= index <= self.hi


def _set(text: str, *ids: str) -> Selector:
    return Selector(text, "set", frozenset(ids))


_RESERVED = {
    "ALL": Selector("ALL", "all"),
    "BASE": _set("BASE", BASE, T5), "TE": _set("TE", BASE, T5),
    "CLIP": _set("CLIP", BASE), "T5": _set("T5", T5), "OTHER": _set("OTHER", OTHER),
}
_CODE_ALIASES = {"MID": "M", "MIDDLE": "M", "DOUBLE": "D", "SINGLE": "S", "JOINT": "J"}
MAX_CODE = 3  # block codes are at most three letters (container names are at most three words)
_FAMILY = re.compile(r"^[A-Z]{1,6}$")
_NUMBERED = re.compile(r"^([A-Z]{1,6})(\d{1,3})$")
_RANGE = re.compile(r"^([A-Z]{1,6})(\d{1,3})\s*-\s*([A-Z]{1,6})?(\d{1,3})$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_VARIABLE = re.compile(r"^(?:[RUABab]|X(?:\s*[+-].*)?)$")
_VECTOR_HEAD = re.compile(r"^([A-Za-z][\w.\-]*)\s*:\s*(.*)$")


def _code(code: str, token: str) -> str:
    """A block code with its long aliases resolved (MID -> M); too long a code is a typo."""
    code = _CODE_ALIASES.get(code, code)
    if len(code) > MAX_CODE:
        hint = " (a preset takes no '=value')" if code in PRESETS else ""
        raise BlockSpecError(token, f"{code!r} is not a block code: codes have at most {MAX_CODE} "
                                    f"letters (IN, M, OUT, D, S, J, B, DS…){hint}")
    return code


def _range(m: re.Match, token: str) -> Selector:
    """`A-B`: a numeric range inside one family, or a slice of a known block list across two."""
    lo_code, hi_code = _code(m[1], token), _code(m[3] or m[1], token)
    lo, hi = int(m[2]), int(m[4])
    first, last = block_id(lo_code, lo), block_id(hi_code, hi)
    if lo_code == hi_code:
        if lo > hi:
            raise BlockSpecError(token, f"range {first}-{last} runs backwards")
        return Selector(f"{first}-{last}", "range", code=lo_code, lo=lo, hi=hi)
    for arch in ARCHS.values():
        if first in arch.blocks and last in arch.blocks:
            i, j = arch.blocks.index(first), arch.blocks.index(last)
            if i > j:
                raise BlockSpecError(token, f"range {first}-{last} runs backwards in the "
                                            f"{arch.title} block order")
            return _set(f"{first}-{last}", *arch.blocks[i:j + 1])
    raise BlockSpecError(token, f"{first} and {last} are not in one known block list; "
                                "ranges across families work only within SD1/SDXL/Flux lists")


def parse_selector(text: str, token: str | None = None) -> Selector:
    """A selector from its spelling: block id, group, range or `re:<pattern>`."""
    token = text if token is None else token
    stripped = text.strip()
    if stripped[:3].lower() == "re:":
        try:
            return Selector("re:" + stripped[3:], "regex", pattern=re.compile(stripped[3:]))
        except re.error as exc:
            raise BlockSpecError(token, f"invalid regular expression: {exc}") from None
    name = stripped.upper()
    if name in _RESERVED:
        return _RESERVED[name]
    if _FAMILY.match(name):
        code = _code(name, token)
        return Selector(code, "family", code=code)
    m = _NUMBERED.match(name)
    if m:
        ident = block_id(_code(m[1], token), int(m[2]))
        return _set(ident, ident)
    m = _RANGE.match(name)
    if m:
        return _range(m, token)
    raise BlockSpecError(token, f"{stripped!r} is not a block name (IN04, M00, OUT11, D07, S12, "
                                "B03…), a group (BASE, TE, IN, MID, OUT, D, S, ALL…), a range "
                                "(IN04-IN08) or re:<pattern>")


def parse_value(text: str, token: str) -> float:
    """A finite number; LBW's random/variable letters get their own message."""
    text = text.strip()
    if _NUMBER.match(text):
        return float(text)
    if _VARIABLE.match(text):
        raise BlockSpecError(token, "random or variable values (R, U, X, A, B) are not supported: "
                                    "give a number")
    raise BlockSpecError(token, f"{text!r} is not a number" if text else "missing value")


# ----- rules and the parsed spec ----------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """`selector = value`; later rules override earlier ones where both apply."""

    selector: Selector
    value: float


def _fmt(v: float) -> str:
    r = repr(float(v))
    return r[:-2] if r.endswith(".0") else r


def _model_key(key) -> str | None:
    return key[0] if isinstance(key, tuple) else key


@dataclass(frozen=True)
class BlockStrengths:
    """A parsed block-strength spec: ordered rules, a default, optionally the file's arch.

    `strength(module_name, model_key)` is the per-module multiplier the loaders use; build one
    with `parse_spec` (text, JSON text, or a {selector: value} mapping).
    """

    rules: tuple[Rule, ...] = ()
    default: float | None = None
    arch: str | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    # ----- resolution ------------------------------------------------------------------------
    @property
    def fallback(self) -> float:
        """The value where no rule applies (1 unless `default=` was given)."""
        return 1.0 if self.default is None else self.default

    @property
    def is_identity(self) -> bool:
        """True when every module keeps strength 1."""
        return self.fallback == 1.0 and all(r.value == 1.0 for r in self.rules)

    def block_value(self, block: str) -> float:
        """The value of a whole block (regex rules, which look at module names, left out)."""
        value = self.fallback
        for rule in self.rules:
            if rule.selector.kind != "regex" and rule.selector.matches(block):
                value = rule.value
        return value

    def strength(self, module_name: str, model_key: str | tuple | None = None) -> float:
        """The multiplier of one module: the last rule matching its block or name, else the default.

        The block comes from `model_key` (the host's key, e.g. `diffusion_model.input_blocks.4.1.…`)
        when given, else from the file's module name read with this spec's `arch`.
        """
        key = _model_key(model_key)
        hit = self._cache.get((module_name, key))
        if hit is None:
            block = block_of(module_name, key, self.arch)
            hit = self.fallback
            for rule in self.rules:
                if rule.selector.matches(block, module_name, key):
                    hit = rule.value
            self._cache[(module_name, key)] = hit
        return hit

    def bind(self, adapters: Mapping[str, object] | Iterable[str]) -> "BlockStrengths":
        """This spec with `arch` detected from a file's module names (for diffusers-named DiTs)."""
        return replace(self, arch=detect_arch(module_names(adapters)).name)

    def then(self, other: "BlockStrengths | str | Mapping | None") -> "BlockStrengths":
        """Both specs, `other` applied after this one (its rules and default win)."""
        other = parse_spec(other)
        default = other.default if other.default is not None else self.default
        return BlockStrengths(self.rules + other.rules, default, self.arch or other.arch)

    # ----- output ----------------------------------------------------------------------------
    def _unique_rules(self) -> list[Rule]:
        """Rules with fully overridden repeats of the same selector dropped (same meaning)."""
        last = {r.selector.text: i for i, r in enumerate(self.rules)}
        return [r for i, r in enumerate(self.rules) if last[r.selector.text] == i]

    def to_json(self) -> dict[str, float]:
        """`{selector: value}` (plus `default`), in rule order; `parse_spec` reads it back."""
        out = {} if self.default is None else {"default": self.default}
        out.update({r.selector.text: r.value for r in self._unique_rules()})
        return out

    def __str__(self) -> str:
        return self.to_spec() or "(all blocks at 1)"

    def to_spec(self) -> str:
        """The spec as text in canonical spelling; `parse_spec` reads it back."""
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.to_json().items())

    def describe(self, adapters: Mapping[str, object] | Iterable[str] | None = None,
                 model_keys: Mapping[str, str | tuple] | None = None) -> str:
        """The populated vector as text: each block a file has with its value, plus the LBW
        vector of the file's family; without a file, the spec itself."""
        if adapters is None:
            return self.to_spec() or "ALL=1 (no change)"
        names = module_names(adapters)
        arch = ARCHS.get(self.arch or "") or detect_arch(names)
        blocks = sorted(set(module_blocks(names, model_keys, arch).values()), key=block_sort_key)
        lines = [f"{arch.title}: " + ", ".join(f"{b}={_fmt(self.block_value(b))}" for b in blocks)]
        regex = sum(1 for r in self.rules if r.selector.kind == "regex")
        if regex:
            lines.append(f"{regex} regex rule(s) on module names also apply")
        if arch.layouts:
            n = max(arch.layouts)
            slots = arch.layouts[n]
            lines.append(f"LBW {n}: " + ",".join(_fmt(self.block_value(_slot_block(s))) for s in slots))
        return "\n".join(lines)

    def unmatched(self, adapters: Mapping[str, object] | Iterable[str],
                  model_keys: Mapping[str, str | tuple] | None = None) -> list[str]:
        """Selectors that apply to nothing in this file (typos, or blocks the file lacks)."""
        names = module_names(adapters)
        blocks = module_blocks(names, model_keys, self.arch)
        keys = model_keys or {}
        out = []
        for rule in self._unique_rules():
            sel = rule.selector
            if not any(sel.matches(b, n, _model_key(keys.get(n))) for n, b in blocks.items()):
                out.append(sel.text)
        return out


def _slot_block(slot: str) -> str:
    """A block that stands for one LBW slot when reading a value back (CLIP/BASE -> BASE)."""
    return BASE if slot in ("CLIP", "BASE", "TE") else slot


# ----- presets ------------------------------------------------------------------------------------

# name -> (rules in our grammar, length of the LBW vector it stands for)
PRESETS: dict[str, tuple[str, int]] = {
    "NONE": ("ALL=0", 17),
    "ALL": ("ALL=1", 17),
    "ALL0.5": ("ALL=0.5", 17),
    "INS": ("ALL=0, TE=1, IN01=1, IN02=1, IN04=1", 17),
    "IND": ("ALL=0, TE=1, IN05=1, IN07=1, IN08=1", 17),
    "INALL": ("ALL=0, TE=1, IN=1", 17),
    "MIDD": ("ALL=0, TE=1, IN05=1, IN07=1, IN08=1, M00=1, OUT03-OUT06=1", 17),
    "OUTD": ("ALL=0, TE=1, OUT03-OUT06=1", 17),
    "OUTS": ("ALL=0, TE=1, OUT07-OUT11=1", 17),
    "OUTALL": ("ALL=0, TE=1, OUT=1", 17),
    "FLUXALL": ("ALL=1", 61),
}


def preset_vector(name: str) -> list[float]:
    """A built-in preset as the LBW vector it stands for (17 values, 61 for FLUXALL)."""
    rules, n = PRESETS[name.upper()]
    spec = _parse_text(rules, lbw_compat=False, presets={})
    return [spec.block_value(_slot_block(s)) for s in LAYOUTS[n][1]]


def parse_presets(text: str) -> dict[str, str]:
    """`NAME:v1,…,vN` lines of an LBW / Inspire preset file -> {NAME: vector text}.

    Comment lines (`#`), lines without `:`, `@` generator lines and vectors of a length no layout
    has are skipped, as both tools do.
    """
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or "#" in line or ":" not in line or line.startswith("@"):
            continue
        name, vector = (p.strip() for p in line.split(":", 1))
        values = [v for v in vector.split(",") if v.strip()]
        if name and len(values) in LAYOUTS:
            out[name.upper()] = vector
    return out


# ----- parsing --------------------------------------------------------------------------------------

_SEPARATORS = ",;\n"


def _regex_open(piece: str) -> bool:
    """Whether a `re:` token was cut inside brackets or right after a backslash (`a{1,3}`, `a\\,b`)."""
    return (piece.count("(") > piece.count(")") or piece.count("[") > piece.count("]")
            or piece.count("{") > piece.count("}") or piece.endswith("\\"))


def _next_sep(text: str, start: int) -> int:
    positions = [p for p in (text.find(c, start) for c in _SEPARATORS) if p >= 0]
    return min(positions) if positions else len(text)


def split_tokens(text: str) -> list[str]:
    """Split on `,` `;` and newlines; a regex rule continues past a separator that sits inside
    brackets or follows a backslash."""
    tokens, i = [], 0
    while i <= len(text):
        j = _next_sep(text, i)
        if text[i:j].strip()[:3].lower() == "re:":
            while _regex_open(text[i:j]) and j < len(text):
                j = _next_sep(text, j + 1)
        if text[i:j].strip():
            tokens.append(text[i:j].strip())
        i = j + 1
    return tokens


def _vector_rules(values: list[tuple[str, float]], lbw_compat: bool) -> list[Rule]:
    """An LBW vector as rules by block name; `lbw_compat` zero-fills the rest of its block list."""
    if len(values) not in LAYOUTS:
        shown = ",".join(t for t, _ in values[:4]) + (",…" if len(values) > 4 else "")
        raise BlockSpecError(shown, f"a vector of {len(values)} values: expected 17 or 26 (SD1.x/2.x), "
                                    "12 or 20 (SDXL) or 61 (Flux)")
    arch, slots = LAYOUTS[len(values)]
    rules = []
    if lbw_compat:
        rules = [Rule(parse_selector(s), 0.0) for s in arch.blocks if s not in slots]
    rules += [Rule(parse_selector(s), v) for s, (_, v) in zip(slots, values)]
    return rules


def _preset_rules(name: str, lbw_compat: bool, presets: Mapping[str, str]) -> list[Rule]:
    """A user preset (a vector) or a built-in one (its rules; its LBW vector in compat mode)."""
    if name in presets:
        return list(_parse_text(presets[name], lbw_compat=lbw_compat, presets={}).rules)
    if lbw_compat:
        return _vector_rules([(_fmt(v), v) for v in preset_vector(name)], True)
    return list(_parse_text(PRESETS[name][0], lbw_compat=False, presets={}).rules)


def _parse_text(text: str, *, lbw_compat: bool, presets: Mapping[str, str]) -> BlockStrengths:
    rules: list[Rule] = []
    default = None
    vector: list[tuple[str, float]] = []

    def flush() -> None:
        if vector:
            rules.extend(_vector_rules(vector, lbw_compat))
            vector.clear()

    for token in split_tokens(text):
        piece = token
        head = _VECTOR_HEAD.match(piece)
        if head and piece[:3].lower() != "re:" and _NUMBER.match(head[2].strip()):
            flush()  # `NAME:v1,v2…` (LBW/Inspire preset line): the name is a label only
            piece = head[2]
        if _NUMBER.match(piece):
            vector.append((token, float(piece)))
            continue
        if _VARIABLE.match(piece):
            parse_value(piece, token)
        flush()
        if "=" in piece:
            name, _, value = piece.rpartition("=")
            if not name.strip():
                raise BlockSpecError(token, "missing block name before '='")
            number = parse_value(value, token)
            if name.strip().lower() == "default":
                default = number
            else:
                rules.append(Rule(parse_selector(name, token), number))
            continue
        upper = piece.upper()
        if upper in presets or upper in PRESETS:
            rules.extend(_preset_rules(upper, lbw_compat, presets))
        else:
            raise BlockSpecError(token, "not a preset name, a number or NAME=value")
    flush()
    return BlockStrengths(tuple(rules), default)


def _parse_mapping(data: Mapping) -> BlockStrengths:
    rules: list[Rule] = []
    default = None
    for name, value in data.items():
        token = f"{name}={value}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise BlockSpecError(token, "the value must be a number")
        number = parse_value(str(value), token) if isinstance(value, str) else float(value)
        if not math.isfinite(number):
            raise BlockSpecError(token, "the value must be finite")
        if str(name).strip().lower() == "default":
            default = number
        else:
            rules.append(Rule(parse_selector(str(name), token), number))
    return BlockStrengths(tuple(rules), default)


def parse_spec(spec: "BlockStrengths | str | Mapping | None" = None, *, lbw_compat: bool = False,
               presets: Mapping[str, str] | None = None) -> BlockStrengths:
    """Parse a block-strength spec: text (see the package docstring), JSON text of a
    `{selector: value}` object or of a vector, a mapping, an existing BlockStrengths, or None.

    `presets`: extra named vectors (e.g. `parse_presets(file text)`), looked up before the
    built-in ones. Raises BlockSpecError (a ValueError) naming the offending token.
    """
    if spec is None or isinstance(spec, BlockStrengths):
        return spec or BlockStrengths()
    if isinstance(spec, Mapping):
        return _parse_mapping(spec)
    if not isinstance(spec, str):
        raise BlockSpecError(repr(spec)[:40], "a spec is text, a mapping or None")
    text = spec.strip()
    if text[:1] in "{[" and text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BlockSpecError(text[:40], f"invalid JSON: {exc.msg}") from None
        if isinstance(data, list):
            return parse_spec(",".join(map(str, data)), lbw_compat=lbw_compat, presets=presets)
        if not isinstance(data, dict):
            raise BlockSpecError(text[:40], "JSON must be an object {block: value} or a list")
        return _parse_mapping(data)
    user = {k.upper(): v for k, v in (presets or {}).items()}
    return _parse_text(text, lbw_compat=lbw_compat, presets=user)


def scaled_strengths(adapters: Mapping[str, object] | Iterable[str],
                     spec: "BlockStrengths | str | Mapping | None", strength: float = 1.0,
                     model_keys: Mapping[str, str | tuple] | None = None) -> dict[str, float]:
    """{module name: strength × block multiplier} for a whole file: what to pass to each
    adapter's `merge`/`bypass` (its result is `W + s·(W(1) − W)` for every algorithm)."""
    parsed = parse_spec(spec)
    if parsed.arch is None:
        parsed = parsed.bind(adapters)
    keys = model_keys or {}
    return {n: strength * parsed.strength(n, keys.get(n)) for n in module_names(adapters)}


__all__ = ["BlockSpecError", "BlockStrengths", "PRESETS", "Rule", "Selector",
           "parse_presets", "parse_selector", "parse_spec", "parse_value", "preset_vector",
           "scaled_strengths", "split_tokens"]
