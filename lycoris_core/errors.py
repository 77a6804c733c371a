"""Errors and warnings that always say which file, which key, and what is wrong."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

log = logging.getLogger("lycoris_core")


def _where(file: str | None, key: str | None) -> str:
    parts = [p for p in (file, key) if p]
    return ": ".join(parts) + ": " if parts else ""


class LycorisError(ValueError):
    """A file, key or tensor that cannot be used; the message names file, key and reason."""

    def __init__(self, reason: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.reason = file, key, reason
        super().__init__(_where(file, key) + reason)


class LycorisFormatError(LycorisError):
    """The file itself is unreadable: not safetensors, truncated, bad header, unknown dtype."""


class LycorisShapeError(LycorisError):
    """Tensor shapes disagree with each other or with the weight they patch."""


class LycorisOverflowError(LycorisError):
    """A merged weight or an adapter's change is not finite, or exceeds the range of the dtype it is
    stored or computed in (finite factors whose product overflows)."""


class LycorisWarning(UserWarning):
    """Something was skipped or interpreted; the adapter is still usable."""


@dataclass(frozen=True)
class Problem:
    """One finding about a file, kept for reports (inspect, node text output)."""

    level: str  # "error" | "warning"
    file: str | None
    key: str | None
    reason: str

    @property
    def message(self) -> str:
        """`file: key: reason`, the text of the matching warning or error."""
        return _where(self.file, self.key) + self.reason

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def warn(reason: str, *, file: str | None = None, key: str | None = None) -> Problem:
    """Emit a LycorisWarning and return it as a Problem for reports."""
    problem = Problem("warning", file, key, reason)
    warnings.warn(LycorisWarning(_where(file, key) + reason), stacklevel=2)
    return problem


def plural(n: int, word: str) -> str:
    """`1 module`, `3 modules`: counts in messages."""
    return f"{n} {word}{'' if n == 1 else 's'}"
