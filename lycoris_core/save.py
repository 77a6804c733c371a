"""`save_file`: adapters (or plain tensors) to a LyCORIS-layout safetensors file, with metadata.

Keys are `<module>.<suffix>` in the standard LyCORIS layout (what `Adapter.export` returns), so
every LyCORIS reader (ours, ComfyUI, A1111, LyCORIS itself) can load the file. `alpha` is always
kept in fp32, whatever `dtype` the other tensors are cast to, so saving in half precision never
changes the alpha/rank scale (kohya's `--save_precision` rounds alpha, e.g. 0.3 -> 0.30078 in bf16).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone

import torch

from .algos import Adapter
from .errors import LycorisError, warn
from .inspect import guess_base_model, uses_tucker
from .io import data_sha256, storable_tensors, write_safetensors

NETWORK_MODULE = "lycoris.kohya"
MODELSPEC_VERSION = "1.0.0"
# kohya `ss_base_model_version` -> (modelspec architecture, modelspec implementation)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "sd_v1": ("stable-diffusion-v1", "diffusers"),
    "sd_v2": ("stable-diffusion-v2-512", "diffusers"),
    "sd_v2_v": ("stable-diffusion-v2-768-v", "diffusers"),
    "sdxl_base_v1-0": ("stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models"),
    "sd3": ("stable-diffusion-3-medium", "https://github.com/Stability-AI/SD3.5"),
    "flux1": ("flux-1-dev", "https://github.com/black-forest-labs/flux"),
}


def _source_paths(adapters: Mapping) -> set[str]:
    """Files the adapters were read from: the mapping's own `path` and each adapter's `file`."""
    paths = {getattr(adapters, "path", None)}
    paths.update(getattr(v, "file", None) for v in adapters.values())
    return {os.fspath(p) for p in paths if isinstance(p, (str, os.PathLike)) and os.path.isfile(p)}


def _refuse_source(adapters: Mapping, path: str) -> None:
    """Raise when `path` is (by inode, not spelling) a file the adapters were read from."""
    if not os.path.exists(path):
        return
    for source in sorted(_source_paths(adapters)):
        if os.path.samefile(path, source):
            raise LycorisError(
                f"refusing to write over {source}, the file these adapters were read from "
                "(even with overwrite=True): save to a new path", file=path)


def _cast(key: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype` if it is a float tensor other than alpha (alpha stays exact in fp32)."""
    if not t.is_floating_point():
        return t
    if key.endswith(".alpha") or key == "alpha":
        return t.float()
    return t.to(dtype) if dtype is not None else t


def collect_tensors(adapters: Mapping[str, Adapter | torch.Tensor],
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """File keys -> tensors: an Adapter exports `<module>.<suffix>`, a tensor keeps its key."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"save dtype must be a floating dtype, found {dtype}")
    out: dict[str, torch.Tensor] = {}
    for name, value in adapters.items():
        if isinstance(value, Adapter):
            items = {f"{name}.{suffix}": t for suffix, t in value.export().items()}
        elif isinstance(value, torch.Tensor):
            items = {str(name): value}
        else:
            raise TypeError(f"{name}: expected an Adapter or a torch.Tensor, found "
                            f"{type(value).__name__}")
        for key, t in items.items():
            if key in out:
                raise LycorisError(f"two entries produce the file key {key!r}", key=key)
            out[key] = _cast(key, t.detach(), dtype)
    return out


def _meta_str(value: object) -> str:
    """A metadata value as safetensors needs it: str; dict/list as JSON; bool as True/False."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def save_file(adapters: Mapping[str, Adapter | torch.Tensor], path: str | os.PathLike,
              metadata: Mapping[str, object] | None = None, *, dtype: torch.dtype | None = None,
              overwrite: bool = False) -> str:
    """Write adapters (module name -> Adapter) and/or tensors (key -> tensor) atomically; return path.

    Never replaces an existing file unless `overwrite`, and never the file the adapters were read
    from. Float tensors are cast to `dtype` (alpha stays fp32); metadata values become strings.
    Tensors with NaN/Inf are saved but warned about (our loader will skip those modules).
    `sshs_model_hash` (sha256 of the data section, as kohya writes it) is always recomputed.
    """
    path = os.fspath(path)
    _refuse_source(adapters, path)
    tensors = storable_tensors(collect_tensors(adapters, dtype))  # once: hashed, then written
    bad = [k for k, t in tensors.items() if t.is_floating_point()
           and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())]
    if bad:
        warn(f"{len(bad)} tensors contain NaN or Inf; readers will skip their modules",
             file=path, key=bad[0])
    meta = {str(k): _meta_str(v) for k, v in (metadata or {}).items() if v is not None}
    # hashes copied from another file (a resumed adapter) would be stale: recompute; the legacy
    # hash reads bytes at a fixed file offset, which this header's own length shifts, so drop it
    meta.pop("sshs_legacy_hash", None)
    meta["sshs_model_hash"] = data_sha256(tensors)
    return write_safetensors(tensors, path, meta, overwrite=overwrite)


def _fmt_number(x: float) -> str:
    """An int-valued float as `4.0`-style kohya text, others with full precision."""
    return repr(float(x))


def _resolution(value: int | str | tuple[int, int] | None) -> tuple[str, str] | None:
    """(kohya `ss_resolution` "(w, h)", modelspec "wxh") from 512, "512x768" or (512, 768)."""
    if value is None:
        return None
    if isinstance(value, int):
        w = h = value
    elif isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        w, h = (int(parts[0]), int(parts[-1]))
    else:
        w, h = int(value[0]), int(value[1])
    return f"({w}, {h})", f"{w}x{h}"


def _tag_frequency(tags: Mapping) -> dict[str, dict[str, int]]:
    """kohya's `{dataset dir: {tag: count}}`; a flat `{tag: count}` becomes one dataset."""
    if tags and all(isinstance(v, Mapping) for v in tags.values()):
        return {str(d): {str(t): int(c) for t, c in v.items()} for d, v in tags.items()}
    return {"dataset": {str(t): int(c) for t, c in tags.items()}}


def training_metadata(*, algo: str, dim: int | None = None, alpha: float | None = None,
                      network_args: Mapping[str, object] | None = None,
                      base_model: str | None = None, steps: int | None = None,
                      epochs: int | None = None, tag_frequency: Mapping | None = None,
                      title: str | None = None, resolution: int | str | tuple[int, int] | None = None,
                      trigger_phrase: str | None = None, date: str | None = None,
                      extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` metadata for a LyCORIS file; `extra` keys are added last."""
    args = {"algo": algo}
    args.update({str(k): _meta_str(v) for k, v in (network_args or {}).items()})
    meta: dict[str, object] = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": dim,
        "ss_network_alpha": None if alpha is None and dim is None
        else _fmt_number(alpha if alpha is not None else dim),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_model,
        "ss_v2": None if base_model is None else str(base_model.startswith("sd_v2")),
        "ss_steps": steps,
        "ss_epoch": epochs,
        "ss_output_name": title,
        "ss_tag_frequency": None if tag_frequency is None else _tag_frequency(tag_frequency),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.title": title,
        "modelspec.date": date or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.trigger_phrase": trigger_phrase,
    }
    if base_model is not None:
        arch, impl = ARCHITECTURES.get(base_model, (base_model, ""))
        meta["modelspec.architecture"] = f"{arch}/lora"
        meta["modelspec.implementation"] = impl or None
    res = _resolution(resolution)
    if res is not None:
        meta["ss_resolution"], meta["modelspec.resolution"] = res
    meta.update(extra or {})
    return {k: _meta_str(v) for k, v in meta.items() if v is not None}


def _is_conv(adapter: Adapter) -> bool:
    """A conv with a kernel larger than 1 (kohya/LyCORIS give those `conv_dim`/`conv_alpha`)."""
    shape = adapter.target_shape
    return shape is not None and len(shape) > 2 and math.prod(shape[2:]) > 1


def _most_common(values: list) -> object:
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def standard_metadata(adapters: Mapping[str, Adapter], **kwargs) -> dict[str, str]:
    """`training_metadata` with algo, dim, alpha, network args and base model read off the adapters.

    Keyword arguments are those of `training_metadata` and win over what is read off the adapters
    (`network_args` are merged).
    """
    mods = [a for a in adapters.values() if isinstance(a, Adapter)]
    if not mods:
        raise ValueError("standard_metadata needs at least one Adapter")
    algos = Counter(a.algo for a in mods)
    main = algos.most_common(1)[0][0]
    linear = [a for a in mods if not _is_conv(a)] or mods
    conv = [a for a in mods if _is_conv(a)]
    dim = _most_common([a.rank for a in linear])
    alpha = _most_common([a.alpha for a in linear if a.rank is not None])
    args: dict[str, object] = {}
    if len(algos) > 1:
        args["mixed_algos"] = ",".join(sorted(algos))
    conv_dim = _most_common([a.rank for a in conv])
    if conv_dim is not None:
        args["conv_dim"] = conv_dim
        args["conv_alpha"] = _fmt_number(_most_common([a.alpha for a in conv]) or conv_dim)
    dora = [a.dora_axis for a in mods if a.dora_scale is not None]
    if dora:
        args["dora_wd"] = "True"
        args["wd_on_output"] = str(_most_common(dora) == "out")
    if any(uses_tucker(a) for a in mods):
        args["use_tucker"] = "True"
    args.update(kwargs.pop("network_args", None) or {})
    if "base_model" not in kwargs:
        kwargs["base_model"] = guess_base_model(adapters)
    return training_metadata(algo=kwargs.pop("algo", main), dim=kwargs.pop("dim", dim),
                             alpha=kwargs.pop("alpha", alpha), network_args=args, **kwargs)
