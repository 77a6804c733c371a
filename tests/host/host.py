"""Find the ComfyUI hosts present, import one of them (CPU only), and import our pack in it.

Hosts come from `$COMFYUI_PATHS` (paths separated by `os.pathsep` or commas; set but empty means
none), else the two supported defaults. One process can import only one host, so a test run uses
`$COMFYUI_PATH` when it is set, else the first host present, and `tests/test_hosts.py` runs the
host suite again in a fresh process for every other host present.

Each host may have a private site folder (`site_dir`) holding the packages it pins itself (its
front end, workflow templates, comfy-kitchen): those differ between hosts, so they cannot share
one environment. `tools/setup_hosts.py` fills it; it goes first on `sys.path` (and on the
PYTHONPATH of servers the tests start).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PATHS = ("/opt/comfyui", "/opt/comfyui-v080")
PACK_MODULE = "comfyui_lycoris_under_test"
CHILD_RESULTS: list[str] = []  # one line per host whose suite ran in a child process


def is_host(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "comfy", "model_patcher.py"))


def listed_paths() -> list[str]:
    """Every host path asked for, present or not."""
    listed = os.environ.get("COMFYUI_PATHS")
    if listed is None:
        return list(DEFAULT_PATHS)
    return [p for p in re.split(r"[,%s]" % re.escape(os.pathsep), listed) if p.strip()]


def host_paths() -> list[str]:
    """The hosts present, in the order asked for."""
    return [p for p in listed_paths() if is_host(p)]


def comfyui_path() -> str:
    """The host this process tests: $COMFYUI_PATH, else the first host present."""
    pinned = os.environ.get("COMFYUI_PATH")
    if pinned:
        return pinned
    present = host_paths()
    return present[0] if present else (listed_paths() or ["<none>"])[0]


def version(path: str) -> str:
    """The host's own version string (for labels only: features are detected, never versions)."""
    try:
        with open(os.path.join(path, "comfyui_version.py"), encoding="utf-8") as f:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
    except OSError:
        found = None
    return found.group(1) if found else "unknown version"


def label(path: str) -> str:
    return f"ComfyUI {version(path)} at {path}"


def cache_root() -> str:
    return os.environ.get("LYCORIS_TEST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "comfyui-lycoris-tests")


def site_dir(path: str) -> str:
    """The folder of packages this host pins for itself (may not exist)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.abspath(path).strip("/"))
    return os.path.join(cache_root(), "host-sites", safe)


def subprocess_env(path: str | None = None) -> dict:
    """Environment for a process that runs this host (a server, a child test run)."""
    path = path or comfyui_path()
    env = dict(os.environ)
    site = site_dir(path)
    if os.path.isdir(site):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    return env


def missing_reason() -> str | None:
    """Why the host cannot be used here, or None when it can."""
    path = comfyui_path()
    if not is_host(path):
        listed = ", ".join(listed_paths()) or "none (COMFYUI_PATHS is empty)"
        return (f"no ComfyUI host found (looked at $COMFYUI_PATH, else {listed}); "
                "see README, 'Testing against ComfyUI'")
    return None


def import_host():
    """Put the host (and its site folder) first on sys.path, force CPU, import the modules tests
    use. Raises ImportError."""
    path = comfyui_path()
    for entry in (path, site_dir(path)):
        if entry in sys.path:
            sys.path.remove(entry)
    sys.path.insert(0, path)  # before our repo root: ComfyUI's `nodes` module must win
    if os.path.isdir(site_dir(path)):
        sys.path.insert(0, site_dir(path))
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
