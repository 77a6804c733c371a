"""Algorithm classes, each registered by the file keys that identify it."""
from .base import Adapter
from .registry import REGISTRY, detect, known_suffixes, register
from . import lora  # noqa: F401  (registration)

__all__ = ["Adapter", "REGISTRY", "detect", "known_suffixes", "register"]
