"""`load_file`: a whole adapter file as a mapping of module name -> Adapter, with its problems."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch

from .algos import Adapter, detect
from .algos.registry import SHARED_SUFFIXES
from .errors import LycorisError, Problem, warn
from .io import FP8_NAMES, DictSource, TensorSource
from .keys import IGNORED_SUFFIXES, group_keys


class AdapterFile(Mapping[str, Adapter]):
    """Every module of one file, detected per module; `problems` lists what was skipped and why."""

    def __init__(self, path: str, adapters: dict[str, Adapter], metadata: dict[str, str],
                 problems: list[Problem], nbytes: int, dtypes: dict[str, str]):
        self.path = path
        self.adapters = adapters
        self.metadata = metadata
        self.problems = problems
        self.nbytes = nbytes
        self.dtypes = dtypes  # file key -> safetensors dtype name

    def __getitem__(self, name: str) -> Adapter:
        return self.adapters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def __repr__(self) -> str:
        return f"AdapterFile({os.path.basename(self.path)!r}, {len(self)} modules, {len(self.problems)} problems)"


def _peft_alpha(metadata: Mapping[str, str]) -> float | None:
    """Default alpha from a diffusers `lora_adapter_metadata` peft config, if any."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
        return float(cfg["lora_alpha"]) if "lora_alpha" in cfg else None
    except (ValueError, TypeError, KeyError):
        return None


def load_file(source: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = False,
              metadata: Mapping[str, str] | None = None) -> AdapterFile:
    """Read an adapter file (or an in-memory state dict) into per-module adapters.

    Format errors (unreadable file, bad header) always raise LycorisFormatError. A module that
    cannot be built (bad shapes, NaN, unknown keys) raises in `strict` mode; otherwise it is skipped
    with a LycorisWarning and listed in `problems`.
    """
    if isinstance(source, (str, os.PathLike)):
        src = TensorSource(os.fspath(source))
    else:
        src = DictSource(source, metadata)
    path = src.path
    problems: list[Problem] = []
    dtypes = {k: src.dtype_name(k) for k in src}

    def report(reason: str, key: str | None, level: str = "warning") -> None:
        if level == "error" and strict:
            raise LycorisError(reason, file=path, key=key)
        problems.append(warn(reason, file=path, key=key) if level == "warning"
                        else Problem("error", path, key, reason))
        if level == "error":
            warn(reason + " (module skipped)", file=path, key=key)

    fp8 = sorted(k for k, d in dtypes.items() if d in FP8_NAMES)
    if fp8:
        report(f"{len(fp8)} tensors are stored in fp8 ({dtypes[fp8[0]]}); they are upcast to fp32, "
               "but their precision is already reduced", fp8[0])
    modules, unknown = group_keys(src.keys())
    for key in unknown:
        if key.startswith("bundle_emb."):
            report("bundled textual-inversion embedding: not a weight patch, ignored", key)
        else:
            report("unknown key suffix: no algorithm uses this key", key)
    default_alpha = _peft_alpha(src.metadata)
    adapters: dict[str, Adapter] = {}
    missing_alpha: list[str] = []
    for name, suffix_keys in modules.items():
        for suffix in [s for s in suffix_keys if s in IGNORED_SUFFIXES]:
            report(IGNORED_SUFFIXES[suffix], suffix_keys.pop(suffix))
        if not suffix_keys:
            continue
        try:
            shapes = {s: tuple(src.header[k]["shape"]) if isinstance(src, TensorSource)
                      else tuple(src[k].shape) for s, k in suffix_keys.items()}
            cls = detect(shapes, name=name, file=path)
            if cls is None:
                report("no algorithm matches keys " + ", ".join(sorted(suffix_keys)), name, "error")
                continue
            leftovers = set(suffix_keys) - set(cls.keys) - SHARED_SUFFIXES
            for suffix in sorted(leftovers):
                report(f"unknown key suffix for {cls.algo}: ignored", suffix_keys.pop(suffix))
            tensors = {s: src[k] for s, k in suffix_keys.items()}
            if cls.uses_alpha and "alpha" not in tensors and default_alpha is not None:
                tensors["alpha"] = torch.tensor(default_alpha)
            adapter = cls.load(tensors, name=name, file=path)
        except LycorisError as exc:
            if strict:
                raise
            problems.append(Problem("error", exc.file, exc.key, exc.reason))
            warn(exc.reason + " (module skipped)", file=exc.file, key=exc.key)
            continue
        if cls.uses_alpha and adapter.alpha_matters():
            if "alpha" not in tensors:
                missing_alpha.append(name)
            elif adapter.alpha == 0:
                report("alpha is 0: read as alpha = rank (scale 1), as kohya and LyCORIS training "
                       "do; ComfyUI core would ignore this module", f"{name}.alpha")
        adapters[name] = adapter
    if missing_alpha:
        report(f"{len(missing_alpha)} modules have no alpha: using alpha = rank (scale 1)",
               missing_alpha[0])
    return AdapterFile(path, adapters, dict(src.metadata), problems, src.nbytes(), dtypes)
