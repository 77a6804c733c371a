"""Find and import a real ComfyUI ($COMFYUI_PATH or /opt/comfyui), CPU only, and import our pack in it."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATH = "/opt/comfyui"
PACK_MODULE = "comfyui_lycoris_under_test"


def comfyui_path() -> str:
    return os.environ.get("COMFYUI_PATH") or DEFAULT_PATH


def missing_reason() -> str | None:
    """Why the host cannot be used here, or None when it can."""
    path = comfyui_path()
    if not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        return f"ComfyUI not found at {path} (set COMFYUI_PATH to a ComfyUI checkout)"
    return None


def import_host():
    """Put the host first on sys.path, force CPU, import the modules tests use. Raises ImportError."""
    path = comfyui_path()
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)  # before our repo root: ComfyUI's `nodes` module must win
    loaded = sys.modules.get("nodes")
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "")).startswith(path):
        del sys.modules["nodes"]
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management as mm  # noqa: F401  (reads args.cpu at import)
    import comfy.lora  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths  # noqa: F401
    import nodes  # noqa: F401

    if not mm.is_device_cpu(mm.get_torch_device()):
        raise ImportError("ComfyUI was imported before the tests could force --cpu")
    return path


def import_pack():
    """Import this repository the way ComfyUI imports a custom node pack (a package from its
    folder), sharing the already imported `lycoris_core` so adapters are one class everywhere."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    import lycoris_core

    for info in pkgutil.walk_packages(lycoris_core.__path__, "lycoris_core."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in [n for n in sys.modules if n == "lycoris_core" or n.startswith("lycoris_core.")]:
        sys.modules[f"{PACK_MODULE}.{name}"] = sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]
        raise
    return module
