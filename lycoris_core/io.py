"""Safetensors reading with strict header validation, lazy tensor access, and atomic saving."""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _st_save_file

from .errors import LycorisFormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
FP8_NAMES = {"F8_E4M3", "F8_E5M2"}


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a safetensors header; return ({key: {dtype, shape, data_offsets}}, metadata)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LycorisFormatError(f"not a safetensors file: only {size} bytes", file=path)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise LycorisFormatError(
                    f"not a safetensors file or truncated: header length {n} exceeds the file size "
                    f"{size}", file=path)
            raw = f.read(n)
    except OSError as exc:
        raise LycorisFormatError(f"cannot read file: {exc.strerror or exc}", file=path) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LycorisFormatError(f"header is not valid JSON ({exc})", file=path) from exc
    if not isinstance(header, dict):
        raise LycorisFormatError("header is not a JSON object", file=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LycorisFormatError("__metadata__ must map strings to strings", file=path)
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        _check_entry(path, key, info, data_len)
        spans.append((info["data_offsets"][0], info["data_offsets"][1], key))
    spans.sort()
    for (b0, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise LycorisFormatError(f"data of {k1!r} overlaps {k0!r} (header lies about offsets)",
                                     file=path, key=k1)
    return header, metadata


def _check_entry(path: str, key: str, info: object, data_len: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LycorisFormatError("header entry lacks dtype/shape/data_offsets", file=path, key=key)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise LycorisFormatError(f"unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})",
                                 file=path, key=key)
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise LycorisFormatError(f"invalid shape {shape!r}", file=path, key=key)
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise LycorisFormatError(f"invalid data_offsets {offsets!r}", file=path, key=key)
    if offsets[1] > data_len:
        raise LycorisFormatError(
            f"data_offsets {offsets} run past the end of the data ({data_len} bytes): file truncated "
            "or header lies about offsets", file=path, key=key)
    expected = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != expected:
        raise LycorisFormatError(
            f"data_offsets span {offsets[1] - offsets[0]} bytes but shape {shape} {dtype} needs "
            f"{expected}", file=path, key=key)


class TensorSource(Mapping[str, torch.Tensor]):
    """Read-only, lazy view of a file's tensors (memory-mapped); validates the header on open."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.header, self.metadata = read_header(self.path)
        self._handle = safe_open(self.path, framework="pt", device="cpu")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise KeyError(key)
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)

    def dtype_name(self, key: str) -> str:
        return self.header[key]["dtype"]

    def nbytes(self) -> int:
        return sum(i["data_offsets"][1] - i["data_offsets"][0] for i in self.header.values())


class DictSource(Mapping[str, torch.Tensor]):
    """The same interface over tensors already in memory (a trained adapter, a host's state dict)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 name: str = "<memory>"):
        self.path = name
        self._tensors = dict(tensors)
        self.metadata = dict(metadata or {})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def dtype_name(self, key: str) -> str:
        t = self._tensors[key]
        return next((n for n, (d, _) in DTYPES.items() if d == t.dtype), str(t.dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str,
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> str:
    """Write atomically: a temporary file in the same folder, then rename over the target."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: exists; pass overwrite=True to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".lycoris-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        _st_save_file(clean, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
