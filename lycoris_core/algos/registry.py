"""The one registry of algorithm classes; detection is a loop over it, never an if-chain."""
from __future__ import annotations

from ..errors import LycorisError

REGISTRY: dict[str, type] = {}
SHARED_SUFFIXES = frozenset({"alpha", "dora_scale"})


def register(cls):
    """Class decorator: add an Adapter subclass under its `algo` name."""
    if cls.algo in REGISTRY:
        raise ValueError(f"algorithm {cls.algo!r} registered twice")
    REGISTRY[cls.algo] = cls
    return cls


def known_suffixes() -> frozenset[str]:
    """Every file suffix some registered algorithm understands."""
    out = set(SHARED_SUFFIXES)
    for cls in REGISTRY.values():
        out.update(cls.keys)
    return frozenset(out)


def detect(shapes: dict[str, tuple[int, ...]], *, name: str = "", file: str | None = None):
    """The one algorithm class claiming a module's suffixes; None if none; error if several."""
    found = [cls for cls in REGISTRY.values() if cls.claims(shapes)]
    if len(found) > 1:
        raise LycorisError("keys of several algorithms in one module: "
                           + ", ".join(c.algo for c in found), file=file, key=name)
    return found[0] if found else None
