"""Algorithm classes, each registered by the file keys that identify it."""
from . import boft, full, glora, ia3, lokr, loha, lora, norm, oft  # noqa: F401  (registration)
from .base import Adapter
from .registry import REGISTRY, detect, known_suffixes, register

__all__ = ["Adapter", "REGISTRY", "detect", "known_suffixes", "register"]
