"""The hashes model sites and A1111-style UIs identify a file by, from one chunked read.

- sha256: of the whole file; civitai's **AutoV2** (and A1111's checkpoint short hash) is its
  first 10 hex digits.
- **AutoV1**: A1111's old checkpoint hash, sha256 of the 64 KiB at offset 1 MiB, 8 hex digits.
- data sha256: of everything after the safetensors header, as kohya writes `sshs_model_hash`
  (the "addnet" hash); A1111's LoRA loader shows its first 12 hex digits (civitai's **AutoV3**).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

CHUNK = 1 << 20  # 1 MiB reads: one progress tick each
AUTOV1_RANGE = (0x100000, 0x110000)
HEADER_LENGTH_BYTES = 8

# progress(chunks, total) -> the same chunks, e.g. wrapped in a tqdm bar
Progress = Callable[[Iterable[bytes], int], Iterable[bytes]]


@dataclass(frozen=True)
class FileHashes:
    sha256: str
    autov1: str
    data_sha256: str | None  # None: too short to be a safetensors file

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    @property
    def autov3(self) -> str | None:
        return None if self.data_sha256 is None else self.data_sha256[:12]

    def as_dict(self) -> dict[str, str | None]:
        return {"sha256": self.sha256, "autov2": self.autov2, "autov1": self.autov1,
                "data_sha256": self.data_sha256, "autov3": self.autov3}


def _chunks(f) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _overlap(pos: int, chunk: bytes, start: int, end: int | None = None) -> bytes:
    """The part of `chunk` (at file offset `pos`) inside [start, end)."""
    lo = max(start - pos, 0)
    hi = len(chunk) if end is None else min(end - pos, len(chunk))
    return chunk[lo:hi] if hi > lo else b""


def hash_file(path: str | os.PathLike, progress: Progress | None = None) -> FileHashes:
    """Every hash of `FileHashes` in one sequential read of `path` (raises OSError)."""
    whole, autov1, data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    size = os.path.getsize(path)
    data_start: int | None = None
    head = b""
    pos = 0
    with open(path, "rb") as f:
        chunks: Iterable[bytes] = _chunks(f)
        if progress is not None:
            chunks = progress(chunks, -(-size // CHUNK))
        for chunk in chunks:
            whole.update(chunk)
            autov1.update(_overlap(pos, chunk, *AUTOV1_RANGE))
            if data_start is None and len(head) < HEADER_LENGTH_BYTES:
                head += chunk[:HEADER_LENGTH_BYTES - len(head)]
                if len(head) == HEADER_LENGTH_BYTES:
                    data_start = HEADER_LENGTH_BYTES + int.from_bytes(head, "little")
            if data_start is not None:
                data.update(_overlap(pos, chunk, data_start))
            pos += len(chunk)
    has_data = data_start is not None and data_start <= pos
    return FileHashes(whole.hexdigest(), autov1.hexdigest()[:8], data.hexdigest() if has_data else None)
