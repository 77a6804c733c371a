"""comfyui-lycoris: every LyCORIS adapter, merged or bypassed, per-block strength, in-graph training.

ComfyUI imports this file from custom_nodes/. Without ComfyUI (plain `import`, tests of the core)
the node mappings stay empty instead of failing.
"""
import logging

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

try:
    import comfy.model_patcher  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    except ImportError:
        # loaded outside its package (e.g. by path); ComfyUI always loads it as a package
        logging.getLogger("comfyui-lycoris").exception("comfyui-lycoris: could not import nodes")
        raise

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
