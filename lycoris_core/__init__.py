"""Host-agnostic LyCORIS core: read, merge, bypass, train and save every LyCORIS algorithm."""
from .adapter_file import AdapterFile, load_file
from .algos import REGISTRY, Adapter
from .errors import (LycorisError, LycorisFormatError, LycorisOverflowError, LycorisShapeError,
                     LycorisWarning, Problem)
from .inspect import inspect_file
from .layer import LayerSpec
from .save import save_file, standard_metadata, training_metadata

__all__ = ["Adapter", "AdapterFile", "LayerSpec", "LycorisError", "LycorisFormatError",
           "LycorisOverflowError", "LycorisShapeError", "LycorisWarning", "Problem", "REGISTRY",
           "inspect_file", "load_file", "save_file", "standard_metadata", "training_metadata"]
__version__ = "0.1.0"
