"""Host-agnostic LyCORIS core: read, merge, bypass, train and save every LyCORIS algorithm."""
from .adapter_file import AdapterFile, load_file
from .algos import REGISTRY, Adapter
from .errors import LycorisError, LycorisFormatError, LycorisShapeError, LycorisWarning, Problem
from .layer import LayerSpec

__all__ = ["Adapter", "AdapterFile", "LayerSpec", "LycorisError", "LycorisFormatError",
           "LycorisShapeError", "LycorisWarning", "Problem", "REGISTRY", "load_file"]
__version__ = "0.1.0"
