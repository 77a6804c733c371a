"""Safetensors: strict header validation, lazy tensor access, atomic and reproducible writing."""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import stat
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .errors import LycorisFormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES: dict[torch.dtype, str] = {d: name for name, (d, _) in DTYPES.items()}
FP8_NAMES = {"F8_E4M3", "F8_E5M2"}


# what `os.stat` says a path is, for refusing anything but a regular file before reading it
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice (json keeps the last value, readers disagree)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(raw: str | bytes) -> object:
    """`json.loads` with bounds: duplicate object keys, nesting too deep for the parser and numbers
    too long to convert raise ValueError naming the problem (never RecursionError)."""
    try:
        return json.loads(raw, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse (thousands of levels)") from None


def file_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime): what changes when a file is replaced or rewritten."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_regular(path: str) -> tuple[int, os.stat_result]:
    """An fd of `path` and its stat, refusing anything but a regular file without blocking on it
    (a named pipe would block an ordinary open forever)."""
    try:
        kind = next((what for test, what in _NOT_REGULAR if test(os.stat(path).st_mode)), None)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
            st = os.fstat(fd)
            kind = next((what for test, what in _NOT_REGULAR if test(st.st_mode)), None)
            if kind is None:
                return fd, st
            os.close(fd)  # swapped for something else between stat and open
    except OSError as exc:
        raise LycorisFormatError(f"cannot read file: {exc.strerror or exc}", file=path) from exc
    raise LycorisFormatError(f"is {kind}, not a regular file: expected a .safetensors file",
                             file=path)


def read_header(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a safetensors header; return ({key: {dtype, shape, data_offsets}}, metadata)."""
    header, metadata, _ = _read_header(path)
    return header, metadata


def _read_header(path: str) -> tuple[dict[str, dict], dict[str, str], tuple]:
    """`read_header` plus the file's signature when it was read."""
    fd, st = _open_regular(path)
    size = st.st_size
    try:
        with os.fdopen(fd, "rb") as f:
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
    if len(raw) != n:
        raise LycorisFormatError(f"file changed while it was read: header of {n} bytes, only "
                                 f"{len(raw)} could be read", file=path)
    try:
        header = parse_json(raw.decode("utf-8"))
    except _DuplicateKey as exc:
        raise LycorisFormatError(f"header names {exc.key!r} twice: JSON readers keep different "
                                 "copies, so the file is ambiguous", file=path, key=exc.key) from exc
    except (UnicodeDecodeError, ValueError) as exc:
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
    end, prev = 0, None
    for begin, stop, key in spans:
        if begin < end:
            raise LycorisFormatError(f"data of {key!r} overlaps {prev!r} (header lies about offsets)",
                                     file=path, key=key)
        if begin > end:
            raise LycorisFormatError(
                f"data of {key!r} starts at byte {begin}, expected {end}: gap after "
                f"{prev or 'the header'} (header lies about offsets)", file=path, key=key)
        end, prev = stop, key
    if end != data_len:
        raise LycorisFormatError(
            f"tensors cover {end} bytes of data but the file holds {data_len}: trailing bytes "
            "(header lies about offsets, or two files were concatenated)", file=path,
            key=prev)
    return header, metadata, file_signature(st)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path: str, key: str, info: object, data_len: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LycorisFormatError("header entry lacks dtype/shape/data_offsets", file=path, key=key)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LycorisFormatError(f"unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})",
                                 file=path, key=key)
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise LycorisFormatError(f"invalid shape {shape!r}", file=path, key=key)
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(_is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
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
        self.header, self.metadata, self._signature = _read_header(self.path)
        try:
            self._handle = safe_open(self.path, framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise LycorisFormatError(f"safetensors refused the file: {exc}", file=self.path) from exc
        self._check_unchanged(None)

    def _check_unchanged(self, key: str | None) -> None:
        """Raise when the file on disk is no longer the one whose header was validated (rewritten,
        truncated or replaced while it is read): its data may no longer match the header."""
        advice = "read it again once whatever writes it has finished"
        try:
            now = file_signature(os.stat(self.path))
        except OSError as exc:
            raise LycorisFormatError(f"file changed on disk while it was read (now: "
                                     f"{exc.strerror or exc}): {advice}", file=self.path,
                                     key=key) from exc
        if now == self._signature:
            return
        before = self._signature[2]
        change = f"size {before} -> {now[2]} bytes" if now[2] != before else "rewritten or replaced"
        raise LycorisFormatError(f"file changed on disk while it was read ({change}): {advice}",
                                 file=self.path, key=key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.header:
            raise KeyError(key)
        self._check_unchanged(key)
        try:
            tensor = self._handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise LycorisFormatError(f"cannot read tensor data: {exc}", file=self.path,
                                     key=key) from exc
        self._check_unchanged(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name stored for `key`."""
        return self.header[key]["dtype"]

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, from the header (no data read)."""
        return tuple(self.header[key]["shape"])

    def key_nbytes(self, key: str) -> int:
        """Bytes stored for one tensor."""
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def nbytes(self) -> int:
        """Bytes of tensor data in the file."""
        return sum(self.key_nbytes(k) for k in self.header)


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
        """The safetensors dtype name `key` would be stored as."""
        dtype = self._tensors[key].dtype
        return DTYPE_NAMES.get(dtype, str(dtype))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def key_nbytes(self, key: str) -> int:
        """Bytes one tensor would take in a file."""
        t = self._tensors[key]
        return t.numel() * t.element_size()

    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(self.key_nbytes(k) for k in self._tensors)


class RenamedSource(Mapping[str, torch.Tensor]):
    """Another source seen under new key names (data read lazily from it), plus a few tensors a
    key conversion made itself (e.g. a shape it recorded)."""

    def __init__(self, base, renamed: Mapping[str, str], made: Mapping[str, torch.Tensor]):
        self.base = base
        self.path = base.path
        self.metadata = base.metadata
        self._renamed = dict(renamed)  # new key -> key in base
        self._made = DictSource(made, name=base.path)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._made:
            return self._made[key]
        return self.base[self._renamed[key]]

    def __iter__(self) -> Iterator[str]:
        yield from self._renamed
        yield from self._made

    def __len__(self) -> int:
        return len(self._renamed) + len(self._made)

    def _owner(self, key: str):
        return (self._made, key) if key in self._made else (self.base, self._renamed[key])

    def dtype_name(self, key: str) -> str:
        src, k = self._owner(key)
        return src.dtype_name(k)

    def shape(self, key: str) -> tuple[int, ...]:
        src, k = self._owner(key)
        return src.shape(k)

    def key_nbytes(self, key: str) -> int:
        src, k = self._owner(key)
        return src.key_nbytes(k)

    def nbytes(self) -> int:
        return sum(self.key_nbytes(k) for k in self)


def storable_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors of a dtype safetensors knows, checked before any write."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a torch.Tensor, found {type(value).__name__}")
        if value.dtype not in DTYPE_NAMES:
            raise TypeError(f"{key}: dtype {value.dtype} cannot be stored in safetensors "
                            f"(supported: {', '.join(map(str, DTYPE_NAMES))})")
        out[str(key)] = value.detach().to("cpu").contiguous()
    return out


def encode_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header for `tensors` stored in `layout_order(tensors)` order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for key in layout_order(tensors):
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def layout_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Widest element first, then by name: every tensor starts aligned to its element size."""
    return sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))


def data_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the data section `write_safetensors` writes for these tensors (everything after
    the header): kohya's `sshs_model_hash`, which A1111-style UIs use to identify a network."""
    clean = storable_tensors(tensors)
    digest = hashlib.sha256()
    for key in layout_order(clean):
        if clean[key].numel():
            digest.update(memoryview(clean[key].reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _temp_beside(path: str) -> str:
    """Create an empty temporary file next to `path` with the permissions a new file gets (umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".lycoris-{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _publish_new(tmp: str, path: str) -> None:
    """Give the finished `tmp` the name `path` unless a file took that name meanwhile: a hard
    link fails atomically on an existing name (a rename would replace it)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it") from None
    except OSError:  # a file system without hard links: the check before writing has to do
        if os.path.lexists(path):
            raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def write_new_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` as the new file `path`, atomically; FileExistsError when `path` exists (also
    when another writer takes the name meanwhile), so nothing is ever overwritten."""
    path = os.fspath(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _publish_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> str:
    """Write a safetensors file atomically (temporary file beside it, fsync, rename).

    The bytes depend only on the tensors and metadata (sorted header), so equal inputs give equal
    files; tensors sharing storage are fine.
    """
    clean = storable_tensors(tensors)
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in clean.items()}
    return write_streamed(path, specs, clean.__getitem__, metadata or {}, overwrite=overwrite)


def write_streamed(path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                   produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str], *,
                   overwrite: bool = False, wrap: Callable[[Iterable[str]], Iterable[str]] = iter) -> str:
    """Write a safetensors file whose tensors `produce(key)` makes one at a time (so a checkpoint
    never sits in memory whole), atomically: temporary file beside `path`, fsync, rename; an
    existing file is kept unless `overwrite`. `specs` gives each key's dtype and shape up front
    (the header comes first); `wrap` wraps the key order (a progress bar)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder, expected a .safetensors file path")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it")
    if sys.byteorder != "little":
        raise OSError("safetensors is little-endian; writing from a big-endian machine is not supported")
    meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape) in specs.items()}
    head = encode_header(meta, metadata)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for key in wrap(layout_order(meta)):
                t = produce(key)
                if t.dtype != meta[key].dtype or tuple(t.shape) != tuple(meta[key].shape):
                    raise AssertionError(f"{key}: produced {t.dtype} {list(t.shape)}, header says "
                                         f"{meta[key].dtype} {list(meta[key].shape)}")
                if t.numel():
                    f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
