"""ComfyUI node classes; the only package that imports comfy.*, folder_paths and nodes."""
import importlib

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# one module per node family; each defines NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS
for _name in ("loaders", "block_weights", "stack", "schedule", "train", "save", "inspect",
              "adapter_tools", "bake", "dataset"):
    try:
        _module = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{_name}":
            raise
        continue
    NODE_CLASS_MAPPINGS.update(getattr(_module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_module, "NODE_DISPLAY_NAME_MAPPINGS", {}))
