"""`load_file`: a whole adapter file as a mapping of module name -> Adapter, with its problems."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping

import torch

from .algos import Adapter, detect
from .algos.registry import SHARED_SUFFIXES
from .errors import LycorisError, LycorisFormatError, LycorisShapeError, Problem, plural, warn
from .io import FP8_NAMES, DictSource, TensorSource, parse_json
from .key_conversion import Converter, convert_source
from .keys import IGNORED_SUFFIXES, group_keys, is_peft_magnitude


class AdapterFile(Mapping[str, Adapter]):
    """Every module of one file, detected per module; `problems` lists what was skipped and why."""

    def __init__(self, path: str, adapters: dict[str, Adapter], metadata: dict[str, str],
                 problems: list[Problem], nbytes: int, dtypes: dict[str, str], *,
                 module_keys: dict[str, dict[str, str]] | None = None,
                 key_bytes: dict[str, int] | None = None, converted_keys: int = 0):
        self.path = path
        self.adapters = adapters
        self.metadata = metadata
        self.problems = problems
        self.nbytes = nbytes
        self.dtypes = dtypes  # file key -> safetensors dtype name
        self.module_keys = module_keys or {}  # module -> {canonical suffix: file key}
        self.key_bytes = key_bytes or {}  # file key -> stored bytes
        self.converted_keys = converted_keys  # keys a host's key conversion renamed/added/dropped

    def __getitem__(self, name: str) -> Adapter:
        return self.adapters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def __repr__(self) -> str:
        return (f"AdapterFile({os.path.basename(self.path)!r}, {len(self)} modules, "
                f"{len(self.problems)} problems)")


class PeftConfig:
    """The alpha part of a diffusers `lora_adapter_metadata` peft config (files have no alpha keys).

    diffusers stores one LoraConfig per model part with the part's name in front of every field
    (`transformer.lora_alpha`, `unet.lora_alpha`, `text_encoder.lora_alpha`); older files store one
    config unprefixed. Each module takes the config of the part its name starts with.
    """

    def __init__(self, parts: dict[str, tuple[float, dict[str, float], bool]]):
        self.parts = parts  # part prefix ("" for unprefixed) -> (alpha, alpha_pattern, use_rslora)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "PeftConfig | None":
        """Parse `lora_adapter_metadata`; None when absent or without a `lora_alpha`."""
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return None
        try:
            cfg = parse_json(raw)
            grouped: dict[str, dict] = {}
            for key, value in cfg.items():
                part, _, field = str(key).rpartition(".")
                grouped.setdefault(part, {})[field] = value
            parts = {part: cls._part(fields) for part, fields in grouped.items() if "lora_alpha" in fields}
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if not parts or not all(math.isfinite(v) for alpha, patterns, _ in parts.values()
                                for v in (alpha, *patterns.values())):
            return None
        return cls(parts)

    @staticmethod
    def _part(fields: Mapping) -> tuple[float, dict[str, float], bool]:
        patterns = {str(k): float(v) for k, v in (fields.get("alpha_pattern") or {}).items() if _safe_pattern(str(k))}
        return float(fields["lora_alpha"]), patterns, bool(fields.get("use_rslora"))

    def alpha_for(self, name: str, rank: int | None) -> float:
        """The alpha to store so that alpha/rank is peft's scale for module `name`."""
        part = max((p for p in self.parts if not p or name.startswith(p + ".")), key=len, default=None)
        if part is None:
            return math.nan
        alpha, patterns, rslora = self.parts[part]
        local = name[len(part) + 1:] if part else name
        for pattern, value in patterns.items():
            try:
                if re.fullmatch(rf"(?:.*\.)?{pattern}", local):
                    alpha = value
                    break
            except re.error:
                continue
        if rslora and rank:
            return alpha * math.sqrt(rank)  # peft scales by alpha/sqrt(r)
        return alpha


# a repeat inside a repeated group (`(a+)+`, `(.*a){20}`): the classic patterns that make `re`
# backtrack exponentially; peft alpha_pattern keys come from the file, so they are not trusted
_NESTED_REPEAT = re.compile(r"[*+}][^()]*\)[*+{?]")


def _safe_pattern(pattern: str) -> bool:
    """Whether an alpha_pattern from a file is safe to match (bounded length, no nested repeats)."""
    return len(pattern) <= 1000 and not _NESTED_REPEAT.search(pattern)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors become fp32 (no kernel works on fp8 on every device); others are kept."""
    return t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _as_output_axis(t: torch.Tensor) -> torch.Tensor:
    """PEFT's magnitude is always per output channel, but a Conv layer's is stored (1, out, 1, 1),
    the shape LyCORIS uses for the input axis: lay it out as the output axis."""
    return t.reshape((-1,) + (1,) * (t.ndim - 1)) if t.ndim > 2 else t


def load_file(source: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = False,
              metadata: Mapping[str, str] | None = None,
              convert: Converter | None = None) -> AdapterFile:
    """Read an adapter file (or an in-memory state dict) into per-module adapters.

    Format errors (unreadable file, bad header) always raise LycorisFormatError. A module that
    cannot be built (bad shapes, NaN/Inf, keys of no algorithm) raises in `strict` mode; otherwise
    it is skipped with a LycorisWarning and listed in `problems`. Keys that are understood but not
    used (unknown suffixes, sparse bias, bundled embeddings) only warn, in both modes.

    Alpha: a missing alpha and alpha 0 both mean alpha = rank (scale 1), as the training libraries
    define it (one aggregated warning each; ComfyUI core gives alpha 0 no effect instead); peft files
    without alpha keys take it from the `lora_adapter_metadata` config. fp8 tensors are upcast to
    fp32 on load (one warning). `convert`: a host's state-dict key conversion, run first (see
    `key_conversion`); the keys named in `module_keys`/`dtypes` are then the converted ones.
    """
    if isinstance(source, (str, os.PathLike)):
        src = TensorSource(os.fspath(source))
    else:
        src = DictSource(source, metadata)
    src, converted_keys = convert_source(src, convert)
    path = src.path
    problems: list[Problem] = []
    dtypes = {k: src.dtype_name(k) for k in src}

    def report(reason: str, key: str | None, level: str = "warning") -> None:
        if level == "error" and strict:
            raise LycorisError(reason, file=path, key=key)
        keep(Problem(level, path, key, reason))

    def keep(problem: Problem) -> None:
        """Keep a problem; an error means its module is left out, which the message says."""
        if problem.level == "error":
            problem = Problem("error", problem.file, problem.key, problem.reason + " (module skipped)")
        warn(problem.reason, file=problem.file, key=problem.key)
        problems.append(problem)

    fp8 = sorted(k for k, d in dtypes.items() if d in FP8_NAMES)
    if fp8:
        report(f"{plural(len(fp8), 'tensor')} stored in fp8 ({dtypes[fp8[0]]}); they are upcast to "
               "fp32, but their precision is already reduced", fp8[0])
    modules, unknown, clashes = group_keys(src.keys())
    for key, earlier in clashes:
        module = next(m for m, keys in modules.items() if earlier in keys.values())
        report(f"names the same tensor of module {module!r} as {earlier!r} (two spellings of one "
               "key): the module is ambiguous", key, "error")
        modules.pop(module, None)
    for name in [n for n in modules if not n.strip(".")]:
        report(f"module name {name!r} is empty or only dots: it matches no layer (module skipped)",
               next(iter(modules.pop(name).values())))
    for name in [n for n, keys in modules.items() if set(keys) == {"weight"}]:
        # a lone `<x>.weight` is (IA)^3's suffix only next to `on_input`; alone it is just unknown
        unknown.append(modules.pop(name)["weight"])
    module_keys = {name: dict(keys) for name, keys in modules.items()}
    for key in unknown:
        if key.startswith("bundle_emb."):
            report("bundled textual-inversion embedding: not a weight patch, ignored", key)
        else:
            report("unknown key suffix: no algorithm uses this key", key)
    peft = PeftConfig.from_metadata(src.metadata)
    adapters: dict[str, Adapter] = {}
    missing_alpha: list[str] = []
    zero_alpha: list[str] = []
    negative_alpha: list[str] = []
    for name, suffix_keys in modules.items():
        for suffix in [s for s in suffix_keys if s in IGNORED_SUFFIXES]:
            report(IGNORED_SUFFIXES[suffix], suffix_keys.pop(suffix))
        if not suffix_keys:
            continue
        try:
            shapes = {s: src.shape(k) for s, k in suffix_keys.items()}
            cls = detect(shapes, name=name, file=path)
            if cls is None:
                where = next(iter(suffix_keys.values())) if len(suffix_keys) == 1 else name
                report("no algorithm matches keys " + ", ".join(sorted(suffix_keys)), where, "error")
                continue
            leftovers = set(suffix_keys) - set(cls.keys) - SHARED_SUFFIXES
            for suffix in sorted(leftovers):
                report(f"unknown key suffix for {cls.algo}: ignored", suffix_keys.pop(suffix))
            tensors = {s: _upcast(src[k]) for s, k in suffix_keys.items()}
            if is_peft_magnitude(suffix_keys.get("dora_scale")):
                tensors["dora_scale"] = _as_output_axis(tensors["dora_scale"])
            try:
                adapter = cls.load(tensors, name=name, file=path)
            except LycorisError:
                raise
            except (IndexError, RuntimeError, TypeError, ValueError, ArithmeticError) as exc:
                # tensors of the right names but impossible shapes/ndims for this algorithm
                raise LycorisShapeError(f"cannot build {cls.algo} module from shapes "
                                        f"{ {s: list(v) for s, v in shapes.items()} }: {exc}",
                                        file=path, key=name) from exc
        except LycorisFormatError:
            raise  # the file itself (its data, or the file changing under us), not this module
        except LycorisError as exc:
            if strict:
                raise
            keep(Problem("error", exc.file or path, exc.key or name, exc.reason))
            continue
        if cls.uses_alpha and adapter.alpha_matters():
            if "alpha" not in tensors:
                peft_alpha = math.nan if peft is None else peft.alpha_for(name, adapter.rank)
                if math.isfinite(peft_alpha):
                    adapter.alpha = peft_alpha
                else:
                    missing_alpha.append(name)
            elif adapter.alpha == 0:
                zero_alpha.append(name)
            elif adapter.alpha < 0:
                negative_alpha.append(name)
        adapters[name] = adapter
    if missing_alpha:
        report(f"{plural(len(missing_alpha), 'module')} without alpha: using alpha = rank (scale 1)",
               missing_alpha[0])
    if zero_alpha:
        report(f"{plural(len(zero_alpha), 'module')} with alpha 0: read as alpha = rank (scale 1), "
               "as kohya and LyCORIS training do; ComfyUI core would give them no effect",
               f"{zero_alpha[0]}.alpha")
    if negative_alpha:
        first = adapters[negative_alpha[0]].alpha
        report(f"{plural(len(negative_alpha), 'module')} with negative alpha (e.g. {first:g}): the "
               "scale alpha/rank is negative, so the update is subtracted", f"{negative_alpha[0]}.alpha")
    key_bytes = {k: src.key_nbytes(k) for k in src}
    return AdapterFile(path, adapters, dict(src.metadata), problems, src.nbytes(), dtypes,
                       module_keys=module_keys, key_bytes=key_bytes, converted_keys=converted_keys)
