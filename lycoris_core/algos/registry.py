"""The one registry of algorithm classes; detection is a loop over it, never an if-chain."""
from __future__ import annotations

from ..errors import LycorisError

REGISTRY: dict[str, type] = {}
SHARED_SUFFIXES = frozenset({"alpha", "dora_scale"})


# algorithms trained under a name of their own that save in another's layout (DyLoRA saves as
# LoRA): offered for training, never used to detect a file's algorithm
TRAINING_ONLY: dict[str, type] = {}


def register(cls):
    """Class decorator: add an Adapter subclass under its `algo` name."""
    if cls.algo in REGISTRY:
        raise ValueError(f"algorithm {cls.algo!r} registered twice")
    REGISTRY[cls.algo] = cls
    return cls


def register_training(cls):
    """Class decorator: add a training-only Adapter subclass (see TRAINING_ONLY) under its `algo`."""
    if cls.algo in REGISTRY or cls.algo in TRAINING_ONLY:
        raise ValueError(f"algorithm {cls.algo!r} registered twice")
    TRAINING_ONLY[cls.algo] = cls
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
